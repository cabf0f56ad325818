//! Prometheus metrics over a minimal HTTP/1.0 responder on a loopback port: every request
//! gets the current text exposition.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use corral_runtime::shutdown::ShutdownSignal;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tracing::{debug, info};

use super::{Shared, status};

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: ShutdownSignal) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics listening");
    }
    loop {
        let (mut sock, _) = tokio::select! {
            _ = stop.wait() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "metrics accept");
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            // Read the request head (bounded); its content does not matter.
            let mut buf = [0u8; 2048];
            let mut head = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let body = status::metrics(&shared);
            let resp = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
