//! Zones by host name for a principal in a network namespace of its own, as a pod's
//! containers are: a container run by the real OCI runtime (`runc`), enrolled by its
//! createRuntime hook, joins a namespace the test made as a pod sandbox holds one. A real
//! resolver (`dnsmasq`) answers inside it on the pod's own 127.0.0.1:53, and the container's
//! `resolv.conf` names it (as a runtime's embedded DNS is named). The agent has no
//! `--dns-upstream`: it must listen at the principal's proxy address inside the pod's
//! namespace and ask the pod's own resolver from there, or nothing resolves.

use anyhow::Context as _;
use corral_tests::{
    dnsmasq::{Dnsmasq, Record},
    e2e::wait_for,
    fleet::{Dir, free_port},
    netns::Netns,
    probe_bin,
};

#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod agent_util;
#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod oci_util;

use agent_util::{Agent, events, status};
use oci_util::{Opts, bundle, lines, probe_args, setup, text};

const ID: &str = "spiffe://e2e.corral/agent/pod-dns";
/// No resolver listens here (the pod's namespace has nothing but its loopback): an answer
/// "from" it proves the redirect.
const ELSEWHERE: &str = "192.0.2.53:53";
/// The port the pod's targets listen at, inside its namespace.
const PORT: u16 = 7443;

