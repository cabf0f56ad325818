//! `corral-simnode`: a TEST AND BENCHMARK TOOL, not a node agent. Runs N simulated nodes in
//! one process, each with its own `NodeSync` stream driven by the agent's real sync client
//! (`corral_agent::daemon::sync`): it compiles every snapshot with the node's compiler,
//! checks the node limits, and ACKs (or NACKs) — and loads nothing into the kernel.
//!
//! `corral-simnode --server URL --nodes 100 [--prefix sim] [--max-rules N]`; stops on
//! SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use anyhow::Context as _;
use corral_agent::daemon::sync::{self, ClientConfig, SnapshotSink, SyncStatus};
use corral_policy::snapshot::{check_limits, compile_snapshot};
use corral_proto::v1 as pb;
use corral_runtime::shutdown::{self, Shutdown};

/// A node that only compiles: the revision it would enforce.
struct Simulated {
    revision: AtomicU64,
    max_rules: Option<usize>,
}

impl SnapshotSink for Simulated {
    fn revision(&self) -> u64 {
        self.revision.load(Ordering::Relaxed)
    }

    fn apply(&self, s: &pb::Snapshot) -> Result<(), String> {
        let file = format!("server revision {}", s.revision);
        let c = compile_snapshot(&file, s.revision, &s.policies_yaml)
            .map_err(|e| format!("policy rejected:\n{e}"))?;
        check_limits(&c, self.max_rules).map_err(|e| e.to_string())?;
        self.revision.store(s.revision, Ordering::Relaxed);
        Ok(())
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let server = arg(&args, "--server").context("--server URL is required")?;
    let nodes: usize = arg(&args, "--nodes")
        .map_or(Ok(1), |n| n.parse())
        .context("--nodes N")?;
    let prefix = arg(&args, "--prefix").unwrap_or_else(|| "sim".into());
    let max_rules = arg(&args, "--max-rules")
        .map(|n| n.parse())
        .transpose()
        .context("--max-rules N")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stop = Shutdown::new();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..nodes {
            let sink = Arc::new(Simulated {
                revision: AtomicU64::new(0),
                max_rules,
            });
            tasks.spawn(sync::run(
                ClientConfig::new(&server, &format!("{prefix}-{i}")),
                sink,
                None,
                Arc::new(SyncStatus::default()),
                stop.subscribe(),
            ));
        }
        eprintln!("corral-simnode: {nodes} simulated nodes syncing with {server}");
        let sig = shutdown::signal().await?;
        eprintln!("corral-simnode: {sig}, stopping");
        stop.trigger();
        while tasks.join_next().await.is_some() {}
        anyhow::Ok(())
    })
}
