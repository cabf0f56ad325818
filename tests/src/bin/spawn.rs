//! `corral-spawn`: runs one program inside a cgroup, without a shell, and reports how it ended.
//!
//! Usage: `corral-spawn --cgroup DIR [--cwd DIR] PATH [ARG...]`. It joins the cgroup, then
//! spawns PATH with the ARGs (fork + execve in the child, which inherits the cgroup; a relative
//! PATH is resolved in `--cwd`), waits, and prints one line:
//! `pid=<pid> exit=<code>`, `pid=<pid> signal=<n>`, or `spawn=<ERRNO>` when the exec itself
//! failed (e.g. `spawn=EPERM` from a BPF LSM deny).
use std::os::unix::process::ExitStatusExt as _;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    anyhow::ensure!(
        args.next().as_deref() == Some("--cgroup"),
        "usage: corral-spawn --cgroup DIR [--cwd DIR] PATH [ARG...]"
    );
    let dir = args.next().context("--cgroup needs a directory")?;
    let mut path = args.next().context("PATH is required")?;
    let mut cwd = None;
    if path == "--cwd" {
        cwd = Some(args.next().context("--cwd needs a directory")?);
        path = args.next().context("PATH is required")?;
    }
    std::fs::write(format!("{dir}/cgroup.procs"), "0")
        .with_context(|| format!("join cgroup {dir}"))?;
    let mut cmd = std::process::Command::new(&path);
    cmd.args(args);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    match cmd.spawn() {
        Ok(mut child) => {
            let pid = child.id();
            let status = child.wait().context("wait for the child")?;
            match (status.code(), status.signal()) {
                (Some(code), _) => println!("pid={pid} exit={code}"),
                (None, Some(sig)) => println!("pid={pid} signal={sig}"),
                (None, None) => println!("pid={pid} unknown"),
            }
        }
        Err(e) => match e.raw_os_error() {
            Some(libc::EPERM) => println!("spawn=EPERM"),
            Some(libc::EACCES) => println!("spawn=EACCES"),
            Some(libc::ENOENT) => println!("spawn=ENOENT"),
            Some(n) => println!("spawn=errno{n}"),
            None => println!("spawn={e}"),
        },
    }
    Ok(())
}
