//! `corral-event-bench`: events per second from the kernel to a gRPC subscriber, with drop
//! accounting, and the agent's RSS idle and under that load. Run by `cargo xtask bench events`
//! (release binaries, as root).
//!
//! It starts a real `corral-agent` (own socket, state, pins under bpffs, `--uninstall`), a
//! subscriber (`corral events --follow --json`, counted line by line), and a load generator
//! inside a principal (`corral run -- corral-event-bench flood ...`: threads calling connect()
//! on a UDP socket to a denied loopback port, one deny event each). Then it checks:
//! - kernel → agent: published + dropped in kernel == generated (+ the generator's exec event);
//! - agent → subscriber: received + dropped for the subscriber == published.
//!
//! Usage: `corral-event-bench [--threads T] [--count N]` (N connects per thread).
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use socket2::{Domain, SockAddr, Socket, Type};

const IDENTITY: &str = "spiffe://bench.corral/load";
const DENIED: &str = "127.0.0.1:9";

fn flood(threads: usize, count: u64) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = DENIED.parse()?;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<(u64, u64)> {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
                let a = SockAddr::from(addr);
                let (mut denied, mut other) = (0, 0);
                for _ in 0..count {
                    match s.connect(&a) {
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => denied += 1,
                        _ => other += 1,
                    }
                }
                Ok((denied, other))
            })
        })
        .collect();
    let (mut denied, mut other) = (0, 0);
    for h in handles {
        let (d, o) = h
            .join()
            .map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
        denied += d;
        other += o;
    }
    println!(
        "generated={} denied={denied} other={other} secs={:.6}",
        denied + other,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What a subscriber saw: messages received, the last `subscriber_dropped` it was told, and
/// when the last message arrived.
#[derive(Default)]
struct Seen {
    received: AtomicU64,
    reported_dropped: AtomicU64,
    last_at: std::sync::Mutex<Option<Instant>>,
}

/// A gRPC subscriber (tonic over the unix socket) that only counts: the agent → gRPC stage
/// without any client-side rendering.
fn grpc_subscriber(socket: PathBuf, seen: Arc<Seen>) -> anyhow::Result<()> {
    use corral_proto::v1 as pb;
    use tokio_stream::StreamExt as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_static("http://corral-agent.local")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await?;
        let mut c = pb::agent_service_client::AgentServiceClient::new(channel);
        let mut stream = c
            .watch_events(pb::WatchEventsRequest {
                filter: Some(pb::EventFilter {
                    identity: IDENTITY.into(),
                    ..Default::default()
                }),
                follow: true,
            })
            .await?
            .into_inner();
        while let Some(r) = stream.next().await {
            let r = r?;
            seen.received.fetch_add(1, Ordering::Relaxed);
            seen.reported_dropped
                .fetch_max(r.subscriber_dropped, Ordering::Relaxed);
            if let Ok(mut g) = seen.last_at.lock() {
                *g = Some(Instant::now());
            }
        }
        Ok(())
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // Agent: SIGTERM so it uninstalls its pins; others: the same, then SIGKILL.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the bench's files and principals' cgroup directory, also when it fails.
struct Cleanup {
    dir: PathBuf,
    cgroups: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = corral_agent::cgroup::remove(&self.cgroups);
    }
}

fn status(corral: &Path, socket: &Path) -> anyhow::Result<Value> {
    let out = Command::new(corral)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()?;
    ensure!(
        out.status.success(),
        "corral status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn counter(s: &Value, k: &str) -> u64 {
    s[k].as_u64().unwrap_or(0)
}

fn bench(threads: usize, count: u64) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let bindir = me.parent().context("binary dir")?.to_path_buf();
    let agent_bin = bindir.join("corral-agent");
    let corral = bindir.join("corral");
    for b in [&agent_bin, &corral] {
        ensure!(b.exists(), "{} is not built", b.display());
    }
    let bpffs = corral_agent::paths::find_mount("bpf")?;
    let id = format!("bench-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("corral-{id}"));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("agent.sock");
    let policy = dir.join("policy.yaml");
    let pins = bpffs.join(format!("corral-{id}"));
    let cgroups = corral_agent::paths::cgroup2_root()?
        .join("corral-test")
        .join(&id);
    std::fs::write(
        &policy,
        format!(
            "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata: {{ name: bench }}
spec:
  identities: [\"spiffe://bench.corral/**\"]
  mode: enforce
  defaultAction: deny
  zones:
    local: {{ cidrs: [127.0.0.0/8] }}
  connect:
    - {{ action: deny, zones: [local], ports: [9] }}
  exec:
    - {{ action: allow, paths: [\"{}/**\"] }}
",
            bindir.display()
        ),
    )?;
    // Dropped last (declared first): after the agent has stopped.
    let _cleanup = Cleanup {
        dir: dir.clone(),
        cgroups: cgroups.clone(),
    };
    let agent = Command::new(&agent_bin)
        .arg("--policy")
        .arg(&policy)
        .arg("--socket")
        .arg(&socket)
        .arg("--pin-dir")
        .arg(&pins)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--cgroup-dir")
        .arg(&cgroups)
        .arg("--uninstall")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log"))?)
        .spawn()?;
    let agent = Reaped(agent);
    let pid = agent.0.id();
    let t0 = Instant::now();
    while status(&corral, &socket).is_err() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("agent not ready: see {}", dir.join("agent.log").display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(pid);

    // Two subscribers, each with its own queue in the agent: a gRPC client that only counts,
    // and `corral events --follow --json` (decode + JSON + write), counted line by line.
    let grpc = Arc::new(Seen::default());
    {
        let (socket, grpc) = (socket.clone(), grpc.clone());
        std::thread::spawn(move || {
            if let Err(e) = grpc_subscriber(socket, grpc) {
                eprintln!("gRPC subscriber: {e:#}");
            }
        });
    }
    let mut sub = Command::new(&corral)
        .args([
            "events",
            "--follow",
            "--json",
            "--identity",
            IDENTITY,
            "--socket",
        ])
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()?;
    let out = sub.stdout.take().context("subscriber stdout")?;
    let _sub = Reaped(sub);
    let cli = Arc::new(Seen::default());
    {
        let cli = cli.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                cli.received.fetch_add(1, Ordering::Relaxed);
                if let Some(d) = line
                    .rsplit_once("\"subscriber_dropped\":")
                    .and_then(|(_, r)| r.split([',', '}']).next()?.parse().ok())
                {
                    cli.reported_dropped.fetch_max(d, Ordering::Relaxed);
                }
                if let Ok(mut g) = cli.last_at.lock() {
                    *g = Some(Instant::now());
                }
            }
        });
    }
    let peak = Arc::new(AtomicU64::new(idle));
    let done = Arc::new(AtomicBool::new(false));
    {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = status(&corral, &socket)?;
    ensure!(
        counter(&before, "events_dropped_subscribers") == 0,
        "no losses before the load"
    );

    let start = Instant::now();
    let gen_out = Command::new(&corral)
        .args(["run", "--identity", IDENTITY, "--socket"])
        .arg(&socket)
        .arg("--")
        .arg(&me)
        .args(["flood", &threads.to_string(), &count.to_string()])
        .output()?;
    ensure!(
        gen_out.status.success(),
        "generator: {}",
        String::from_utf8_lossy(&gen_out.stderr)
    );
    let line = String::from_utf8_lossy(&gen_out.stdout).trim().to_owned();
    let field = |k: &str| -> anyhow::Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .context(format!("{k} in {line:?}"))?
            .parse::<f64>()
            .map_err(Into::into)
    };
    let generated = field("generated")? as u64;
    let gen_secs = field("secs")?;

    // Wait until the agent and the subscribers have caught up (counters stable for 500 ms).
    let mut last = (u64::MAX, u64::MAX, u64::MAX);
    let mut stable_since = Instant::now();
    let mut published_at = Instant::now();
    let mut last_published = u64::MAX;
    let after = loop {
        let s = status(&corral, &socket)?;
        let published = counter(&s, "events_delivered");
        if published != last_published {
            last_published = published;
            published_at = Instant::now();
        }
        let now = (
            published + counter(&s, "events_dropped_kernel"),
            grpc.received.load(Ordering::Relaxed),
            cli.received.load(Ordering::Relaxed),
        );
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() > Duration::from_millis(500) {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("counters did not settle in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    done.store(true, Ordering::Relaxed);
    let under_load = peak.load(Ordering::Relaxed);
    let delta = |k: &str| counter(&after, k) - counter(&before, k);
    let published = delta("events_delivered");
    let kernel = delta("events_dropped_kernel");
    let sub_dropped_total = delta("events_dropped_subscribers");
    // The generator's own exec is one more event of the principal.
    let expected = generated + 1;
    let ingest_secs = published_at.duration_since(start).as_secs_f64();

    println!(
        "event pipeline benchmark ({threads} threads x {count} denied connects, {} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  generated          {generated} connects in {gen_secs:.3} s ({:.0}/s, enforcement with events on)",
        generated as f64 / gen_secs
    );
    println!(
        "  kernel -> agent    published {published} + dropped in kernel {kernel} = {} (expected {expected}: connects + 1 exec); {:.0} events/s",
        published + kernel,
        published as f64 / ingest_secs.max(1e-9)
    );
    let mut ok = published + kernel == expected;
    let mut dropped_sum = 0;
    for (name, seen) in [("gRPC (count only)", &grpc), ("corral events --json", &cli)] {
        let got = seen.received.load(Ordering::Relaxed);
        let dropped = published.saturating_sub(got);
        dropped_sum += dropped;
        let span = seen
            .last_at
            .lock()
            .ok()
            .and_then(|t| *t)
            .map_or(0.0, |t| t.duration_since(start).as_secs_f64());
        println!(
            "  agent -> {name:<21} received {got} + dropped for it {dropped} = {published}; told it lost >= {}; {:.0} events/s",
            seen.reported_dropped.load(Ordering::Relaxed),
            got as f64 / span.max(1e-9)
        );
        ok &= seen.reported_dropped.load(Ordering::Relaxed) <= dropped;
    }
    println!(
        "  subscriber drops   counted by the agent {sub_dropped_total}, published - received summed over subscribers {dropped_sum}"
    );
    println!("  agent RSS          idle {idle} KiB, peak under load {under_load} KiB");
    ok &= sub_dropped_total == dropped_sum;
    ensure!(ok, "accounting does not add up (see above)");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("flood") {
        let threads = args.get(1).context("threads")?.parse()?;
        let count = args.get(2).context("count")?.parse()?;
        return flood(threads, count);
    }
    let value = |flag: &str, default: u64| -> anyhow::Result<u64> {
        match args.iter().position(|a| a == flag) {
            Some(i) => Ok(args.get(i + 1).context("a value")?.parse()?),
            None => Ok(default),
        }
    };
    let threads = usize::try_from(value("--threads", 1)?)?;
    let count = value("--count", 1_000_000)?;
    bench(threads, count)
}
