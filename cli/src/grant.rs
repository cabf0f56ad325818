//! `corral grant request|list|approve|deny|revoke`: just-in-time grants on the central server.
//!
//! Every command prints the grant(s) it touched: one readable line each, or with `--json` one
//! JSON object per line. `request --wait` polls until the grant leaves `pending`: exit status
//! 0 when it is issued, 3 when it is denied or ended, 2 when the wait times out (the request
//! stays pending).

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use corral_events::render::grant_state_name;
use corral_policy::fields::parse_duration;
use corral_proto::v1 as pb;
use serde_json::json;

use crate::{
    error::CliError,
    server_client::{self, ServerArgs},
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Ask for a grant the identity's policy offers (prints its id and state).
    Request(RequestArgs),
    /// Grants and their state (newest last).
    List(ListArgs),
    /// Approve a pending grant (it is issued now and expires after its TTL).
    Approve(DecideArgs),
    /// Deny a pending grant.
    Deny(DecideArgs),
    /// Revoke a grant: every node stops honouring it at once.
    Revoke(DecideArgs),
}

#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// The SPIFFE ID the grant is for.
    #[arg(long)]
    pub identity: String,
    /// Bind the grant to one session of the identity (it ends with the session); default:
    /// every session of the identity.
    #[arg(long, default_value = "")]
    pub session: String,
    /// The grant's name in the identity's policy (`spec.grants[].name`).
    #[arg(long = "grant")]
    pub grant: String,
    /// How long the grant lasts once issued, e.g. 10m, 1h30m, 45s (at most the grant's maxTtl;
    /// default: its maxTtl).
    #[arg(long, value_parser = ttl)]
    pub ttl: Option<Duration>,
    /// Why the access is needed (recorded, shown to approvers).
    #[arg(long)]
    pub reason: String,
    /// Block until the grant is approved (exit 0) or denied (exit 3), or --timeout passes
    /// (exit 2).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, e.g. 5m.
    #[arg(long, value_parser = ttl, default_value = "10m")]
    pub timeout: Duration,
    #[command(flatten)]
    pub out: Out,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only grants waiting for a decision.
    #[arg(long)]
    pub pending: bool,
    /// Only this identity's grants.
    #[arg(long, default_value = "")]
    pub identity: String,
    /// Also print each grant's history (who did what, when).
    #[arg(long)]
    pub history: bool,
    #[command(flatten)]
    pub out: Out,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct DecideArgs {
    /// The grant id (from `grant request` or `grant list`).
    pub id: String,
    /// Recorded with the decision.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub out: Out,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Out {
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

fn ttl(s: &str) -> Result<Duration, CliError> {
    parse_duration(s).ok_or_else(|| CliError::BadDuration {
        value: s.to_owned(),
    })
}

pub async fn run(c: Command) -> Result<ExitCode, CliError> {
    match c {
        Command::Request(a) => request_cmd(&a).await,
        Command::List(a) => list(&a).await,
        Command::Approve(a) => decide(&a, Decision::Approve).await,
        Command::Deny(a) => decide(&a, Decision::Deny).await,
        Command::Revoke(a) => decide(&a, Decision::Revoke).await,
    }
}

async fn request_cmd(a: &RequestArgs) -> Result<ExitCode, CliError> {
    let mut c = server_client::grants(&a.server).await?;
    let g = c
        .request(pb::GrantRequest {
            identity: a.identity.clone(),
            session: a.session.clone(),
            grant: a.grant.clone(),
            ttl_seconds: a.ttl.map_or(0, |d| d.as_secs().max(1)),
            reason: a.reason.clone(),
        })
        .await
        .map_err(CliError::server)?
        .into_inner();
    print_grant(&g, a.out, false);
    if !a.wait || g.state != pb::GrantState::Pending as i32 {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + a.timeout;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cur = c
            .list(pb::ListGrantsRequest {
                id: g.id.clone(),
                ..Default::default()
            })
            .await
            .map_err(CliError::server)?
            .into_inner()
            .grants
            .into_iter()
            .find(|x| x.id == g.id)
            .ok_or_else(|| CliError::GrantVanished { id: g.id.clone() })?;
        if cur.state != pb::GrantState::Pending as i32 {
            print_grant(&cur, a.out, false);
            return Ok(if cur.state == pb::GrantState::Active as i32 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            });
        }
        if Instant::now() > deadline {
            eprintln!(
                "grant {} is still pending after {} s; it stays pending",
                g.id,
                a.timeout.as_secs()
            );
            return Ok(ExitCode::from(2));
        }
    }
}

