//! The grant state machine. Every change is written to the store (with a history row), then
//! published as a fleet event (`seq` = the history row's global sequence), then, when the set
//! of active grants changed, pushed to the fleet at once (grants version = that sequence).
//! Changes run one at a time so versions and event sequence numbers go out in order.

use std::{collections::BTreeSet, sync::Arc};

use corral_policy::compiled::Approval;
use corral_proto::v1::{self as pb, GrantState};
use tokio::sync::{Mutex, MutexGuard};
use tracing::{info, warn};

use super::{
    Caller, GrantError,
    convert::{active, event},
    parse_id,
    templates::Templates,
};
use crate::{
    fleet::{Fleet, PrincipalKey},
    store::{
        grants::state_name,
        grants::{GrantFilter, GrantRecord, GrantStore, NewGrant, Transition, Transitioned},
        now_unix_nano,
    },
};

const NANOS: u64 = 1_000_000_000;

pub struct Grants {
    store: Arc<dyn GrantStore>,
    fleet: Arc<Fleet>,
    approvers: BTreeSet<String>,
    templates: Templates,
    write: Mutex<()>,
    /// Replicas on PostgreSQL: sessions on the other replicas' nodes count too.
    peers: Option<Arc<crate::replicas::Peers>>,
}

/// One operation on an existing grant.
struct Op<'a> {
    name: &'static str,
    from: &'a [GrantState],
    allowed: &'static str,
    to: GrantState,
    decision: bool,
}

const PENDING: &[GrantState] = &[GrantState::Pending];
const LIVE: &[GrantState] = &[GrantState::Pending, GrantState::Active];

impl Grants {
    pub fn new(store: Arc<dyn GrantStore>, fleet: Arc<Fleet>, approvers: &[String]) -> Self {
        Self {
            store,
            fleet,
            approvers: approvers
                .iter()
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect(),
            templates: Templates::default(),
            write: Mutex::new(()),
            peers: None,
        }
    }

    /// Requests are checked against the sessions of every replica's nodes.
    #[must_use]
    pub fn with_peers(mut self, peers: Arc<crate::replicas::Peers>) -> Self {
        self.peers = Some(peers);
        self
    }

    async fn session_known(&self, identity: &str, session: &str) -> Result<bool, GrantError> {
        Ok(match &self.peers {
            Some(p) => p.session_known(&self.fleet, identity, session).await?,
            None => self.fleet.session_known(identity, session),
        })
    }

    /// At startup: expires what lapsed while the server was down and pushes the active set.
    pub async fn start(&self) -> Result<(), GrantError> {
        self.sweep(now_unix_nano()).await?;
        let _one = self.lock().await;
        self.publish().await
    }

