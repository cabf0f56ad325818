//! The agent's local API client: tonic over the unix socket (tower connector + hyper-util).

use std::path::{Path, PathBuf};

use corral_proto::v1::agent_service_client::AgentServiceClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// `--socket` for every agent command.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArgs {
    /// The agent's local API socket.
    #[arg(long, env = "CORRAL_SOCKET", default_value = corral_agent::paths::AGENT_SOCKET)]
    pub socket: PathBuf,
}

/// How long connecting (socket + HTTP/2 handshake) may take: an agent that has bound its
/// socket but does not serve yet (still starting) must not hang the command.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects to the agent at `socket`.
pub async fn connect(socket: &Path) -> Result<AgentServiceClient<Channel>, String> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: every connection goes to the socket.
    let endpoint = Endpoint::from_static("http://corral-agent.local").http2_adaptive_window(true);
    let connecting = endpoint.connect_with_connector(tower::service_fn(move |_| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }
    }));
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| {
            format!(
                "the corral agent at {} did not answer within {} s (is it still starting?)",
                socket.display(),
                CONNECT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| {
            format!(
                "cannot reach the corral agent at {}: {} (is `corral-agent` running?)",
                socket.display(),
                source_text(&e)
            )
        })?;
    Ok(AgentServiceClient::new(channel))
}

fn source_text(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(s) = cur.source() {
        cur = s;
    }
    cur.to_string()
}

/// One sentence for a failed call.
pub fn status_text(s: &tonic::Status) -> String {
    let what = match s.code() {
        tonic::Code::PermissionDenied => "the agent refused",
        tonic::Code::InvalidArgument => "invalid request",
        tonic::Code::FailedPrecondition => "the agent cannot do that now",
        tonic::Code::Unavailable => "the agent is unavailable",
        _ => "the agent failed",
    };
    format!("{what}: {}", s.message().replace('\n', "; "))
}

/// A single-threaded runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}
