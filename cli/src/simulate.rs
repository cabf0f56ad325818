//! `corral policy suggest --events FILE|--server URL` (a policy from what was recorded:
//! `corral_policy::suggest`) and `corral policy simulate -f CANDIDATE --events FILE|--server
//! URL`: the calls recorded in `corral events --json` output (or an `--audit-log` file: the
//! same lines), or in the central server's event history (`EventService.ListEvents`, turned
//! into the same JSON), replayed through a candidate policy (`corral_policy::simulate`); exits
//! 1 when a call that went through would be blocked, so CI can gate a policy change.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::Args;
use corral_policy::{
    PolicyError,
    eval::ConnectCall,
    simulate::{Call, Recorded, Report, simulate},
};
use corral_proto::v1 as pb;
use serde_json::{Value, json};

use crate::error::CliError;

/// Where the recorded calls come from: a file, or the central server's event history.
#[derive(Debug, Args)]
pub struct Source {
    /// Recorded events: `corral events --json` output or an audit log (one JSON object per
    /// line).
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    events: Option<PathBuf>,
    /// The fleet's recorded events, from this corral-server's event history
    /// (`--event-history`), instead of a file.
    #[arg(long)]
    server: Option<String>,
    /// With --server: only this node's events.
    #[arg(long, requires = "server")]
    node: Option<String>,
    #[command(flatten)]
    tls: corral_runtime::tls::TlsFiles,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The candidate policy file.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    #[command(flatten)]
    source: Source,
    /// Only calls at or after this time (`2026-12-06T01:00:00Z`, or Unix seconds).
    #[arg(long)]
    since: Option<String>,
    /// Only calls at or before this time.
    #[arg(long)]
    until: Option<String>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn proto_number(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmp" | "icmpv6" => Some(1),
        _ => None,
    }
}

/// The replayable call of one event line, if it is one (`Ok(None)`: another kind of event).
fn recorded(v: &Value) -> Result<Option<Recorded>, String> {
    let (Some(p), Some(d)) = (v.get("principal"), v.get("decision")) else {
        return Ok(None);
    };
    if p.is_null() || d.is_null() {
        return Ok(None);
    }
    let s = |x: &Value, k: &str| x.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let seq = v.get("seq").and_then(Value::as_u64).unwrap_or(0);
    let call = match v.get("kind").and_then(Value::as_str) {
        Some("connect") => {
            let c = &v["connect"];
            let (family, dest, proto) = (s(c, "family"), s(c, "destination"), s(c, "protocol"));
            if family == "unix" {
                (Call::Unix(dest.clone()), format!("unix {dest}"))
            } else {
                let Some(proto_n) = proto_number(&proto) else {
                    return Ok(None);
                };
                let addr: IpAddr = dest
                    .parse()
                    .map_err(|e| format!("destination {dest:?}: {e}"))?;
                let port = c.get("port").and_then(Value::as_u64).unwrap_or(0);
                let port = u16::try_from(port).map_err(|_| format!("port {port}"))?;
                let shown = if addr.is_ipv6() {
                    format!("[{addr}]:{port}")
                } else {
                    format!("{addr}:{port}")
                };
                (
                    Call::Connect(ConnectCall {
                        addr,
                        port,
                        proto: proto_n,
                    }),
                    format!("connect {proto} {shown}"),
                )
            }
        }
        Some("exec") => {
            let path = s(&v["exec"], "path");
            (Call::Exec(path.clone()), format!("exec {path}"))
        }
        _ => return Ok(None),
    };
    Ok(Some(Recorded {
        identity: s(p, "identity"),
        session: s(p, "session"),
        went_through: s(d, "verdict") != "deny",
        by_grant: s(d, "reason") == "grant",
        what: format!("{} (seq {seq})", call.1),
        call: call.0,
        name: v
            .get("connect")
            .map(|c| s(c, "name"))
            .filter(|n| !n.is_empty()),
        time_unix_nano: v.get("time_unix_nano").and_then(Value::as_u64).unwrap_or(0),
        calls: 1 + v
            .get("repeats")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0),
    }))
}

