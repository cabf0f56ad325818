//! `PolicyService`: Apply/Delete/List/Get change or read the store; every change is one new
//! revision, validated as a whole set first and then pushed to the fleet.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use corral_proto::v1::{self as pb, policy_service_server::PolicyService};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use crate::{
    error::ServerError,
    fleet::Fleet,
    store::{Change, PolicyRecord, PolicyStore, StoreSnapshot},
    validate,
};

pub struct Policies {
    store: Arc<dyn PolicyStore>,
    fleet: Arc<Fleet>,
    /// `--policy-admin`: who may apply and delete; empty: every caller.
    admins: BTreeSet<String>,
    /// Read-validate-commit runs one change at a time.
    change: tokio::sync::Mutex<()>,
    /// Replicas on PostgreSQL: the other replicas' nodes.
    peers: Option<Arc<crate::replicas::Peers>>,
}

fn doc(r: &PolicyRecord) -> pb::PolicyDocument {
    pb::PolicyDocument {
        name: r.name.clone(),
        yaml: r.yaml.clone(),
        revision: r.revision,
        applied_by: r.applied_by.clone(),
        applied_unix_nano: r.applied_unix_nano,
        deleted: r.deleted,
    }
}

fn by_name(s: &StoreSnapshot) -> BTreeMap<String, (String, u64)> {
    s.policies
        .iter()
        .map(|p| (p.name.clone(), (p.yaml.clone(), p.revision)))
        .collect()
}

impl Policies {
    /// `admins`: `--policy-admin` names (empty: every caller may change policies). A caller is
    /// named by its client certificate under mTLS, else by the local user owning its socket.
    pub fn new(store: Arc<dyn PolicyStore>, fleet: Arc<Fleet>, admins: &[String]) -> Self {
        Self {
            store,
            fleet,
            admins: admins
                .iter()
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect(),
            change: tokio::sync::Mutex::new(()),
            peers: None,
        }
    }

    /// Status shows the nodes of every replica sharing the database.
    #[must_use]
    pub fn with_peers(mut self, peers: Arc<crate::replicas::Peers>) -> Self {
        self.peers = Some(peers);
        self
    }

    /// Whether the caller of `req` may change policies; its name for the record if so.
    fn admitted<T>(&self, req: &Request<T>) -> Result<String, ServerError> {
        let caller = crate::auth::caller(req);
        if !self.admins.is_empty() && !self.admins.contains(&caller.name) {
            return Err(ServerError::NotPolicyAdmin { user: caller.name });
        }
        Ok(caller.display)
    }

    /// Commits `change` over `base` (already validated) and pushes the result.
    async fn commit(&self, base: &StoreSnapshot, change: &Change) -> Result<u64, ServerError> {
        let revision = self.store.commit(base.revision, change).await?;
        let now = self.store.current().await?;
        self.fleet.publish(&now);
        Ok(revision)
    }

    async fn apply(
        &self,
        file: &str,
        yaml: &str,
        by: String,
    ) -> Result<pb::ApplyResponse, ServerError> {
        let docs = validate::split_file(file, yaml)?;
        let base = self.store.current().await?;
        let current = by_name(&base);
        let names: Vec<String> = docs.iter().map(|d| d.name.clone()).collect();
        let upserts: Vec<(String, String)> = docs
            .iter()
            .filter(|d| current.get(&d.name).is_none_or(|(y, _)| *y != d.yaml))
            .map(|d| (d.name.clone(), d.yaml.clone()))
            .collect();
        if upserts.is_empty() {
            return Ok(pb::ApplyResponse {
                revision: base.revision,
                policies: names,
                applied_unix_nano: 0,
                unchanged: true,
            });
        }
        validate::check_set(
            base.revision + 1,
            &validate::merged(&current, file, &docs, &[]),
        )?;
        let revision = self
            .commit(
                &base,
                &Change {
                    applied_by: by,
                    upserts,
                    deletes: Vec::new(),
                },
            )
            .await?;
        let applied = self
            .store
            .history(&names[0])
            .await?
            .last()
            .map_or(0, |r| r.applied_unix_nano);
        info!(revision, policies = ?names, "policies applied");
        Ok(pb::ApplyResponse {
            revision,
            policies: names,
            applied_unix_nano: applied,
            unchanged: false,
        })
    }

    async fn delete(&self, name: &str, by: String) -> Result<u64, ServerError> {
        let base = self.store.current().await?;
        let current = by_name(&base);
        if !current.contains_key(name) {
            return Err(ServerError::NotFound { name: name.into() });
        }
        let deletes = vec![name.to_owned()];
        validate::check_set(
            base.revision + 1,
            &validate::merged(&current, "", &[], &deletes),
        )?;
        let revision = self
            .commit(
                &base,
                &Change {
                    applied_by: by,
                    upserts: Vec::new(),
                    deletes,
                },
            )
            .await?;
        info!(revision, policy = name, "policy deleted");
        Ok(revision)
    }
}

