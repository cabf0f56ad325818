//! `cargo xtask bench`: benchmarks reported as ratios against a baseline measured in the same
//! run (this machine is small and noisy; absolute numbers mean little).
//!
//! Sections: `compile` (policy compile time, and load into the kernel maps when root),
//! `enforce` (connect/exec overhead of the kernel programs: enrolled vs un-enrolled vs no
//! programs at all, with 10 and 10k rules), `events` (kernel → agent → gRPC subscriber events/s
//! with drop accounting, agent RSS), `fleet` (policy server: apply → every simulated node
//! ACKed, p50/p99 with 1, 100 and 1000 nodes; server RSS), `apply` (policy server + a real
//! agent: apply → enforced in the real kernel, p50/p99 as seen by a process in a principal),
//! `spiffe` (the SPIFFE Workload API: X.509/JWT-SVID issuance p50/p99 against a bundle fetch,
//! and the agent's memory per principal holding credentials), `dns` (zones by host name: DNS proxy latency and lookups/s against dnsmasq asked directly,
//! connect overhead with 10k learned addresses against CIDR-only, memory with 100k).

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which sections to run (default: all).
    #[arg(value_enum)]
    sections: Vec<Section>,
    /// Applies measured by the `apply` section.
    #[arg(long, default_value_t = 100)]
    apply_rounds: usize,
    /// `fleet`: also run the server as N replicas on a real PostgreSQL (root), against one,
    /// with 3000 simulated nodes: apply → all ACKed and failover after a replica is killed.
    #[arg(long)]
    replicas: Option<usize>,
    /// Passed to `corral-event-bench` (after `--`), e.g. `-- --procs 2 --grpc-only`.
    #[arg(last = true)]
    events_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Compile,
    Enforce,
    Events,
    Fleet,
    Apply,
    Dns,
    Spiffe,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let all = args.sections.is_empty();
    if all || args.sections.contains(&Section::Compile) {
        compile_bench()?;
    }
    if all || args.sections.contains(&Section::Enforce) {
        enforce_bench()?;
    }
    if all || args.sections.contains(&Section::Events) {
        events_bench(&args.events_args)?;
    }
    if all || args.sections.contains(&Section::Fleet) {
        fleet_bench(args.replicas)?;
    }
    if all || args.sections.contains(&Section::Apply) {
        apply_bench(args.apply_rounds)?;
    }
    if all || args.sections.contains(&Section::Dns) {
        dns_bench()?;
    }
    if all || args.sections.contains(&Section::Spiffe) {
        spiffe_bench()?;
    }
    Ok(())
}

/// Packages of every release-built benchmark binary. Each benchmark builds with this same set,
/// so cargo unifies features once and one benchmark's build does not rebuild another's
/// dependencies (a narrower `--package` list resolves features differently).
const BENCH_PACKAGES: [&str; 4] = [
    "corral-agent",
    "corral-cli",
    "corral-server",
    "corral-tests",
];

/// Release build of the binaries `bins` (found in [`BENCH_PACKAGES`]).
fn build_release(bins: &[&str]) -> anyhow::Result<()> {
    let mut c = crate::cmd::cargo();
    c.current_dir(crate::cmd::root())
        .args(["build", "--release"]);
    for p in BENCH_PACKAGES {
        c.args(["--package", p]);
    }
    for b in bins {
        c.args(["--bin", b]);
    }
    crate::cmd::run(&mut c)
}

/// A binary cargo built into the shared target dir (`CARGO_TARGET_DIR`, else `target/`).
fn built(profile: &str, name: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::cmd::root().join("target"))
        .join(profile)
        .join(name)
}

/// `bin`, run as root: directly when we are root, else through `sudo -E`.
fn as_root(bin: &std::path::Path) -> std::process::Command {
    if crate::cmd::is_root() {
        std::process::Command::new(bin)
    } else {
        let mut c = std::process::Command::new("sudo");
        c.arg("-E").arg(bin);
        c
    }
}

/// Builds the test binaries (the bench and the probe it times) and runs `corral-bench` as root.
pub fn enforce_bench() -> anyhow::Result<()> {
    let root = crate::cmd::root();
    crate::cmd::run(crate::cmd::cargo().current_dir(&root).args([
        "build",
        "--package",
        "corral-tests",
        "--bins",
    ]))?;
    crate::cmd::run(&mut as_root(&built("debug", "corral-bench")))
}

