//! Helpers shared by the end-to-end tests that run Corral's real binaries as processes.

use std::{
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure};

use crate::probe_bin;

/// Path of one of the workspace's binaries (`corral-agent`, `corral`, `corral-server`, ...),
/// built beside the probe by `cargo xtask test`.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = probe_bin()?.with_file_name(name);
    ensure!(
        p.exists(),
        "{} is not built: run `cargo xtask test`, or `cargo build -p corral-agent -p corral-cli \
         -p corral-server -p corral-tests` before `cargo test -p corral-tests`",
        p.display()
    );
    Ok(p)
}

/// The JSON lines a process prints (lines that are not JSON skipped), read on a thread until
/// its stdout closes or the receiver is dropped.
pub fn json_lines(
    stdout: std::process::ChildStdout,
) -> std::sync::mpsc::Receiver<serde_json::Value> {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    rx
}

/// A child process killed by pid and reaped on drop.
pub struct Reaped(pub Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `secs`.
pub fn wait_for<T>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The probe's UDP connect operation to a loopback port.
pub fn udp(port: u16) -> String {
    format!("udp:127.0.0.1:{port}")
}
