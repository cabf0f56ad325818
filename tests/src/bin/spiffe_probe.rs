//! `corral-spiffe-probe`: a TEST TOOL. A workload that asks for its credentials through the
//! `spiffe` crate's Workload API client (an independent SPIFFE client library, not Corral's
//! code), at `SPIFFE_ENDPOINT_SOCKET`, as `corral run` sets it. Run inside a principal.
//!
//! - `corral-spiffe-probe svid`: one JSON line, `{"spiffe_id", "leaf", "key", "bundles"}`
//!   (DER as byte arrays; `bundles` by trust domain), or `{"error"}` (exit 1).
//! - `corral-spiffe-probe watch`: one JSON line per X.509-SVID the stream sends
//!   (`{"spiffe_id", "leaf"}`), then `{"error"}` or `{"end": true}` when the stream ends.
#![forbid(unsafe_code)]

use serde_json::json;
use spiffe::WorkloadApiClient;
use tokio_stream::StreamExt as _;

async fn svid() -> Result<serde_json::Value, String> {
    let c = WorkloadApiClient::connect_env()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let svid = c.fetch_x509_svid().await.map_err(|e| format!("{e:?}"))?;
    let bundles = c.fetch_x509_bundles().await.map_err(|e| format!("{e:?}"))?;
    let bundles: serde_json::Map<String, serde_json::Value> = bundles
        .iter()
        .map(|(td, b)| {
            let certs: Vec<&[u8]> = b.authorities().iter().map(|c| c.as_bytes()).collect();
            (td.to_string(), json!(certs))
        })
        .collect();
    Ok(json!({
        "spiffe_id": svid.spiffe_id().to_string(),
        "leaf": svid.leaf().as_bytes(),
        "key": svid.private_key().as_bytes(),
        "chain": svid.cert_chain().len(),
        "bundles": bundles,
    }))
}

async fn watch() -> Result<(), String> {
    let c = WorkloadApiClient::connect_env()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut s = c.stream_x509_svids().await.map_err(|e| format!("{e:?}"))?;
    while let Some(item) = s.next().await {
        let svid = item.map_err(|e| format!("{e:?}"))?;
        println!(
            "{}",
            json!({ "spiffe_id": svid.spiffe_id().to_string(), "leaf": svid.leaf().as_bytes() })
        );
    }
    println!("{}", json!({ "end": true }));
    Ok(())
}

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mode = std::env::args().nth(1).unwrap_or_default();
    let res = rt.block_on(async {
        match mode.as_str() {
            "svid" => svid().await.map(|v| println!("{v}")),
            "watch" => watch().await,
            other => Err(format!("unknown mode {other:?}: svid | watch")),
        }
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", json!({ "error": e }));
            std::process::ExitCode::FAILURE
        }
    }
}
