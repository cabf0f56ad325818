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
//! Usage: `corral-event-bench [--procs P] [--threads T] [--count N] [--sendto] [--grpc-only]`:
//! P generator processes (each its own principal) of T threads, N calls per thread; connect()
//! by default, sendto() on an unconnected socket with `--sendto`; `--grpc-only` leaves out the
//! `corral events --json` subscriber.
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

fn flood(threads: usize, count: u64, sendto: bool) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = DENIED.parse()?;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<(u64, u64)> {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
                let a = SockAddr::from(addr);
                let (mut denied, mut other) = (0, 0);
                for _ in 0..count {
                    // connect() runs the connect4 hook; sendto() on the unconnected socket the
                    // sendmsg4 hook. Either is denied before any packet is built.
                    let r = if sendto {
                        s.send_to(b"x", &a).map(drop)
                    } else {
                        s.connect(&a)
                    };
                    match r {
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

/// `corral.v1.WatchEventsResponse` as a counting subscriber reads it: the event (field 1) is
/// skipped unparsed, only `subscriber_dropped` is decoded. The wire format is the real one.
#[derive(Clone, PartialEq, prost::Message)]
struct CountOnly {
    #[prost(uint64, tag = "2")]
    subscriber_dropped: u64,
}

/// A gRPC subscriber (tonic over the unix socket) that only counts: the agent → gRPC stage
/// without client-side decoding or rendering of the events.
fn grpc_subscriber(socket: PathBuf, seen: Arc<Seen>) -> anyhow::Result<()> {
    use corral_proto::v1 as pb;
    use tokio_stream::StreamExt as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_static("http://corral-agent.local")
            // Flow-control windows large enough that the agent is not paced by window updates.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await?;
        let codec = tonic_prost::ProstCodec::<pb::WatchEventsRequest, CountOnly>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/corral.v1.AgentService/WatchEvents",
        );
        let req = tonic::Request::new(pb::WatchEventsRequest {
            filter: Some(pb::EventFilter {
                identity: IDENTITY.into(),
                ..Default::default()
            }),
            follow: true,
        });
        let mut stream = grpc.server_streaming(req, path, codec).await?.into_inner();
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

/// What to run.
struct Opts {
    /// Generator threads, each its own socket.
    threads: usize,
    /// Calls per thread.
    count: u64,
    /// Generator processes (each `threads` threads), all in the one principal.
    procs: usize,
    /// sendto() instead of connect().
    sendto: bool,
    /// Also run `corral events --follow --json` as a second subscriber.
    cli: bool,
}

fn bench(o: &Opts) -> anyhow::Result<()> {
    let (threads, count) = (o.threads, o.count);
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
    let idle = corral_tests::harness::rss_kib(pid);

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
    let cli = Arc::new(Seen::default());
    let mut _sub = None;
    if o.cli {
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
        _sub = Some(Reaped(sub));
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
                peak.fetch_max(corral_tests::harness::rss_kib(pid), Ordering::Relaxed);
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

    // Several generator processes (each its own `corral run`, so each is one principal:
    // one identity, own session) start together.
    let start = Instant::now();
    let gens = (0..o.procs.max(1))
        .map(|_| {
            Command::new(&corral)
                .args(["run", "--identity", IDENTITY, "--socket"])
                .arg(&socket)
                .arg("--")
                .arg(&me)
                .args(["flood", &threads.to_string(), &count.to_string()])
                .arg(if o.sendto { "sendto" } else { "connect" })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (mut generated, mut gen_secs) = (0u64, 0f64);
    for g in gens {
        let gen_out = g.wait_with_output()?;
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
        generated += field("generated")? as u64;
        gen_secs = gen_secs.max(field("secs")?);
    }

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
    // Each generator's own exec is one more event of its principal.
    let expected = generated + o.procs.max(1) as u64;
    let ingest_secs = published_at.duration_since(start).as_secs_f64();

    println!(
        "event pipeline benchmark ({} process(es) x {threads} thread(s) x {count} denied {}, {} CPUs)",
        o.procs.max(1),
        if o.sendto { "sendto()s" } else { "connect()s" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  generated          {generated} calls in {gen_secs:.3} s ({:.0}/s, enforcement with events on)",
        generated as f64 / gen_secs
    );
    println!(
        "  kernel -> agent    published {published} + dropped in kernel {kernel} = {} (expected {expected}: calls + 1 exec per generator); {:.0} events/s",
        published + kernel,
        published as f64 / ingest_secs.max(1e-9)
    );
    let mut ok = published + kernel == expected;
    let mut dropped_sum = 0;
    let subscribers: &[(&str, &Arc<Seen>)] = if o.cli {
        &[("gRPC (count only)", &grpc), ("corral events --json", &cli)]
    } else {
        &[("gRPC (count only)", &grpc)]
    };
    for (name, seen) in subscribers {
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
        let sendto = args.get(3).map(String::as_str) == Some("sendto");
        return flood(threads, count, sendto);
    }
    let value = |flag: &str, default: u64| -> anyhow::Result<u64> {
        match args.iter().position(|a| a == flag) {
            Some(i) => Ok(args.get(i + 1).context("a value")?.parse()?),
            None => Ok(default),
        }
    };
    let flag = |f: &str| args.iter().any(|a| a == f);
    bench(&Opts {
        threads: usize::try_from(value("--threads", 1)?)?,
        count: value("--count", 1_000_000)?,
        procs: usize::try_from(value("--procs", 1)?)?,
        sendto: flag("--sendto"),
        cli: !flag("--grpc-only"),
    })
}
