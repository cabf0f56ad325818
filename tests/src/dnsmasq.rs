//! A real resolver for the DNS tests: `dnsmasq` (Debian's `dnsmasq-base`) started by the test
//! on a loopback port of its own, answering only from the records the test gives it (no
//! upstream, no hosts file), logging every query; or on port 53 of 127.0.0.1 in a network
//! namespace of the test's (a pod's own resolver, as a container runtime's embedded DNS is).
//! Stopped by pid on drop.

use std::{
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    fleet::{Dir, free_port, stop_child},
    netns::Netns,
};

/// One record dnsmasq answers.
pub enum Record<'a> {
    /// `--address=/NAME/ADDR`: NAME and every name below it.
    Address(&'a str, &'a str),
    /// `--host-record=NAME,ADDR`: NAME only (a CNAME target must be one).
    Host(&'a str, &'a str),
    /// `--cname=ALIAS,TARGET`.
    Cname(&'a str, &'a str),
}

pub struct Dnsmasq {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub log: PathBuf,
    /// The namespace it runs in (`None`: the test's own).
    netns: Option<String>,
}

impl Dnsmasq {
    /// Starts dnsmasq on 127.0.0.1 (a free port), answering `records` with TTL `ttl` seconds.
    pub fn start(dir: &Dir, records: &[Record<'_>], ttl: u32) -> anyhow::Result<Self> {
        Self::start_at(dir, records, ttl, free_port()?, None)
    }

    /// Starts dnsmasq on 127.0.0.1:53 inside `netns`.
    pub fn start_in(
        dir: &Dir,
        records: &[Record<'_>],
        ttl: u32,
        netns: &Netns,
    ) -> anyhow::Result<Self> {
        Self::start_at(dir, records, ttl, 53, Some(netns))
    }

    fn start_at(
        dir: &Dir,
        records: &[Record<'_>],
        ttl: u32,
        port: u16,
        netns: Option<&Netns>,
    ) -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let tag = netns.map_or_else(|| port.to_string(), |n| n.name.clone());
        let log = dir.0.join(format!("dnsmasq-{tag}.log"));
        let mut cmd = match netns {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.name, "dnsmasq"]);
                c
            }
            None => Command::new("dnsmasq"),
        };
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            "--pid-file=",
            "--log-queries",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--local-ttl={ttl}"))
        .arg(format!("--log-facility={}", log.display()));
        for r in records {
            cmd.arg(match r {
                Record::Address(n, a) => format!("--address=/{n}/{a}"),
                Record::Host(n, a) => format!("--host-record={n},{a}"),
                Record::Cname(a, t) => format!("--cname={a},{t}"),
            });
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start dnsmasq (Debian package dnsmasq-base; .ci/run installs it)")?;
        let mut d = Self {
            child: Some(child),
            addr,
            log,
            netns: netns.map(|n| n.name.clone()),
        };
        d.wait_ready()?;
        Ok(d)
    }

    /// Answers a query (any reply) within 10 s, or fails with its log.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        // A minimal query: id 1, RD, one question `.` type NS class IN.
        let q = [0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1];
        let s = match &self.netns {
            Some(name) => Netns::socket_in(name)?,
            None => UdpSocket::bind("127.0.0.1:0")?,
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("dnsmasq exited with {st}:\n{}", self.log_text());
            }
            let _ = s.send_to(&q, self.addr);
            let mut buf = [0u8; 512];
            if s.recv_from(&mut buf).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("dnsmasq not answering in 10 s:\n{}", self.log_text());
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many queries for `name` dnsmasq logged.
    pub fn queries_for(&self, name: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("query[") && l.contains(&format!(" {name} from ")))
            .count()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = stop_child(&mut c);
        }
    }
}
