//! The central server's client: `--server URL` for fleet commands.

use corral_proto::v1::{
    event_service_client::EventServiceClient, grant_service_client::GrantServiceClient,
    policy_service_client::PolicyServiceClient,
};
use tonic::transport::{Channel, Endpoint};

use crate::error::CliError;

/// `--server` for every fleet command.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// The corral-server URL, e.g. http://127.0.0.1:7443; replicas: a comma-separated list
    /// (the first that answers is used; `events --server` follows them all).
    #[arg(long, env = "CORRAL_SERVER", value_name = "URL[,URL...]")]
    pub server: String,
    /// mTLS to the server (needed for an `https://` --server).
    #[command(flatten)]
    pub tls: corral_runtime::tls::TlsFiles,
}

impl ServerArgs {
    /// The URLs of a replica list.
    pub fn urls(&self) -> Vec<String> {
        self.server
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// These arguments for one of the replicas.
    pub fn one(&self, url: &str) -> Self {
        Self {
            server: url.to_owned(),
            tls: self.tls.clone(),
        }
    }
}

/// A channel to the first replica of `--server` that answers.
async fn channel(s: &ServerArgs) -> Result<Channel, CliError> {
    let urls = s.urls();
    let Some((last, first)) = urls.split_last() else {
        return Err(CliError::NoServer);
    };
    for url in first {
        match connect(&s.one(url)).await {
            Ok(c) => return Ok(c),
            Err(e @ CliError::ServerUnreachable { .. }) => {
                eprintln!("corral: {e}; trying the next replica");
            }
            Err(e) => return Err(e),
        }
    }
    connect(&s.one(last)).await
}

async fn connect(s: &ServerArgs) -> Result<Channel, CliError> {
    let url = s.server.as_str();
    let mut ep =
        Endpoint::from_shared(url.to_owned()).map_err(|source| CliError::BadServerUrl {
            url: url.to_owned(),
            source,
        })?;
    if s.tls.is_set() {
        let tls = s
            .tls
            .client_config()
            .map_err(|source| CliError::TlsFiles { source })?;
        ep = ep
            .tls_config(tls)
            .map_err(|source| CliError::TlsConfig { source })?;
    } else if url.starts_with("https://") {
        return Err(CliError::TlsMissing {
            url: url.to_owned(),
        });
    }
    ep.connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|source| CliError::ServerUnreachable {
            url: url.to_owned(),
            source,
        })
}

pub async fn policies(s: &ServerArgs) -> Result<PolicyServiceClient<Channel>, CliError> {
    Ok(PolicyServiceClient::new(channel(s).await?))
}

pub async fn grants(s: &ServerArgs) -> Result<GrantServiceClient<Channel>, CliError> {
    Ok(GrantServiceClient::new(channel(s).await?))
}

pub async fn events(s: &ServerArgs) -> Result<EventServiceClient<Channel>, CliError> {
    Ok(EventServiceClient::new(channel(s).await?))
}