#[tonic::async_trait]
impl PolicyService for Policies {
    #[instrument(skip_all, fields(file = %req.get_ref().file_name))]
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let by = self.admitted(&req)?;
        let r = req.into_inner();
        let file = if r.file_name.is_empty() {
            "policy.yaml"
        } else {
            r.file_name.as_str()
        };
        let _one = self.change.lock().await;
        Ok(Response::new(self.apply(file, &r.yaml, by).await?))
    }

    #[instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let by = self.admitted(&req)?;
        let name = req.into_inner().name;
        let _one = self.change.lock().await;
        let revision = self.delete(&name, by).await?;
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    #[instrument(skip_all)]
    async fn list(
        &self,
        _req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let s = self.store.current().await.map_err(ServerError::from)?;
        Ok(Response::new(pb::ListResponse {
            policies: s.policies.iter().map(doc).collect(),
            revision: s.revision,
        }))
    }

    #[instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let r = req.into_inner();
        let p = self
            .store
            .get(&r.name)
            .await
            .map_err(ServerError::from)?
            .ok_or(ServerError::NotFound {
                name: r.name.clone(),
            })?;
        let history = if r.history {
            self.store
                .history(&r.name)
                .await
                .map_err(ServerError::from)?
                .iter()
                .map(doc)
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::GetResponse {
            policy: Some(doc(&p)),
            history,
        }))
    }

    #[instrument(skip_all)]
    async fn status(
        &self,
        _req: Request<pb::PolicyStatusRequest>,
    ) -> Result<Response<pb::PolicyStatusResponse>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let nodes = match &self.peers {
            Some(p) => p.status(&self.fleet).await.map_err(ServerError::from)?,
            None => self.fleet.status(),
        };
        Ok(Response::new(pb::PolicyStatusResponse {
            revision: self.fleet.current().revision,
            nodes,
            events_received: self.fleet.events_received.load(Relaxed),
            events_dropped: self.fleet.events_dropped.load(Relaxed),
            events_recorded: self.fleet.events_recorded.load(Relaxed),
            events_not_recorded: self.fleet.events_not_recorded.load(Relaxed),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    const DOC: &str = "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: p\nspec:\n  identities: [\"spiffe://t/a\"]\n  zones: { z: { cidrs: [10.0.0.0/8] } }\n  connect:\n    - { action: allow, zones: [z] }\n";

    use crate::auth::as_local_user as as_user;

    async fn policies(
        name: &str,
        admins: &[String],
    ) -> anyhow::Result<(Policies, std::path::PathBuf)> {
        let db = std::env::temp_dir().join(format!(
            "corral-policy-admins-{name}-{}-{}.db",
            std::process::id(),
            crate::store::now_unix_nano()
        ));
        let store: Arc<dyn PolicyStore> = Arc::new(SqliteStore::open(&db)?);
        let fleet = Arc::new(Fleet::new(&store.current().await?, 16));
        Ok((Policies::new(store, fleet, admins), db))
    }

    fn apply_req(user: &str) -> Request<pb::ApplyRequest> {
        as_user(
            user,
            pb::ApplyRequest {
                file_name: "p.yaml".into(),
                yaml: DOC.into(),
            },
        )
    }

    #[tokio::test]
    async fn only_policy_admins_change_policies_when_admins_are_set() -> anyhow::Result<()> {
        let (p, db) = policies("set", &["alice".into()]).await?;
        let denied = PolicyService::apply(&p, apply_req("node-a"))
            .await
            .expect_err("not an admin");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
        assert!(denied.message().contains("node-a"), "{denied:?}");
        let r = PolicyService::apply(&p, apply_req("alice"))
            .await?
            .into_inner();
        assert_eq!(r.revision, 1);
        let del = |u: &str| as_user(u, pb::DeleteRequest { name: "p".into() });
        let denied = PolicyService::delete(&p, del("node-a"))
            .await
            .expect_err("not an admin");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        // Reads stay open to every caller.
        let list = PolicyService::list(&p, as_user("node-a", pb::ListRequest {})).await?;
        assert_eq!(list.into_inner().policies.len(), 1);
        assert_eq!(
            PolicyService::delete(&p, del("alice"))
                .await?
                .into_inner()
                .revision,
            2
        );
        let _ = std::fs::remove_file(db);
        Ok(())
    }

    #[tokio::test]
    async fn without_admins_every_caller_may_change_policies() -> anyhow::Result<()> {
        let (p, db) = policies("unset", &[]).await?;
        let r = PolicyService::apply(&p, apply_req("anyone"))
            .await?
            .into_inner();
        assert_eq!(r.revision, 1);
        let _ = std::fs::remove_file(db);
        Ok(())
    }
}
