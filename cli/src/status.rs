//! `corral status [--json]`: what the local agent enforces and how its event path is doing.

use std::process::ExitCode;

use corral_proto::v1 as pb;
use serde_json::json;

use crate::client::{self, SocketArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

fn to_json(s: &pb::AgentStatus) -> serde_json::Value {
    let principals: Vec<_> = s
        .principals
        .iter()
        .map(|p| {
            let pr = p.principal.clone().unwrap_or_default();
            json!({
                "identity": pr.identity, "session": pr.session, "cgroup_id": pr.cgroup_id,
                "policy": p.policy, "processes": p.processes,
            })
        })
        .collect();
    json!({
        "node": s.node,
        "exec_enforcement": s.exec_enforcement,
        "sock_addr_hooks": s.sock_addr_hooks,
        "policy_revision": s.policy_revision,
        "policies": s.policies,
        "last_error": s.last_error,
        "principals": principals,
        "events_delivered": s.events_delivered,
        "events_dropped_kernel": s.events_dropped_kernel,
        "events_dropped_subscribers": s.events_dropped_subscribers,
        "events_suppressed": s.events_suppressed,
        "server_state": s.server_state,
    })
}

fn human(s: &pb::AgentStatus) -> String {
    let mut out = format!(
        "node:        {}\nmode:        {}\nexec:        {}\nsock_addr:   {}\npolicy:      revision {} ({})\n",
        s.node,
        s.server_state,
        s.exec_enforcement,
        s.sock_addr_hooks.join(", "),
        s.policy_revision,
        if s.policies.is_empty() {
            "none: enrolled principals are denied everything".to_owned()
        } else {
            s.policies.join(", ")
        }
    );
    if !s.last_error.is_empty() {
        out.push_str("last error:  the latest policy input was rejected; the previous policy stays in force:\n");
        for l in s.last_error.lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }
    out.push_str(&format!(
        "events:      {} delivered, {} dropped in kernel, {} dropped for slow subscribers\n",
        s.events_delivered, s.events_dropped_kernel, s.events_dropped_subscribers
    ));
    out.push_str(&format!("principals:  {}\n", s.principals.len()));
    for p in &s.principals {
        let pr = p.principal.clone().unwrap_or_default();
        out.push_str(&format!(
            "  {} session {} policy {} processes {}\n",
            pr.identity,
            pr.session,
            if p.policy.is_empty() { "-" } else { &p.policy },
            p.processes
        ));
    }
    out
}

pub fn run(a: &Args) -> ExitCode {
    let res = client::runtime().and_then(|rt| {
        rt.block_on(async {
            let mut c = client::connect(&a.socket.socket).await?;
            c.status(pb::StatusRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| client::status_text(&s))
        })
    });
    match res {
        Ok(s) => {
            if a.json {
                println!("{}", to_json(&s));
            } else {
                print!("{}", human(&s));
            }
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("corral status: {msg}");
            ExitCode::FAILURE
        }
    }
}
