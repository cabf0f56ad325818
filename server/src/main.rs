//! `corral-server`: the central policy server. Stores policies in embedded SQLite with
//! monotonic revisions, pushes them to nodes over `NodeSync`, runs grants and approvals, and
//! serves the fleet event stream.
//!
//! Status: not implemented yet (issue 6). The binary parses its documented flags and exits with
//! an error saying so, rather than pretending to serve.
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "Corral central policy server")]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:7443.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    /// SQLite database path.
    #[arg(long, default_value = "/var/lib/corral/server.db")]
    db: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The API types are generated and linked; the service implementations are issue 6.
    let _ = corral_proto::v1::PolicyStatusResponse::default();
    anyhow::bail!(
        "corral-server is not implemented yet (would listen on {} with db {})",
        args.listen,
        args.db.display()
    )
}
