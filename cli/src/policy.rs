//! `corral policy check` and `corral policy explain` (`simulate`: [`crate::simulate`]).
//!
//! `explain` asks the running agent (its `Explain` call evaluates the policy it enforces), or,
//! with `--policy FILE`, evaluates that file locally with the same reference evaluator the
//! kernel is tested against. Either way it explains a call from a fresh session (nothing
//! contacted yet, no grants).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Subcommand};
use corral_policy::{
    self as policy, PolicyError,
    eval::ConnectCall,
    explain::{Call, Target, explain, explain_name, parse_target},
    identity,
};

use crate::error::CliError;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a policy file locally: exit 0, or print `file:line:col: message` per problem.
    Check {
        /// The policy file (YAML, one or more AgentPolicy documents).
        file: PathBuf,
    },
    /// Show which rule decides a call by an identity, and why.
    Explain(ExplainArgs),
    /// Replay recorded calls (`corral events --json` output, audit logs) through a candidate
    /// policy: list what would change; exit 1 if a call that went through would be denied.
    Simulate(crate::simulate::SimulateArgs),
    /// A least-privilege policy from recorded calls (what went through), each rule commented
    /// with the calls and sessions it covers; review it, then `simulate` and enforce.
    Suggest(crate::simulate::SuggestArgs),
    /// Store the policies of a file on the server (one new revision) and wait until every
    /// connected node has ACKed or NACKed it.
    Apply(crate::fleet::ApplyArgs),
    /// The policies on the server.
    List(crate::fleet::ListArgs),
    /// One policy's YAML from the server.
    Get(crate::fleet::GetArgs),
    /// Delete a policy on the server (one new revision).
    Delete(crate::fleet::NameArgs),
    /// The server's nodes: connected or not, acknowledged revision, last NACK.
    Status(crate::fleet::StatusArgs),
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Evaluate this policy file locally instead of asking the agent.
    #[arg(long)]
    policy: Option<PathBuf>,
    #[command(flatten)]
    socket: crate::client::SocketArgs,
    /// The caller's SPIFFE ID, e.g. spiffe://example.org/agent/research/r1.
    #[arg(long)]
    identity: String,
    /// A connect: ADDR:PORT[/tcp|udp] (IPv6 as [ADDR]:PORT; protocol defaults to tcp), or
    /// NAME:PORT[/tcp|udp]: the name is resolved (here with --policy, else by the agent) and
    /// each address explained as the DNS proxy would open it.
    #[arg(long, conflicts_with = "exec", required_unless_present = "exec")]
    connect: Option<String>,
    /// An exec of PATH (symlinks are resolved when the file exists here).
    #[arg(long)]
    exec: Option<String>,
}

pub async fn run(c: Command) -> Result<ExitCode, CliError> {
    match c {
        Command::Check { file } => check(&file),
        Command::Explain(a) => explain_cmd(&a).await.map(|()| ExitCode::SUCCESS),
        Command::Simulate(a) => crate::simulate::run(&a).await,
        Command::Suggest(a) => crate::simulate::suggest(&a).await,
        Command::Apply(a) => crate::fleet::apply(&a).await,
        Command::List(a) => crate::fleet::list(&a).await,
        Command::Get(a) => crate::fleet::get(&a).await,
        Command::Delete(a) => crate::fleet::delete(&a).await,
        Command::Status(a) => crate::fleet::status(&a).await,
    }
}

