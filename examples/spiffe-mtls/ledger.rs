//! `spiffe-mtls-ledger`: the example of `examples/spiffe-mtls.yaml`. A service (the ledger) and
//! an agent calling it, over mutual TLS with the X.509-SVIDs Corral's node agent issues to
//! their sessions. Neither holds a key, a certificate or a password of its own: each asks the
//! SPIFFE Workload API at `SPIFFE_ENDPOINT_SOCKET` (which `corral run` sets), through the
//! `spiffe` and `spiffe-rustls` crates, and gets the credentials of exactly its own principal.
//!
//! - `spiffe-mtls-ledger serve LISTEN CALLER_ID`: the ledger. Prints `{"listening": ADDR}`,
//!   then one JSON line per call it decided.
//! - `spiffe-mtls-ledger call ADDR LEDGER_ID OP`: one call (`OP` is `read` or `write`);
//!   prints the ledger's answer as one JSON line, or `{"ok": false, "error": ...}` (exit 1).
//!
//! How the ledger authorises a call, in order:
//! 1. **Identity, by mTLS.** The caller's X.509-SVID must chain to the trust bundle of the
//!    ledger's own trust domain, and its SPIFFE ID (the URI SAN) must be exactly `CALLER_ID`
//!    (`spiffe_rustls::authorizer::exact`). Anyone else fails the handshake.
//! 2. **Session, by a JWT-SVID.** The caller sends a JWT-SVID issued for the ledger's SPIFFE ID
//!    as audience. The ledger has its own node agent validate it (`ValidateJWTSVID`:
//!    signature, audience, expiry, and the session has not ended), then requires that the
//!    token's `sub` and `corral_session` are the certificate's SPIFFE ID and session (the
//!    session is in the SVID's extension `1.3.6.1.4.1.59999.1.1`). So a token cannot be
//!    replayed by another session, and a call from a session that has ended is refused.
//! 3. **Writes need a person.** `write` requires the token's `corral_grants` to name at least
//!    one grant: a just-in-time grant a person approved for this very session.
#![forbid(unsafe_code)]

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Value, json};
use spiffe::{TrustDomain, WorkloadApiClient, X509Source};
use spiffe_rustls::{LocalOnly, authorizer, mtls_client, mtls_server};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio_rustls::{TlsAcceptor, TlsConnector, rustls::pki_types::ServerName};

/// Corral's X.509 extension holding the session id (a DER UTF8String).
const SESSION_OID: &str = "1.3.6.1.4.1.59999.1.1";

type Res<T> = Result<T, String>;

/// The SPIFFE ID and Corral session a certificate (DER) names.
fn identity_of(der: &[u8]) -> Res<(String, String)> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("certificate: {e}"))?;
    let mut id = None;
    let mut session = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => {
                id = san.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                });
            }
            _ if ext.oid.to_id_string() == SESSION_OID => {
                let (_, v) = x509_parser::der_parser::parse_der(ext.value)
                    .map_err(|e| format!("session extension: {e}"))?;
                session = v.as_str().ok().map(str::to_owned);
            }
            _ => {}
        }
    }
    Ok((
        id.ok_or("the certificate names no SPIFFE ID")?,
        session.ok_or("the certificate names no Corral session")?,
    ))
}

/// The claims of a JWT that the Workload API has just validated (the payload, decoded).
fn claims_of(token: &str) -> Res<Value> {
    let payload = token.split('.').nth(1).ok_or("not a JWT")?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| format!("JWT payload: {e}"))?;
    serde_json::from_slice(&raw).map_err(|e| format!("JWT claims: {e}"))
}