/// Policy compile (parse + validate + compile + expand) for 1, 100 and 10k rules, and load
/// into the real kernel maps (through `sudo -E` when not root). The table is printed by the
/// agent's `compile` bench target (`agent/benches/compile.rs`), which uses the agent library;
/// xtask stays free of it.
pub fn compile_bench() -> anyhow::Result<()> {
    let mut c = crate::cmd::cargo();
    c.current_dir(crate::cmd::root())
        .args(["bench", "-p", "corral-agent", "--bench", "compile"]);
    crate::test::sudo_runner_if_needed(&mut c);
    crate::cmd::run(&mut c)
}

/// Event pipeline: events/s from the kernel to a gRPC subscriber with drop accounting
/// (delivered + dropped == generated at each stage), and the agent's RSS idle and under load.
/// Release binaries (agent, CLI, `corral-event-bench` from `tests/src/bin/event_bench.rs`), run
/// as root (through `sudo -E` when not).
pub fn events_bench(extra: &[String]) -> anyhow::Result<()> {
    build_release(&["corral-agent", "corral", "corral-event-bench"])?;
    let bench = built("release", "corral-event-bench");
    let command = || as_root(&bench);
    if extra.is_empty() {
        // The figure (kernel → one gRPC subscriber), then with `corral events --json`
        // as a second, slower subscriber on the same two cores.
        crate::cmd::run(command().arg("--grpc-only"))?;
        return crate::cmd::run(&mut command());
    }
    crate::cmd::run(command().args(extra))
}

/// Policy distribution: apply → all nodes ACKed (p50/p99) with 1, 100 and 1000 simulated nodes
/// (`corral-simnode`: the agent's sync client, compiling and ACKing, no kernel), and the
/// server's RSS. Release binaries; no root needed.
/// With `replicas`: then N replicas on PostgreSQL against one (`corral-fleet-bench --replicas`).
pub fn fleet_bench(replicas: Option<usize>) -> anyhow::Result<()> {
    build_release(&["corral-server", "corral-simnode", "corral-fleet-bench"])?;
    crate::cmd::run(&mut std::process::Command::new(built(
        "release",
        "corral-fleet-bench",
    )))?;
    if let Some(n) = replicas {
        let mut c = std::process::Command::new(built("release", "corral-fleet-bench"));
        c.args(["--replicas", &n.to_string()]);
        crate::cmd::run(&mut c)?;
    }
    Ok(())
}

/// Apply → enforced on a real node: `corral-apply-bench` starts a real `corral-server` and a
/// real `corral-agent --server`, a prober (`corral-probe watch`) in an enrolled principal, and
/// times `rounds` applies that flip the probed port between allow and deny (p50/p99; goal
/// p99 ≤ 100 ms). Release binaries; root (through `sudo -E` when not).
pub fn apply_bench(rounds: usize) -> anyhow::Result<()> {
    build_release(&[
        "corral-server",
        "corral-agent",
        "corral",
        "corral-probe",
        "corral-apply-bench",
    ])?;
    crate::cmd::run(
        as_root(&built("release", "corral-apply-bench"))
            .arg("--rounds")
            .arg(rounds.to_string()),
    )
}

/// SPIFFE Workload API: issuance latency against a bundle fetch, and the agent's memory per
/// principal holding credentials (`tests/src/bin/spiffe_bench.rs`), as root.
pub fn spiffe_bench() -> anyhow::Result<()> {
    build_release(&[
        "corral-agent",
        "corral",
        "corral-spawn",
        "corral-spiffe-probe",
        "corral-spiffe-bench",
    ])?;
    crate::cmd::run(&mut as_root(&built("release", "corral-spiffe-bench")))
}

/// Zones by host name (`corral-dns-bench`): a real agent's DNS proxy against a real dnsmasq,
/// and the real programs with 1/10k/100k learned addresses. Release binaries; root (through
/// `sudo -E` when not); needs `dnsmasq` (Debian `dnsmasq-base`).
pub fn dns_bench() -> anyhow::Result<()> {
    build_release(&["corral-agent", "corral", "corral-probe", "corral-dns-bench"])?;
    crate::cmd::run(&mut as_root(&built("release", "corral-dns-bench")))
}
