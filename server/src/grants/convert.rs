//! Grants as the API, the nodes and the event stream see them.

use corral_proto::v1 as pb;

use crate::store::grants::GrantRecord;

/// The node name on the server's own events.
pub const SERVER_NODE: &str = "corral-server";

/// The grant's latest change as a fleet event (`seq` = the history row's global sequence).
pub fn event(g: &GrantRecord) -> Option<pb::Event> {
    let h = g.history.last()?;
    Some(pb::Event {
        seq: h.seq,
        time_unix_nano: h.time_unix_nano,
        node: SERVER_NODE.to_owned(),
        principal: Some(pb::Principal {
            identity: g.request.identity.clone(),
            session: g.request.session.clone(),
            cgroup_id: 0,
            opt_outs: Vec::new(),
        }),
        process: None,
        call: Some(pb::event::Call::Grant(pb::GrantChange {
            id: g.id.to_string(),
            grant: g.request.template.clone(),
            state: h.state.into(),
            actor: h.actor.clone(),
            reason: h.reason.clone(),
            expires_unix_nano: g.expires_unix_nano,
        })),
        decision: None,
        suppressed: 0,
        repeats: 0,
    })
}

/// A grant as nodes receive it.
pub fn active(g: &GrantRecord) -> pb::ActiveGrant {
    pb::ActiveGrant {
        id: g.id.to_string(),
        identity: g.request.identity.clone(),
        session: g.request.session.clone(),
        grant: g.request.template.clone(),
        expires_unix_nano: g.expires_unix_nano,
    }
}

/// A grant as the API returns it.
pub fn to_pb(g: &GrantRecord) -> pb::Grant {
    pb::Grant {
        id: g.id.to_string(),
        identity: g.request.identity.clone(),
        session: g.request.session.clone(),
        grant: g.request.template.clone(),
        state: g.state.into(),
        ttl_seconds: g.request.ttl_seconds,
        expires_unix_nano: g.expires_unix_nano,
        reason: g.request.reason.clone(),
        requested_by: g.request.requested_by.clone(),
        decided_by: g.decided_by.clone(),
        policy: g.request.policy.clone(),
        requested_unix_nano: g.request.requested_unix_nano,
        decided_unix_nano: g.decided_unix_nano,
        history: g
            .history
            .iter()
            .map(|h| pb::GrantHistoryEntry {
                time_unix_nano: h.time_unix_nano,
                state: h.state.into(),
                actor: h.actor.clone(),
                reason: h.reason.clone(),
            })
            .collect(),
    }
}
