//! `corral events [--follow] [--identity P] [--verdict allow|deny] [--kind K] [--json]`.

use std::{io::Write as _, process::ExitCode};

use corral_events::render;
use corral_proto::v1 as pb;
use tokio_stream::StreamExt as _;

use crate::{
    client::{self, SocketArgs},
    error::CliError,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictArg {
    Allow,
    Deny,
    AuditDeny,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep streaming new events after the recent ones.
    #[arg(short, long)]
    follow: bool,
    /// Only this identity (a SPIFFE ID, or a pattern with `*` / `**`).
    #[arg(long)]
    identity: Option<String>,
    /// Only this verdict.
    #[arg(long, value_enum)]
    verdict: Option<VerdictArg>,
    /// Only this kind: connect or exec.
    #[arg(long)]
    kind: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
    /// The fleet's events from this corral-server instead of the local agent (always
    /// follows; its recorded history is what `corral policy suggest|simulate --server` read).
    #[arg(long, env = "CORRAL_SERVER")]
    server: Option<String>,
    #[command(flatten)]
    tls: corral_runtime::tls::TlsFiles,
    /// With --server: only this node's events.
    #[arg(long, requires = "server")]
    node: Option<String>,
}

fn filter(a: &Args) -> pb::EventFilter {
    let verdicts = match a.verdict {
        None => vec![],
        Some(VerdictArg::Allow) => vec![pb::Verdict::Allow as i32],
        Some(VerdictArg::Deny) => vec![pb::Verdict::Deny as i32],
        Some(VerdictArg::AuditDeny) => vec![pb::Verdict::AuditDeny as i32],
    };
    pb::EventFilter {
        identity: a.identity.clone().unwrap_or_default(),
        verdicts,
        kinds: a.kind.iter().cloned().collect(),
    }
}

/// Prints the events until the stream ends (or stdout is closed).
pub async fn run(a: &Args) -> Result<ExitCode, CliError> {
    watch(a).await.map(|()| ExitCode::SUCCESS)
}

async fn watch(a: &Args) -> Result<(), CliError> {
    if let Some(url) = &a.server {
        let server = crate::server_client::ServerArgs {
            server: url.clone(),
            tls: a.tls.clone(),
        };
        return crate::fleet::watch_events(&server, filter(a), a.node.clone(), a.json).await;
    }
    let mut c = client::connect(&a.socket.socket).await?;
    let req = pb::WatchEventsRequest {
        filter: Some(filter(a)),
        follow: a.follow,
    };
    let mut stream = c
        .watch_events(req)
        .await
        .map_err(CliError::agent)?
        .into_inner();
    // Buffered; flushed whenever no further event is ready, so a follower sees each event at
    // once and a burst costs one write per buffer, not one per event.
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let mut reported_drops = 0;
    loop {
        let next = match tokio::time::timeout(std::time::Duration::ZERO, stream.next()).await {
            Ok(n) => n,
            Err(_) => {
                if let Err(e) = out.flush() {
                    return CliError::from_write(e);
                }
                stream.next().await
            }
        };
        let Some(item) = next else { break };
        let r = item.map_err(CliError::agent)?;
        let Some(e) = r.event else { continue };
        let res = if a.json {
            serde_json::to_writer(
                &mut out,
                &render::event_json(&e, Some(r.subscriber_dropped)),
            )
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
        } else {
            writeln!(out, "{}", render::event_line(&e))
        };
        if let Err(e) = res {
            return CliError::from_write(e);
        }
        if !a.json && r.subscriber_dropped > reported_drops {
            eprintln!(
                "corral events: {} events lost so far because this reader was too slow",
                r.subscriber_dropped
            );
            reported_drops = r.subscriber_dropped;
        }
    }
    out.flush().or_else(CliError::from_write)
}