/// Where the calls came from (for messages), and the replayable calls in order: from the file,
/// or from the server's history within the time window and for `identity` (a pattern).
async fn recorded_calls(
    src: &Source,
    since: Option<u64>,
    until: Option<u64>,
    identity: Option<&str>,
) -> Result<(String, Vec<Recorded>), CliError> {
    let (Some(url), None) = (&src.server, &src.events) else {
        let path = src.events.as_deref().unwrap_or(std::path::Path::new("-"));
        return read_events(path);
    };
    let server = crate::server_client::ServerArgs {
        server: url.clone(),
        tls: src.tls.clone(),
    };
    let req = pb::ListEventsRequest {
        filter: Some(pb::EventFilter {
            identity: identity.unwrap_or_default().to_owned(),
            ..pb::EventFilter::default()
        }),
        node: src.node.clone().unwrap_or_default(),
        since_unix_nano: since.unwrap_or(0),
        until_unix_nano: until.unwrap_or(0),
        limit: 0,
    };
    let events = {
        use tokio_stream::StreamExt as _;
        let mut c = crate::server_client::events(&server).await?;
        let mut stream = c
            .list_events(req)
            .await
            .map_err(CliError::server)?
            .into_inner();
        let mut out = Vec::new();
        while let Some(e) = stream.next().await {
            out.push(e.map_err(CliError::server)?);
        }
        out
    };
    let mut calls = Vec::new();
    for e in &events {
        let v = corral_events::render::event_json(e, None);
        if let Some(r) = recorded(&v).map_err(|m| {
            CliError::usage(format!("{url}: event {} of node {}: {m}", e.seq, e.node))
        })? {
            calls.push(r);
        }
    }
    Ok((url.clone(), calls))
}

/// The file's name as given, and its replayable calls in order.
fn read_events(path: &std::path::Path) -> Result<(String, Vec<Recorded>), CliError> {
    let name = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError::usage(format!("{name}: {e}")))?;
    let calls = parse(&name, &text)?;
    Ok((name, calls))
}

/// Every replayable call of `text` in order; a line that is not JSON is an error naming it.
fn parse(file: &str, text: &str) -> Result<Vec<Recorded>, CliError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| CliError::usage(format!("{file}:{}: not an event: {e}", i + 1)))?;
        if let Some(r) =
            recorded(&v).map_err(|e| CliError::usage(format!("{file}:{}: {e}", i + 1)))?
        {
            out.push(r);
        }
    }
    Ok(out)
}

#[derive(Debug, Args)]
pub struct SuggestArgs {
    #[command(flatten)]
    source: Source,
    /// Only the calls of identities matching this SPIFFE ID pattern; the policy governs it
    /// (default: every identity seen, each named exactly).
    #[arg(long)]
    identity: Option<String>,
    /// The policy's `metadata.name`.
    #[arg(long, default_value = "suggested")]
    name: String,
    /// Only calls at or after this time (`2026-12-06T01:00:00Z`, or Unix seconds).
    #[arg(long)]
    since: Option<String>,
    /// Only calls at or before this time.
    #[arg(long)]
    until: Option<String>,
    /// Exec rules by directory (`dir/**`) where two or more binaries of a directory ran.
    #[arg(long)]
    exec_prefixes: bool,
    /// Propose chaining rules where no session that reached one zone reached another one
    /// afterwards (each marked as a suggestion in a comment).
    #[arg(long)]
    suggest_chaining: bool,
}

fn time_arg(flag: &str, v: Option<&String>) -> Result<Option<u64>, CliError> {
    v.map(|t| {
        corral_policy::suggest::parse_utc(t).ok_or_else(|| {
            CliError::usage(format!(
                "--{flag} {t}: give a UTC time like 2026-12-06T01:00:00Z, or Unix seconds"
            ))
        })
    })
    .transpose()
}

/// `corral policy suggest`: the policy YAML on standard output.
pub async fn suggest(a: &SuggestArgs) -> Result<ExitCode, CliError> {
    let (since, until) = (
        time_arg("since", a.since.as_ref())?,
        time_arg("until", a.until.as_ref())?,
    );
    let (name, mut calls) = recorded_calls(&a.source, since, until, a.identity.as_deref()).await?;
    calls.retain(|c| {
        since.is_none_or(|t| c.time_unix_nano >= t) && until.is_none_or(|t| c.time_unix_nano <= t)
    });
    let identities = match &a.identity {
        Some(p) => {
            let pat = corral_policy::identity::IdentityPattern::parse(p)
                .map_err(|e| CliError::usage(format!("--identity {p}: {e}")))?;
            calls.retain(|c| pat.matches(&c.identity));
            vec![p.clone()]
        }
        None => {
            let mut ids: Vec<String> = calls.iter().map(|c| c.identity.clone()).collect();
            ids.sort();
            ids.dedup();
            ids
        }
    };
    if identities.is_empty() {
        return Err(CliError::usage(format!(
            "{name}: no recorded calls to suggest from"
        )));
    }
    let opts = corral_policy::suggest::Options {
        name: a.name.clone(),
        identities,
        exec_prefixes: a.exec_prefixes,
        chaining: a.suggest_chaining,
    };
    print!("{}", corral_policy::suggest::suggest(&calls, &opts));
    Ok(ExitCode::SUCCESS)
}

