//! The agent's local API client: tonic over the unix socket (tower connector + hyper-util).

use std::path::{Path, PathBuf};

use corral_proto::v1::agent_service_client::AgentServiceClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::error::CliError;

/// `--socket` for every agent command.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArgs {
    /// The agent's local API socket.
    #[arg(long, env = "CORRAL_SOCKET", default_value = corral_runtime::paths::AGENT_SOCKET)]
    pub socket: PathBuf,
}

/// How long connecting (socket + HTTP/2 handshake) may take: an agent that has bound its
/// socket but does not serve yet (still starting) must not hang the command.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects to the agent at `socket`.
pub async fn connect(socket: &Path) -> Result<AgentServiceClient<Channel>, CliError> {
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
        .map_err(|_| CliError::AgentTimeout {
            socket: socket.to_path_buf(),
            timeout: CONNECT_TIMEOUT,
        })?
        .map_err(|source| CliError::AgentUnreachable {
            socket: socket.to_path_buf(),
            source,
        })?;
    Ok(AgentServiceClient::new(channel))
}