async fn list(a: &ListArgs) -> Result<ExitCode, CliError> {
    let mut c = server_client::grants(&a.server).await?;
    let r = c
        .list(pb::ListGrantsRequest {
            pending_only: a.pending,
            id: String::new(),
            identity: a.identity.clone(),
        })
        .await
        .map_err(CliError::server)?
        .into_inner();
    if r.grants.is_empty() && !a.out.json {
        println!("no grants");
    }
    for g in &r.grants {
        print_grant(g, a.out, a.history);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Copy)]
enum Decision {
    Approve,
    Deny,
    Revoke,
}

async fn decide(a: &DecideArgs, d: Decision) -> Result<ExitCode, CliError> {
    let mut c = server_client::grants(&a.server).await?;
    let msg = pb::GrantDecisionRequest {
        id: a.id.clone(),
        reason: a.reason.clone(),
    };
    let g = match d {
        Decision::Approve => c.approve(msg).await,
        Decision::Deny => c.deny(msg).await,
        Decision::Revoke => c.revoke(msg).await,
    }
    .map_err(CliError::server)?
    .into_inner();
    print_grant(&g, a.out, false);
    Ok(ExitCode::SUCCESS)
}

fn print_grant(g: &pb::Grant, out: Out, history: bool) {
    if out.json {
        println!("{}", grant_json(g));
        return;
    }
    println!("{}", grant_line(g));
    if history {
        for h in &g.history {
            let reason = if h.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", h.reason)
            };
            println!(
                "    {} {} by {}{reason}",
                clock(h.time_unix_nano),
                grant_state_name(h.state),
                h.actor
            );
        }
    }
}

/// `HH:MM:SS` (UTC) of a Unix time in nanoseconds.
fn clock(unix_nano: u64) -> String {
    let secs = unix_nano / 1_000_000_000;
    format!(
        "{:02}:{:02}:{:02}Z",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// `grant 7 crm-write active spiffe://t/a session s1 ttl 600s expires 12:00:00Z requested by bob: reason`.
pub fn grant_line(g: &pb::Grant) -> String {
    let session = if g.session.is_empty() {
        "every session".to_owned()
    } else {
        format!("session {}", g.session)
    };
    let expires = if g.expires_unix_nano == 0 {
        String::new()
    } else {
        format!(" expires {}", clock(g.expires_unix_nano))
    };
    let decided = if g.decided_by.is_empty() {
        String::new()
    } else {
        format!(", decided by {}", g.decided_by)
    };
    format!(
        "grant {} {} {} {} {session} ttl {}s{expires} requested by {}{decided}: {}",
        g.id,
        g.grant,
        grant_state_name(g.state),
        g.identity,
        g.ttl_seconds,
        g.requested_by,
        g.reason
    )
}

pub fn grant_json(g: &pb::Grant) -> serde_json::Value {
    let history: Vec<_> = g
        .history
        .iter()
        .map(|h| {
            json!({"time_unix_nano": h.time_unix_nano, "state": grant_state_name(h.state),
                   "actor": h.actor, "reason": h.reason})
        })
        .collect();
    json!({
        "id": g.id, "identity": g.identity, "session": g.session, "grant": g.grant,
        "policy": g.policy, "state": grant_state_name(g.state), "ttl_seconds": g.ttl_seconds,
        "expires_unix_nano": g.expires_unix_nano, "reason": g.reason,
        "requested_by": g.requested_by, "requested_unix_nano": g.requested_unix_nano,
        "decided_by": g.decided_by, "decided_unix_nano": g.decided_unix_nano,
        "history": history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_reads_as_one_line_and_one_object() {
        let g = pb::Grant {
            id: "7".into(),
            identity: "spiffe://t/a".into(),
            session: "s1".into(),
            grant: "crm-write".into(),
            state: pb::GrantState::Active as i32,
            ttl_seconds: 600,
            expires_unix_nano: 3_723_000_000_000,
            reason: "ticket 42".into(),
            requested_by: "bob".into(),
            decided_by: "alice".into(),
            ..Default::default()
        };
        assert_eq!(
            grant_line(&g),
            "grant 7 crm-write active spiffe://t/a session s1 ttl 600s expires 01:02:03Z \
             requested by bob, decided by alice: ticket 42"
        );
        let j = grant_json(&g);
        assert_eq!(j["state"], "active");
        assert_eq!(j["session"], "s1");
        assert_eq!(j["ttl_seconds"], 600);
    }

    #[test]
    fn ttls_parse_like_policy_durations() {
        assert_eq!(ttl("10m").ok(), Some(Duration::from_secs(600)));
        assert_eq!(
            ttl("10 minutes").map_err(|e| e.to_string()),
            Err("`10 minutes` is not a duration like 10m, 1h30m or 45s".to_owned())
        );
    }
}
