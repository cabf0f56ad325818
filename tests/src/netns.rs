//! A named network namespace for a test (`ip netns add`, loopback up), as a pod's sandbox
//! holds one: containers join it by path, a resolver can run in it. Deleted on drop.

use std::{
    os::fd::AsFd as _,
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{Context as _, ensure};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2; .ci/run installs it)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

impl Netns {
    /// `corral-<tag>-<pid>`, with its loopback up.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = format!("corral-{tag}-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's file (what an OCI config's `network` namespace `path` names).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A UDP socket on 127.0.0.1 inside the namespace named `name`.
    pub fn socket_in(name: &str) -> anyhow::Result<std::net::UdpSocket> {
        run_in(name, || std::net::UdpSocket::bind("127.0.0.1:0"))
    }
}

/// Runs `f` on a thread inside the namespace named `name` (sockets it creates stay there).
fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let file = std::fs::File::open(PathBuf::from("/run/netns").join(name))?;
    std::thread::spawn(move || {
        move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in the namespace panicked"))?
    .context("in the network namespace")
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
