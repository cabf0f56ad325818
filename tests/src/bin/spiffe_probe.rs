//! `corral-spiffe-probe`: a TEST TOOL. A workload that asks for its credentials through the
//! `spiffe` crate's Workload API client (an independent SPIFFE client library, not Corral's
//! code), at `SPIFFE_ENDPOINT_SOCKET`, as `corral run` sets it. Run inside a principal.
//!
//! - `corral-spiffe-probe svid`: one JSON line, `{"spiffe_id", "leaf", "key", "certs",
//!   "bundles"}`
//!   (DER as byte arrays; `bundles` by trust domain), or `{"error"}` (exit 1).
//! - `corral-spiffe-probe jwt AUD`: a JWT-SVID for AUD, checked by the library itself against
//!   the JWT bundle (JWKS) the API serves: `{"token", "spiffe_id"}`.
//! - `corral-spiffe-probe validate AUD TOKEN`: the API's `ValidateJWTSVID`: `{"spiffe_id"}`.
//! - `corral-spiffe-probe bench N`: N X.509-SVID, N JWT-SVID and N X.509 bundle fetches
//!   (the baseline: a round trip that signs nothing) in a row, one connection;
//!   `{"x509_p50_us", "x509_p99_us", "jwt_p50_us", "jwt_p99_us", "bundle_p50_us",
//!   "bundle_p99_us"}`.
//! - `corral-spiffe-probe watch [JOIN LEAVE]`: one JSON line per X.509-SVID the stream sends
//!   (`{"spiffe_id", "leaf"}`), then `{"error"}` or `{"end": true}` when the stream ends. With
//!   JOIN and LEAVE (cgroup directories), it joins JOIN before asking and moves itself into
//!   LEAVE after the first SVID (`{"left": LEAVE}`), so it outlives its principal's cgroup.
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
        "certs": svid.cert_chain().iter().map(|c| c.as_bytes()).collect::<Vec<_>>(),
        "bundles": bundles,
    }))
}

async fn jwt(aud: &str) -> Result<serde_json::Value, String> {
    let c = WorkloadApiClient::connect_env()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let svid = c
        .fetch_jwt_svid([aud], None)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let bundles = c.fetch_jwt_bundles().await.map_err(|e| format!("{e:?}"))?;
    // The library's own verification: signature by a key of the bundle, audience, expiry.
    let checked = spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &[aud])
        .map_err(|e| format!("verify: {e:?}"))?;
    Ok(json!({ "token": svid.token(), "spiffe_id": checked.spiffe_id().to_string() }))
}

async fn validate(aud: &str, token: &str) -> Result<serde_json::Value, String> {
    let c = WorkloadApiClient::connect_env()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let svid = c
        .validate_jwt_token(aud, token)
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(json!({ "spiffe_id": svid.spiffe_id().to_string() }))
}

async fn bench(n: usize) -> Result<serde_json::Value, String> {
    let c = WorkloadApiClient::connect_env()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let pct = |v: &mut Vec<u128>, p: f64| {
        v.sort_unstable();
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let (mut x, mut j, mut b) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for _ in 0..n {
        let t = std::time::Instant::now();
        c.fetch_x509_bundles().await.map_err(|e| format!("{e:?}"))?;
        b.push(t.elapsed().as_micros());
        let t = std::time::Instant::now();
        c.fetch_x509_svid().await.map_err(|e| format!("{e:?}"))?;
        x.push(t.elapsed().as_micros());
        let t = std::time::Instant::now();
        c.fetch_jwt_svid(["bench"], None)
            .await
            .map_err(|e| format!("{e:?}"))?;
        j.push(t.elapsed().as_micros());
    }
    Ok(json!({
        "n": n,
        "x509_p50_us": pct(&mut x, 0.5), "x509_p99_us": pct(&mut x, 0.99),
        "jwt_p50_us": pct(&mut j, 0.5), "jwt_p99_us": pct(&mut j, 0.99),
        "bundle_p50_us": pct(&mut b, 0.5), "bundle_p99_us": pct(&mut b, 0.99),
    }))
}

fn join(cgroup: &str) -> Result<(), String> {
    std::fs::write(format!("{cgroup}/cgroup.procs"), "0").map_err(|e| format!("join {cgroup}: {e}"))
}

async fn watch(cgroups: Option<(String, String)>) -> Result<(), String> {
    if let Some((into, _)) = &cgroups {
        join(into)?;
    }
    let c = WorkloadApiClient::connect_env()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut s = c.stream_x509_svids().await.map_err(|e| format!("{e:?}"))?;
    let mut leave = cgroups.map(|(_, leave)| leave);
    while let Some(item) = s.next().await {
        let svid = item.map_err(|e| format!("{e:?}"))?;
        println!(
            "{}",
            json!({ "spiffe_id": svid.spiffe_id().to_string(), "leaf": svid.leaf().as_bytes() })
        );
        if let Some(dir) = leave.take() {
            join(&dir)?;
            println!("{}", json!({ "left": dir }));
        }
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
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let mode = arg(1);
    let res = rt.block_on(async {
        match mode.as_str() {
            "svid" => svid().await.map(|v| println!("{v}")),
            "jwt" => jwt(&arg(2)).await.map(|v| println!("{v}")),
            "validate" => validate(&arg(2), &arg(3)).await.map(|v| println!("{v}")),
            "bench" => bench(arg(2).parse().unwrap_or(200))
                .await
                .map(|v| println!("{v}")),
            "watch" => watch((args.len() > 3).then(|| (arg(2), arg(3)))).await,
            other => Err(format!(
                "unknown mode {other:?}: svid | jwt AUD | validate AUD TOKEN | bench N | watch [JOIN LEAVE]"
            )),
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