    async fn lock(&self) -> MutexGuard<'_, ()> {
        self.write.lock().await
    }

    pub async fn request(
        &self,
        caller: &Caller,
        r: &pb::GrantRequest,
    ) -> Result<GrantRecord, GrantError> {
        for (v, field) in [(&r.identity, "an identity"), (&r.grant, "a grant name")] {
            if v.trim().is_empty() {
                return Err(GrantError::Missing { field });
            }
        }
        if r.reason.trim().is_empty() {
            return Err(GrantError::MissingReason);
        }
        let offer = self
            .templates
            .offer(&self.fleet.current(), &r.identity, &r.grant)?;
        let ttl = if r.ttl_seconds == 0 {
            offer.max_ttl_seconds
        } else {
            r.ttl_seconds
        };
        if ttl > offer.max_ttl_seconds {
            return Err(GrantError::TtlTooLong {
                grant: r.grant.clone(),
                ttl,
                max: offer.max_ttl_seconds,
            });
        }
        if !r.session.is_empty() && !self.session_known(&r.identity, &r.session).await? {
            return Err(GrantError::UnknownSession {
                identity: r.identity.clone(),
                session: r.session.clone(),
            });
        }
        let _one = self.lock().await;
        let g = self
            .store
            .insert(&NewGrant {
                identity: r.identity.clone(),
                session: r.session.clone(),
                template: r.grant.clone(),
                policy: offer.policy,
                ttl_seconds: ttl,
                reason: r.reason.clone(),
                requested_by: caller.display.clone(),
                requester: caller.name.clone(),
                requested_unix_nano: now_unix_nano(),
            })
            .await?;
        info!(id = g.id, identity = %r.identity, session = %r.session, grant = %r.grant, ttl, by = %caller.display, "grant requested");
        self.emit(&g);
        if offer.approval != Approval::Auto {
            return Ok(g);
        }
        let g = self
            .apply(
                g.id,
                &Op {
                    name: "approved",
                    from: PENDING,
                    allowed: "pending",
                    to: GrantState::Active,
                    decision: true,
                },
                "auto",
                "approval: auto",
            )
            .await?;
        self.publish().await?;
        Ok(g)
    }

    pub async fn approve(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
    ) -> Result<GrantRecord, GrantError> {
        let id = parse_id(id)?;
        self.must_be_approver(caller, "approve")?;
        let g = self.get(id).await?;
        if g.request.requester == caller.name {
            return Err(GrantError::SelfApproval {
                id,
                user: caller.name.clone(),
            });
        }
        if g.state == GrantState::Pending {
            // The policy set may have changed since the request.
            let offer = self
                .templates
                .offer(
                    &self.fleet.current(),
                    &g.request.identity,
                    &g.request.template,
                )
                .map_err(|e| GrantError::NoLongerOffered {
                    id,
                    why: e.to_string(),
                })?;
            if g.request.ttl_seconds > offer.max_ttl_seconds {
                return Err(GrantError::NoLongerOffered {
                    id,
                    why: format!(
                        "its ttl of {} is now over the maxTtl of {}",
                        super::human(g.request.ttl_seconds),
                        super::human(offer.max_ttl_seconds)
                    ),
                });
            }
        }
        let _one = self.lock().await;
        let op = Op {
            name: "approved",
            from: PENDING,
            allowed: "pending",
            to: GrantState::Active,
            decision: true,
        };
        let g = self.apply(id, &op, &caller.display, reason).await?;
        self.publish().await?;
        Ok(g)
    }

    pub async fn deny(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
    ) -> Result<GrantRecord, GrantError> {
        let id = parse_id(id)?;
        self.must_be_approver(caller, "deny")?;
        let _one = self.lock().await;
        let op = Op {
            name: "denied",
            from: PENDING,
            allowed: "pending",
            to: GrantState::Denied,
            decision: true,
        };
        self.apply(id, &op, &caller.display, reason).await
    }

    pub async fn revoke(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
    ) -> Result<GrantRecord, GrantError> {
        let id = parse_id(id)?;
        if !self.approvers.is_empty() && !self.approvers.contains(&caller.name) {
            let g = self.get(id).await?;
            if g.request.requester != caller.name {
                return Err(GrantError::NotApproverOrRequester {
                    id,
                    user: caller.name.clone(),
                });
            }
        }
        let _one = self.lock().await;
        let op = Op {
            name: "revoked",
            from: LIVE,
            allowed: "pending or active",
            to: GrantState::Revoked,
            decision: false,
        };
        let g = self.apply(id, &op, &caller.display, reason).await?;
        self.publish().await?;
        Ok(g)
    }

    pub async fn list(&self, r: &pb::ListGrantsRequest) -> Result<Vec<GrantRecord>, GrantError> {
        let id = if r.id.is_empty() {
            None
        } else {
            Some(parse_id(&r.id)?)
        };
        Ok(self
            .store
            .list(&GrantFilter {
                id,
                identity: (!r.identity.is_empty()).then(|| r.identity.clone()),
                states: if r.pending_only {
                    PENDING.to_vec()
                } else {
                    Vec::new()
                },
                ..GrantFilter::default()
            })
            .await?)
    }

    /// Pushes the stored active set if the store has changes this replica has not published
    /// (made by another replica sharing the database).
    pub async fn refresh(&self) -> Result<(), GrantError> {
        let _one = self.lock().await;
        if self.store.last_seq().await? > self.fleet.current().grants_version {
            self.publish().await?;
        }
        Ok(())
    }

    /// [`Grants::sweep`] if no other replica is sweeping now (`None` if one is).
    pub async fn sweep_once(&self, now: u64) -> Result<Option<usize>, GrantError> {
        let Some(_lock) = self.store.sweep_lock().await? else {
            return Ok(None);
        };
        self.sweep(now).await.map(Some)
    }

    /// Marks active grants past their expiry `EXPIRED` (actor `expiry`). Returns how many.
    pub async fn sweep(&self, now: u64) -> Result<usize, GrantError> {
        let due = self
            .store
            .list(&GrantFilter {
                states: vec![GrantState::Active],
                expired_by: Some(now),
                ..GrantFilter::default()
            })
            .await?;
        if due.is_empty() {
            return Ok(0);
        }
        let _one = self.lock().await;
        let op = Op {
            name: "expired",
            from: &[GrantState::Active],
            allowed: "active",
            to: GrantState::Expired,
            decision: false,
        };
        let mut n = 0;
        for g in due {
            match self.apply(g.id, &op, "expiry", "ttl elapsed").await {
                Ok(_) => n += 1,
                // Revoked or ended meanwhile.
                Err(GrantError::WrongState { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.publish().await?;
        Ok(n)
    }

    /// Ends every pending or active grant bound to a session that ended (actor
    /// `session-end`). Grants for all sessions of an identity (empty session) never end so.
    pub async fn end_sessions(&self, gone: &[PrincipalKey]) -> Result<usize, GrantError> {
        let _one = self.lock().await;
        let op = Op {
            name: "ended",
            from: LIVE,
            allowed: "pending or active",
            to: GrantState::Ended,
            decision: false,
        };
        let mut n = 0;
        for (identity, session) in gone.iter().filter(|(_, s)| !s.is_empty()) {
            let bound = self
                .store
                .list(&GrantFilter {
                    identity: Some(identity.clone()),
                    session: Some(session.clone()),
                    states: LIVE.to_vec(),
                    ..GrantFilter::default()
                })
                .await?;
            for g in bound {
                match self
                    .apply(g.id, &op, "session-end", "the session ended")
                    .await
                {
                    Ok(_) => n += 1,
                    Err(GrantError::WrongState { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if n > 0 {
            self.publish().await?;
        }
        Ok(n)
    }

    fn must_be_approver(&self, caller: &Caller, op: &'static str) -> Result<(), GrantError> {
        if self.approvers.is_empty() || self.approvers.contains(&caller.name) {
            Ok(())
        } else {
            Err(GrantError::NotApprover {
                user: caller.name.clone(),
                op,
            })
        }
    }

    async fn get(&self, id: u64) -> Result<GrantRecord, GrantError> {
        self.store
            .list(&GrantFilter {
                id: Some(id),
                ..GrantFilter::default()
            })
            .await?
            .pop()
            .ok_or(GrantError::NotFound { id })
    }

    /// One state change (the caller holds the write lock); emits its event.
    async fn apply(
        &self,
        id: u64,
        op: &Op<'_>,
        actor: &str,
        reason: &str,
    ) -> Result<GrantRecord, GrantError> {
        let now = now_unix_nano();
        let expires = if op.to == GrantState::Active {
            let g = self.get(id).await?;
            Some(now.saturating_add(g.request.ttl_seconds.saturating_mul(NANOS)))
        } else {
            None
        };
        let t = Transition {
            id,
            from: op.from,
            to: op.to,
            actor,
            reason,
            time_unix_nano: now,
            decision: op.decision,
            expires_unix_nano: expires,
        };
        match self.store.transition(&t).await? {
            Transitioned::Done(g) => {
                info!(id, state = state_name(op.to), actor, "grant {}", op.name);
                self.emit(&g);
                Ok(*g)
            }
            Transitioned::NotFound => Err(GrantError::NotFound { id }),
            Transitioned::WrongState(s) => Err(GrantError::WrongState {
                id,
                state: state_name(s),
                allowed: op.allowed,
                op: op.name,
            }),
        }
    }

    /// The grant's latest change on the fleet event stream.
    fn emit(&self, g: &GrantRecord) {
        if let Some(e) = event(g) {
            self.fleet.server_event(&e);
        }
    }

    /// Pushes the active, unexpired grants to the fleet (the caller holds the write lock).
    async fn publish(&self) -> Result<(), GrantError> {
        let now = now_unix_nano();
        let active: Vec<pb::ActiveGrant> = self
            .store
            .list(&GrantFilter {
                states: vec![GrantState::Active],
                ..GrantFilter::default()
            })
            .await?
            .into_iter()
            .filter(|g| g.expires_unix_nano > now)
            .map(|g| active(&g))
            .collect();
        let version = self.store.last_seq().await?;
        if self.fleet.publish_grants(version, active) {
            info!(grants_version = version, "grant set pushed");
        } else if version < self.fleet.current().grants_version {
            warn!(
                version,
                "grant set older than the one published; not pushed"
            );
        }
        Ok(())
    }
}