/// Steps 2 and 3 of the module comment, for a caller whose certificate named (`id`,
/// `session`). Returns the grants the token lists.
async fn authorise(
    api: &WorkloadApiClient,
    me: &str,
    id: &str,
    session: &str,
    token: &str,
    op: &str,
) -> Res<Vec<String>> {
    // The node agent checks signature, audience, expiry, and that the session is live.
    api.validate_jwt_token(me, token)
        .await
        .map_err(|e| format!("JWT-SVID refused by the Workload API: {e}"))?;
    let c = claims_of(token)?;
    if c["sub"] != id || c["corral_session"] != session {
        return Err(format!(
            "the JWT-SVID is {}'s (session {}), not the certificate's {id} (session {session})",
            c["sub"], c["corral_session"]
        ));
    }
    let grants: Vec<String> = c["corral_grants"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    match op {
        "read" => Ok(grants),
        "write" if !grants.is_empty() => Ok(grants),
        "write" => Err(format!(
            "a write needs a grant a person approved for session {session}; the token lists none"
        )),
        other => Err(format!("unknown operation {other:?}")),
    }
}

async fn serve(listen: &str, caller: &str) -> Res<()> {
    let source = X509Source::new()
        .await
        .map_err(|e| format!("X509Source: {e}"))?;
    let svid = source.svid().map_err(|e| format!("own SVID: {e}"))?;
    let me = svid.spiffe_id().to_string();
    let td: TrustDomain = svid.spiffe_id().trust_domain().clone();
    let config = mtls_server(source.clone())
        .authorize(authorizer::exact([caller]).map_err(|e| e.to_string())?)
        .trust_domain_policy(LocalOnly(td))
        .build()
        .map_err(|e| format!("TLS configuration: {e}"))?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let api = Arc::new(
        WorkloadApiClient::connect_env()
            .await
            .map_err(|e| format!("Workload API: {e}"))?,
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listen on {listen}: {e}"))?;
    println!("{}", json!({ "listening": listen, "as": me }));
    loop {
        let (tcp, peer) = listener.accept().await.map_err(|e| e.to_string())?;
        let (acceptor, api, me) = (acceptor.clone(), api.clone(), me.clone());
        tokio::spawn(async move {
            let decided = match acceptor.accept(tcp).await {
                Err(e) => {
                    json!({ "ok": false, "peer": peer.to_string(), "error": format!("TLS: {e}") })
                }
                Ok(tls) => {
                    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                    let who = cert.map(|c| identity_of(c.as_ref()));
                    let (reader, mut writer) = tokio::io::split(tls);
                    let mut line = String::new();
                    let read = BufReader::new(reader).read_line(&mut line).await;
                    let mut words = line.split_whitespace();
                    let (token, op) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                    let answer = match (who, read) {
                        (_, Err(e)) => json!({ "ok": false, "error": format!("read: {e}") }),
                        (None, _) => json!({ "ok": false, "error": "no client certificate" }),
                        (Some(Err(e)), _) => json!({ "ok": false, "error": e }),
                        (Some(Ok((id, session))), _) => {
                            match authorise(&api, &me, &id, &session, token, op).await {
                                Ok(grants) => json!({
                                    "ok": true, "op": op, "caller": id, "session": session,
                                    "grants": grants,
                                }),
                                Err(e) => json!({
                                    "ok": false, "op": op, "caller": id, "session": session,
                                    "error": e,
                                }),
                            }
                        }
                    };
                    let _ = writer.write_all(format!("{answer}\n").as_bytes()).await;
                    let _ = writer.shutdown().await;
                    answer
                }
            };
            println!("{decided}");
        });
    }
}

async fn call(addr: &str, ledger: &str, op: &str) -> Res<Value> {
    let source = X509Source::new()
        .await
        .map_err(|e| format!("X509Source: {e}"))?;
    let td = source
        .svid()
        .map_err(|e| format!("own SVID: {e}"))?
        .spiffe_id()
        .trust_domain()
        .clone();
    let config = mtls_client(source.clone())
        .authorize(authorizer::exact([ledger]).map_err(|e| e.to_string())?)
        .trust_domain_policy(LocalOnly(td))
        .build()
        .map_err(|e| format!("TLS configuration: {e}"))?;
    // A JWT-SVID for the ledger as audience: it carries this session and its grants.
    let api = WorkloadApiClient::connect_env()
        .await
        .map_err(|e| format!("Workload API: {e}"))?;
    let jwt = api
        .fetch_jwt_svid([ledger], None)
        .await
        .map_err(|e| format!("JWT-SVID: {e}"))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    // The name is not checked: the ledger is authenticated by its SPIFFE ID.
    let name = ServerName::try_from("ledger").map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (reader, mut writer) = tokio::io::split(tls);
    writer
        .write_all(format!("{} {op}\n", jwt.token()).as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    BufReader::new(reader)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("receive: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("the ledger's answer {line:?}: {e}"))
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map_or("", String::as_str);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        match arg(1) {
            "serve" => serve(arg(2), arg(3)).await.map(|()| json!({})),
            "call" => call(arg(2), arg(3), arg(4)).await,
            _ => Err("usage: spiffe-mtls-ledger serve LISTEN CALLER_ID | \
                      call ADDR LEDGER_ID read|write"
                .to_owned()),
        }
    });
    match res {
        Ok(v) if v["ok"] == true => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            println!("{}", json!({ "ok": false, "error": e }));
            std::process::ExitCode::FAILURE
        }
    }
}