/// Prints a summary and exits 0, or one `file:line:col: message` line per problem on stderr
/// and exits 1; an unreadable file is an error.
fn check(file: &Path) -> Result<ExitCode, CliError> {
    match policy::compile_file(file, 0) {
        Ok(c) => {
            let rules: usize = c.policies.iter().map(|p| p.connect.len()).sum();
            let exec: usize = c.policies.iter().map(|p| p.exec.len()).sum();
            println!(
                "{}: ok: {} polic{}, {rules} connect and {exec} exec rules",
                file.display(),
                c.policies.len(),
                if c.policies.len() == 1 { "y" } else { "ies" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(PolicyError::Invalid(diags)) => {
            for d in diags {
                eprintln!("{d}");
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

/// The addresses `name` resolves to here (the system resolver), IPv4-mapped as IPv4,
/// deduplicated, for `explain --connect NAME:PORT`.
fn resolve(name: &str, port: u16) -> Result<Vec<IpAddr>, CliError> {
    use std::net::ToSocketAddrs as _;
    let mut out: Vec<IpAddr> = (name, port)
        .to_socket_addrs()
        .map_err(|e| {
            CliError::usage(format!(
                "--connect {name}:{port}: cannot resolve {name} here: {e}"
            ))
        })?
        .map(|sa| match sa.ip() {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            v4 => v4,
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

async fn explain_cmd(a: &ExplainArgs) -> Result<(), CliError> {
    identity::validate_id(&a.identity).map_err(|source| CliError::BadIdentity { source })?;
    let call = match (&a.connect, &a.exec) {
        (Some(c), _) => match parse_target(c).map_err(CliError::usage)? {
            Target::Addr(c) => Call::Connect(c),
            Target::Name { name, port, proto } => {
                let Some(file) = &a.policy else {
                    return explain_by_agent(a).await;
                };
                let compiled = policy::compile_file(file, 0)?;
                for (i, addr) in resolve(&name, port)?.into_iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    let c = ConnectCall { addr, port, proto };
                    println!("{}", explain_name(&compiled, &a.identity, &name, c));
                }
                return Ok(());
            }
        },
        (None, Some(p)) => {
            let resolved = match std::fs::canonicalize(p) {
                Ok(r) => r.display().to_string(),
                Err(_) if p.starts_with('/') => p.clone(),
                Err(source) => {
                    return Err(CliError::BadExecPath {
                        path: p.clone(),
                        source,
                    });
                }
            };
            Call::Exec {
                given: p.clone(),
                resolved,
            }
        }
        (None, None) => return Err(no_call()),
    };
    let Some(file) = &a.policy else {
        return explain_by_agent(a).await;
    };
    let compiled = policy::compile_file(file, 0)?;
    println!("{}", explain(&compiled, &a.identity, call));
    Ok(())
}

fn no_call() -> CliError {
    CliError::usage("give --connect ADDR:PORT[/tcp|udp] or --exec PATH")
}

/// Asks the agent, which explains against the policy it enforces now.
async fn explain_by_agent(a: &ExplainArgs) -> Result<(), CliError> {
    use corral_proto::v1 as pb;
    let call = match (&a.connect, &a.exec) {
        (Some(c), _) => pb::explain_request::Call::Connect(c.clone()),
        (None, Some(p)) => pb::explain_request::Call::Exec(p.clone()),
        (None, None) => return Err(no_call()),
    };
    let mut client = crate::client::connect(&a.socket.socket).await?;
    let r = client
        .explain(pb::ExplainRequest {
            identity: a.identity.clone(),
            call: Some(call),
        })
        .await
        .map_err(CliError::agent)?
        .into_inner();
    println!("{}", r.explanation);
    if let Some(d) = r.decision {
        println!("(agent policy revision {})", d.revision);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_syntax() {
        let addr = |s: &str| match parse_target(s) {
            Ok(Target::Addr(c)) => c,
            other => panic!("{s}: {other:?}"),
        };
        let c = addr("127.0.0.1:80/udp");
        assert_eq!((c.port, c.proto), (80, agent_common::PROTO_UDP));
        let c = addr("[::ffff:10.0.0.1]:443");
        assert_eq!(c.addr, "10.0.0.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(c.proto, agent_common::PROTO_TCP);
        assert!(parse_target("127.0.0.1:80/icmp").is_err());
        assert!(parse_target("127.0.0.1").is_err());
        assert_eq!(
            parse_target("API.GitHub.com:443"),
            Ok(Target::Name {
                name: "api.github.com".into(),
                port: 443,
                proto: agent_common::PROTO_TCP
            })
        );
        assert!(parse_target("bad_name!:443").is_err());
        assert!(parse_target("api.github.com:99999").is_err());
    }
}