fn policy() -> anyhow::Result<String> {
    let bindir = corral_tests::harness::bin_dir()?.display().to_string();
    Ok(format!(
        "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: e2e-pod-dns
spec:
  identities:
    - spiffe://e2e.corral/**
  mode: enforce
  defaultAction: deny
  zones:
    api: {{ hosts: [api.corral.test, alias.corral.test] }}
  connect:
    - {{ action: allow, zones: [api], ports: [{PORT}], protocols: [tcp] }}
  exec:
    - {{ action: allow, paths: [\"{bindir}/**\", \"/usr/bin/**\", \"/bin/**\"] }}
"
    ))
}

fn dns(kind: &str, name: &str) -> String {
    format!("{kind}:{name}@{ELSEWHERE}")
}

#[test]
fn a_pods_dns_is_answered_in_its_own_namespace_from_its_own_resolver() -> anyhow::Result<()> {
    let Some((spec, crun)) = setup("dns-pod")? else {
        return Ok(());
    };
    spec.write_policy(&policy()?)?;
    let ns = Netns::new("dnspod")?;
    let dir = Dir::new("dns-pod-resolver")?;
    let resolver = Dnsmasq::start_in(
        &dir,
        &[
            Record::Address("api.corral.test", "127.0.0.2"),
            Record::Host("target.corral.test", "127.0.0.4"),
            Record::Cname("alias.corral.test", "target.corral.test"),
            Record::Address("other.corral.test", "127.0.0.6"),
        ],
        60,
        &ns,
    )?;
    let dns_port = free_port()?.to_string();
    let agent = Agent::start(&spec, true, &["--dns-port", &dns_port])?;

    let ops = [
        format!("listen:127.0.0.2:{PORT}"),
        format!("listen:127.0.0.4:{PORT}"),
        format!("tcp:127.0.0.2:{PORT}"),
        dns("dns", "api.corral.test"),
        format!("tcp:127.0.0.2:{PORT}"),
        dns("dns", "other.corral.test"),
        format!("tcp:127.0.0.4:{PORT}"),
        dns("dnstcp", "alias.corral.test"),
        format!("tcp:127.0.0.4:{PORT}"),
    ];
    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
    let netns = ns.path();
    let c = bundle(
        &spec,
        &crun,
        "pod-dns",
        &Opts {
            annotations: &[("corral.dev/identity", ID)],
            hook: Some(&[]),
            args: probe_args(&ops)?,
            own_root: None,
            pod: None,
            netns: Some(&netns),
        },
    )?;
    let etc = c.bundle.join("rootfs/etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
    let out = c.run()?;
    let from = format!("from {ELSEWHERE}");
    assert_eq!(
        lines(&out),
        [
            "ok".to_owned(),
            "ok".to_owned(),
            "EPERM".to_owned(),
            format!("NOERROR 127.0.0.2 {from}"),
            "ok".to_owned(),
            format!("REFUSED - {from}"),
            "EPERM".to_owned(),
            format!("NOERROR 127.0.0.4 {from}"),
            "ok".to_owned(),
        ],
        "{}\nagent:\n{}\nresolver:\n{}",
        text(&out),
        agent.log_text(),
        resolver.log_text()
    );
    // The pod's own resolver was asked, from inside the pod's namespace (dnsmasq listens
    // nowhere else), and never for the refused name.
    assert!(
        resolver.queries_for("api.corral.test") >= 1,
        "{}",
        resolver.log_text()
    );
    assert!(
        resolver.queries_for("alias.corral.test") >= 1,
        "{}",
        resolver.log_text()
    );
    assert_eq!(
        resolver.queries_for("other.corral.test"),
        0,
        "{}",
        resolver.log_text()
    );

    let evs = wait_for(5, "the pod's dns events", || {
        let evs = events(&spec, &["--identity", ID])?;
        let n = evs.iter().filter(|e| e["kind"] == "dns").count();
        Ok((n >= 3).then_some(evs))
    })?;
    let refused = evs
        .iter()
        .find(|e| e["dns"]["name"] == "other.corral.test")
        .context("the refused query's event")?;
    assert_eq!(refused["decision"]["verdict"], "deny", "{refused}");
    assert_eq!(refused["principal"]["session"], c.id.as_str(), "{refused}");

    // The container is gone: the agent lets go of the pod's namespace (its sockets would
    // keep it alive).
    wait_for(5, "the binding in the pod's namespace to end", || {
        Ok(agent
            .log_text()
            .contains("no longer listening in a network namespace")
            .then_some(()))
    })?;
    drop(c);
    drop(resolver);
    Ok(())
}

/// The cgroup of process `pid` (cgroup v2).
fn cgroup_of(pid: u32) -> anyhow::Result<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line")?;
    Ok(corral_agent::paths::cgroup2_root()?.join(rel.trim_start_matches('/')))
}

#[test]
fn a_principals_process_that_turns_up_in_another_namespace_is_served_there() -> anyhow::Result<()> {
    // No hook and no enrolment from inside: a process of the pod's namespace joins a
    // principal's cgroup (as the pod watch enrols a pod whose processes already run), and
    // the agent's scan of its principals' processes must find the namespace.
    let Some((spec, _crun)) = setup("dns-pod-scan")? else {
        return Ok(());
    };
    spec.write_policy(&policy()?)?;
    let ns = Netns::new("dnsscan")?;
    let dir = Dir::new("dns-scan-resolver")?;
    let resolver = Dnsmasq::start_in(
        &dir,
        &[Record::Address("api.corral.test", "127.0.0.2")],
        60,
        &ns,
    )?;
    let dns_port = free_port()?.to_string();
    let agent = Agent::start(&spec, true, &["--dns-port", &dns_port])?;
    let mut held = std::process::Command::new(corral_tests::e2e::bin("corral")?)
        .arg("run")
        .arg("--socket")
        .arg(&spec.socket)
        .args(["--identity", ID, "--session", "scan", "--", "sleep", "60"])
        .spawn()?;
    let cg = wait_for(10, "the held principal's cgroup", || {
        let cg = cgroup_of(held.id())?;
        Ok(cg.starts_with(&spec.cgroups).then_some(cg))
    });
    let cg = match cg {
        Ok(cg) => cg,
        Err(e) => {
            let _ = corral_tests::fleet::stop_child(&mut held);
            return Err(e);
        }
    };
    // The process sees the pod's resolv.conf (a mount namespace of its own, with the file
    // bound over /etc/resolv.conf) and enters the pod's network namespace (nsenter: `ip netns
    // exec` would mount another /sys, without the cgroup tree).
    let resolv = dir.write("resolv.conf", "nameserver 127.0.0.1\n")?;
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec nsenter --net={} {} --cgroup {} \
         listen:127.0.0.2:{PORT} sleep:2500 {} tcp:127.0.0.2:{PORT}",
        resolv.display(),
        ns.path().display(),
        probe_bin()?.display(),
        cg.display(),
        dns("dns", "api.corral.test"),
    );
    let child = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // While it sleeps: the binding in its namespace is counted.
    let bound = wait_for(5, "a binding in the pod's namespace", || {
        let s = status(&spec)?;
        Ok((s["dns"]["namespaces"] == 1).then_some(()))
    });
    let out = child.wait_with_output()?;
    let _ = corral_tests::fleet::stop_child(&mut held);
    bound?;
    assert_eq!(
        lines(&out),
        [
            "ok".to_owned(),
            "ok".to_owned(),
            format!("NOERROR 127.0.0.2 from {ELSEWHERE}"),
            "ok".to_owned(),
        ],
        "{}\nagent:\n{}",
        text(&out),
        agent.log_text()
    );
    assert!(
        resolver.queries_for("api.corral.test") >= 1,
        "{}",
        resolver.log_text()
    );
    Ok(())
}