fn report_json(r: &Report) -> Value {
    json!({
        "replayed": r.replayed, "unchanged": r.unchanged, "by_grant": r.by_grant,
        "newly_denied": r.newly_denied(), "newly_allowed": r.newly_allowed(),
        "changes": r.changes.iter().map(|c| json!({
            "change": if c.decider.newly_denied { "allow->deny" } else { "deny->allow" },
            "policy": c.decider.policy, "kind": c.decider.kind, "reason": c.decider.reason,
            "rule_index": c.decider.rule, "count": c.count, "example": c.example,
        })).collect::<Vec<_>>(),
    })
}

fn print_text(r: &Report) {
    println!(
        "replayed {} calls: {} unchanged, {} would be denied, {} would be allowed ({} let through by grants, not replayed)",
        r.replayed,
        r.unchanged,
        r.newly_denied(),
        r.newly_allowed(),
        r.by_grant
    );
    for c in &r.changes {
        let d = &c.decider;
        let by = match d.rule {
            Some(i) => format!("{} rule {i}", d.kind),
            None => format!("{} {}", d.kind, d.reason),
        };
        let policy = if d.policy.is_empty() {
            "no policy".to_owned()
        } else {
            format!("policy {}", d.policy)
        };
        println!(
            "  {} {:>6}x  {policy}, {by}: e.g. {}",
            if d.newly_denied {
                "allow->deny"
            } else {
                "deny->allow"
            },
            c.count,
            c.example
        );
    }
}

pub async fn run(a: &SimulateArgs) -> Result<ExitCode, CliError> {
    let candidate = match corral_policy::compile_file(&a.file, 0) {
        Ok(c) => c,
        Err(PolicyError::Invalid(diags)) => {
            for d in diags {
                eprintln!("{d}");
            }
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    let (since, until) = (
        time_arg("since", a.since.as_ref())?,
        time_arg("until", a.until.as_ref())?,
    );
    let (_, mut calls) = recorded_calls(&a.source, since, until, None).await?;
    calls.retain(|c| {
        since.is_none_or(|t| c.time_unix_nano >= t) && until.is_none_or(|t| c.time_unix_nano <= t)
    });
    let report = simulate(&candidate, &calls);
    if a.json {
        println!("{}", report_json(&report));
    } else {
        print_text(&report);
    }
    Ok(if report.newly_denied() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"seq":1,"kind":"connect","principal":{"identity":"spiffe://e.org/a","session":"s"},"decision":{"verdict":"allow","reason":"rule"},"connect":{"family":"ipv4","protocol":"tcp","destination":"10.0.0.1","port":443}}
{"seq":2,"kind":"exec","principal":{"identity":"spiffe://e.org/a","session":"s"},"decision":{"verdict":"audit-deny","reason":"default"},"exec":{"path":"/usr/bin/curl"}}
{"seq":3,"kind":"connect","principal":{"identity":"spiffe://e.org/a","session":"s"},"decision":{"verdict":"deny","reason":"default"},"connect":{"family":"unix","protocol":"","destination":"/run/docker.sock","port":0}}
{"seq":4,"kind":"grant","principal":null,"decision":null}

{"seq":5,"kind":"connect","principal":{"identity":"spiffe://e.org/a","session":"s"},"decision":{"verdict":"allow","reason":"grant"},"connect":{"family":"ipv6","protocol":"udp","destination":"fd00::1","port":53}}
"#;

    #[test]
    fn event_lines_become_recorded_calls_in_order() {
        let r = parse("ev.json", LINES).expect("parses");
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].what, "connect tcp 10.0.0.1:443 (seq 1)");
        assert!(r[0].went_through && !r[0].by_grant);
        assert_eq!(r[1].call, Call::Exec("/usr/bin/curl".into()));
        assert!(r[1].went_through, "audit-deny went through");
        assert_eq!(r[2].call, Call::Unix("/run/docker.sock".into()));
        assert!(!r[2].went_through);
        assert!(r[3].by_grant);
        assert_eq!(r[3].what, "connect udp [fd00::1]:53 (seq 5)");
    }

    #[test]
    fn a_line_that_is_not_an_event_is_named() {
        let err = parse("ev.json", "{\"seq\":1}\nnot json\n").expect_err("refused");
        assert!(err.to_string().contains("ev.json:2:"), "{err}");
    }
}
