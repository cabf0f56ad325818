//! `corral-enforcer-fixture`: a test tool that stands in for the agent process in the pinning
//! tests (the daemon is tested end to end elsewhere). It loads the real programs with pins, like
//! the agent does, optionally enrols a cgroup under a default-deny policy, prints `ready` and
//! waits to be killed.
//!
//! Usage: `corral-enforcer-fixture --pins DIR [--enrol CGROUP] | --pins DIR --uninstall`
use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use corral_agent::{cgroup, ebpf::Enforcer, ebpf::PinDir, paths};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    let pins = PinDir::new(value("--pins").context("--pins DIR is required")?);
    if args.iter().any(|a| a == "--uninstall") {
        pins.uninstall()?;
        return Ok(());
    }
    let root = paths::cgroup2_root()?;
    let mut e = Enforcer::start(&root, Some(&pins))?;
    if let Some(cg) = value("--enrol") {
        let id = cgroup::id(&cg)?;
        let level = cgroup::level(&root, &cg).context("cgroup outside the cgroup2 root")?;
        e.maps().add_principal(id, level, 1, Some(0))?;
        let set = corral_tests::build::set(
            1,
            vec![
                corral_tests::build::policy("fixture")
                    .zone("local", &["127.0.0.0/8"])
                    .build(),
            ],
        );
        e.maps().apply(&set, |_, _| Some(0))?;
    }
    println!("ready adopted={}", e.adopted());
    std::io::stdout().flush()?;
    loop {
        std::thread::park();
    }
}
