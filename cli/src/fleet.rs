//! Fleet commands against the central server: `policy apply|list|get|delete|status` and
//! `events --server`.

use std::{
    io::Write as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use corral_events::render;
use corral_proto::v1 as pb;
use tokio_stream::StreamExt as _;

use crate::{
    error::CliError,
    server_client::{self, ServerArgs},
};

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// The policy file (YAML, one or more AgentPolicy documents).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Return once the server has stored the revision, without waiting for the nodes.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for every connected node to ACK or NACK, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// The policy's metadata.name.
    pub name: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The policy's metadata.name.
    pub name: String,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Also list every earlier version (who applied it, when, at which revision).
    #[arg(long)]
    pub history: bool,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

fn time(unix_nano: u64) -> String {
    let secs = unix_nano / 1_000_000_000;
    format!("@{secs}")
}

pub async fn apply(a: &ApplyArgs) -> Result<ExitCode, CliError> {
    let yaml = std::fs::read_to_string(&a.file).map_err(|source| {
        CliError::from(corral_policy::PolicyError::Read {
            file: a.file.display().to_string(),
            source,
        })
    })?;
    let mut c = server_client::policies(&a.server).await?;
    let r = c
        .apply(pb::ApplyRequest {
            file_name: a.file.display().to_string(),
            yaml,
        })
        .await
        .map_err(CliError::server)?
        .into_inner();
    let names = r.policies.join(", ");
    if r.unchanged {
        println!("revision {}: unchanged ({names})", r.revision);
    } else {
        println!("revision {}: applied {names}", r.revision);
    }
    if a.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    wait_for_nodes(&mut c, r.revision, r.applied_unix_nano, a.timeout).await
}

/// Polls `Status` until every connected node has ACKed or NACKed `revision`; prints each
/// node's answer and how long after the commit it came (server clock).
async fn wait_for_nodes(
    c: &mut pb::policy_service_client::PolicyServiceClient<tonic::transport::Channel>,
    revision: u64,
    applied: u64,
    timeout: u64,
) -> Result<ExitCode, CliError> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(timeout);
    let nodes = loop {
        let s = c
            .status(pb::PolicyStatusRequest {})
            .await
            .map_err(CliError::server)?
            .into_inner();
        let pending = s
            .nodes
            .iter()
            .any(|n| n.connected && n.acked_revision < revision && n.nacked_revision < revision);
        if !pending {
            break s.nodes;
        }
        if Instant::now() > deadline {
            return Err(CliError::NodesTimedOut {
                timeout_secs: timeout,
                revision,
                waiting: s
                    .nodes
                    .into_iter()
                    .filter(|n| {
                        n.connected && n.acked_revision < revision && n.nacked_revision < revision
                    })
                    .map(|n| n.node)
                    .collect(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let ms = |at: u64| {
        if applied == 0 || at < applied {
            String::new()
        } else {
            format!(" in {:.1} ms", (at - applied) as f64 / 1e6)
        }
    };
    let mut nacks = 0;
    let mut acks = 0;
    for n in &nodes {
        if n.acked_revision >= revision {
            acks += 1;
            println!(
                "{}: ACK revision {}{}",
                n.node,
                n.acked_revision,
                ms(n.acked_unix_nano)
            );
        } else if n.nacked_revision >= revision {
            nacks += 1;
            println!(
                "{}: NACK revision {}{}: {} (still enforcing revision {})",
                n.node,
                n.nacked_revision,
                ms(n.nacked_unix_nano),
                n.nack_detail.replace('\n', "; "),
                n.acked_revision
            );
        } else {
            println!(
                "{}: not connected (acknowledged revision {})",
                n.node, n.acked_revision
            );
        }
    }
    println!(
        "{acks} ACK, {nacks} NACK, waited {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(if nacks > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn list(a: &ListArgs) -> Result<ExitCode, CliError> {
    let mut c = server_client::policies(&a.server).await?;
    let r = c
        .list(pb::ListRequest {})
        .await
        .map_err(CliError::server)?
        .into_inner();
    if a.json {
        for p in &r.policies {
            println!(
                "{}",
                serde_json::json!({
                    "name": p.name, "revision": p.revision, "applied_by": p.applied_by,
                    "applied_unix_nano": p.applied_unix_nano,
                })
            );
        }
    } else {
        println!("revision {}", r.revision);
        for p in &r.policies {
            println!(
                "{}\trevision {}\tby {}\t{}",
                p.name,
                p.revision,
                p.applied_by,
                time(p.applied_unix_nano)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn get(a: &GetArgs) -> Result<ExitCode, CliError> {
    let mut c = server_client::policies(&a.server).await?;
    let r = c
        .get(pb::GetRequest {
            name: a.name.clone(),
            history: a.history,
        })
        .await
        .map_err(CliError::server)?
        .into_inner();
    if a.history {
        for h in &r.history {
            println!(
                "# revision {} by {} {}{}",
                h.revision,
                h.applied_by,
                time(h.applied_unix_nano),
                if h.deleted { " (deleted)" } else { "" }
            );
        }
    }
    if let Some(p) = r.policy {
        print!("{}", p.yaml);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn delete(a: &NameArgs) -> Result<ExitCode, CliError> {
    let mut c = server_client::policies(&a.server).await?;
    let r = c
        .delete(pb::DeleteRequest {
            name: a.name.clone(),
        })
        .await
        .map_err(CliError::server)?
        .into_inner();
    println!("revision {}: deleted {}", r.revision, a.name);
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn status(a: &StatusArgs) -> Result<ExitCode, CliError> {
    let mut c = server_client::policies(&a.server).await?;
    let s = c
        .status(pb::PolicyStatusRequest {})
        .await
        .map_err(CliError::server)?
        .into_inner();
    if a.json {
        let nodes: Vec<_> = s
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "node": n.node, "connected": n.connected,
                    "acked_revision": n.acked_revision, "nacked_revision": n.nacked_revision,
                    "nack_detail": n.nack_detail, "peer": n.peer,
                    "events_forwarded": n.events_forwarded, "replica": n.replica,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "revision": s.revision, "nodes": nodes,
                "events_received": s.events_received, "events_dropped": s.events_dropped,
                "events_recorded": s.events_recorded, "events_not_recorded": s.events_not_recorded,
            })
        );
    } else {
        println!("revision {}", s.revision);
        for n in &s.nodes {
            let mut line = format!(
                "{}\t{}\tacked {}",
                n.node,
                if n.connected {
                    "connected"
                } else {
                    "disconnected"
                },
                n.acked_revision
            );
            if !n.replica.is_empty() {
                line.push_str(&format!("\ton {}", n.replica));
            }
            if n.nacked_revision > 0 {
                line.push_str(&format!(
                    "\tNACKed {}: {}",
                    n.nacked_revision,
                    n.nack_detail.replace('\n', "; ")
                ));
            }
            println!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `corral events --server URL [--follow]`: the fleet's events (the server keeps no
/// history: without `--follow` there is nothing to show, so following is implied).
pub async fn watch_events(
    server: &ServerArgs,
    filter: pb::EventFilter,
    node: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    // Each replica streams the events of the nodes syncing with it (and its own grant
    // changes): with a replica list, every replica is followed and the streams merged.
    let urls = server.urls();
    let mut streams = tokio_stream::StreamMap::new();
    let mut last_err = None;
    for url in &urls {
        let opened = async {
            let mut c = server_client::events(&server.one(url)).await?;
            c.watch_events(pb::FleetWatchRequest {
                filter: Some(filter.clone()),
                node: node.clone().unwrap_or_default(),
            })
            .await
            .map_err(CliError::server)
        };
        match opened.await {
            Ok(r) => {
                streams.insert(url.clone(), r.into_inner());
            }
            Err(e) if urls.len() > 1 => {
                eprintln!("corral events: {url}: {e}; following the other replicas");
                last_err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    if streams.is_empty() {
        return Err(last_err.unwrap_or(CliError::NoServer));
    }
    let mut out = std::io::stdout().lock();
    while let Some((url, e)) = streams.next().await {
        let e = match e {
            Ok(e) => e,
            Err(status) if urls.len() > 1 => {
                eprintln!("corral events: {url}: {status}; following the other replicas");
                streams.remove(&url);
                if streams.is_empty() {
                    return Err(CliError::server(status));
                }
                continue;
            }
            Err(status) => return Err(CliError::server(status)),
        };
        let res = if json {
            serde_json::to_writer(&mut out, &render::event_json(&e, None))
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
        } else {
            writeln!(out, "{} {}", e.node, render::event_line(&e))
        };
        if let Err(e) = res.and_then(|()| out.flush()) {
            return CliError::from_write(e);
        }
    }
    Ok(())
}
