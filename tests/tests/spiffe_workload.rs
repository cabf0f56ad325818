//! The SPIFFE Workload API of a real agent, asked by a real workload in a real principal
//! through an independent SPIFFE client library (the `spiffe` crate, in `corral-spiffe-probe`):
//! - a process gets exactly its own principal's X.509-SVID (URI SAN = its SPIFFE ID, its
//!   session in Corral's extension) and the trust bundle that verifies it;
//! - two sessions of one identity get different credentials that cannot be mixed;
//! - an mTLS server configured with the bundle accepts the SVID and refuses one from another
//!   trust domain;
//! - a JWT-SVID carries the identity, session and audience, verifies against the JWT bundle
//!   the API serves (checked by the library), validates for its audience only, and stops
//!   validating when its session ends;
//! - managed mode: the server's trust-domain CA certifies the node's key as an intermediate;
//!   SVIDs chain to the server's root, also while the server is down;
//! - a process outside every principal gets `PermissionDenied`; a call without the
//!   `workload.spiffe.io` header gets `InvalidArgument`;
//! - an X.509-SVID stream sends a new SVID at half-life, and ends (`PermissionDenied`) when its
//!   session ends, also for a process that left the session's cgroup and outlives it.
//!
//! `corral_grants` in JWT-SVIDs is asserted in `example_spiffe_mtls.rs` (it needs a server).

use std::{
    net::{TcpListener, TcpStream},
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, ensure};
use corral_tests::{
    e2e::{bin, wait_for},
    fleet::{Agent, Dir, Node, Server, connected, free_port, text},
    privileged,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;

const ID: &str = "spiffe://e2e.corral/agent/spiffe";
/// Corral's X.509 extension holding the session.
const SESSION_OID: &str = "1.3.6.1.4.1.59999.1.1";

fn policy(workload: &Path) -> anyhow::Result<String> {
    corral_tests::fleet::workload_api_policy("spiffe://e2e.corral/agent/**", workload)
}

struct Setup {
    _agent: Agent,
    node: Node,
    _dir: Dir,
}

fn setup(name: &str) -> anyhow::Result<Option<Setup>> {
    setup_args(name, &[])
}

fn setup_args(name: &str, args: &[&str]) -> anyhow::Result<Option<Setup>> {
    if !privileged() {
        return Ok(None);
    }
    let dir = Dir::new(name)?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(None);
    };
    let file = dir.write("spiffe.yaml", &policy(&node.workload)?)?;
    let agent = Agent::standalone(&node, &file, args)?;
    Ok(Some(Setup {
        _agent: agent,
        node,
        _dir: dir,
    }))
}

/// The probe's last JSON line, run inside (`identity`, `session`) by `corral run`.
fn probe_in_session(node: &Node, session: &str, mode: &str) -> anyhow::Result<Value> {
    probe_args(node, session, &[mode])
}

fn probe_args(node: &Node, session: &str, args: &[&str]) -> anyhow::Result<Value> {
    let probe = bin("corral-spiffe-probe")?.display().to_string();
    let mut a = vec!["run", "--identity", ID, "--session", session, "--", &probe];
    a.extend_from_slice(args);
    let out = node.local(&a)?;
    last_json(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

fn last_json(stdout: &[u8]) -> anyhow::Result<Value> {
    let s = String::from_utf8_lossy(stdout);
    let line = s.lines().last().context("the probe printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

fn bytes(v: &Value) -> anyhow::Result<Vec<u8>> {
    v.as_array()
        .context("bytes")?
        .iter()
        .map(|b| {
            b.as_u64()
                .and_then(|b| u8::try_from(b).ok())
                .context("a byte")
        })
        .collect()
}

/// The session a leaf carries in Corral's extension (a DER UTF8String).
fn session_of(leaf: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == SESSION_OID)?;
    let (_, v) = x509_parser::der_parser::parse_der(ext.value).ok()?;
    v.as_str().ok().map(str::to_owned)
}

/// A client that always presents one certificate and key.
#[derive(Debug)]
struct Presented(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presented {
    fn resolve(
        &self,
        _issuers: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS server requiring client certificates that chain to `client_roots`, with a
/// certificate of its own from a throwaway CA; the client's result of one handshake.
fn mtls(
    client_roots: &[Vec<u8>],
    client_chain: Vec<Vec<u8>>,
    client_key: Vec<u8>,
) -> anyhow::Result<Result<(), String>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The server's own certificate (what it is, not what is tested).
    let server_ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&server_ca_key)?;
    let server_key = rcgen::KeyPair::generate()?;
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?
        .signed_by(&server_key, &rcgen::Issuer::new(ca, server_ca_key))?;
    let mut roots = rustls::RootCertStore::empty();
    for r in client_roots {
        roots.add(CertificateDer::from(r.clone()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )?;
    let mut client_roots_store = rustls::RootCertStore::empty();
    client_roots_store.add(ca_cert.der().clone())?;
    // The certificate and key as given, unchecked on this side (rustls would refuse a key
    // that does not match): what the server makes of them is what is tested.
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key)))?;
    let presented = rustls::sign::CertifiedKey::new(
        client_chain.into_iter().map(CertificateDer::from).collect(),
        key,
    );
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(client_roots_store)
        .with_client_cert_resolver(Arc::new(Presented(Arc::new(presented))));
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server_side = std::thread::spawn(move || -> Result<(), String> {
        let (mut sock, _) = listener.accept().map_err(|e| e.to_string())?;
        let mut conn =
            rustls::ServerConnection::new(Arc::new(server)).map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    let mut sock = TcpStream::connect(addr)?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(client), ServerName::try_from("localhost")?)?;
    let mut client_res = Ok(());
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            client_res = Err(e.to_string());
            break;
        }
    }
    // TLS 1.3: the client finishes before the server has checked its certificate; the
    // server's verdict is the one that counts.
    drop(sock);
    let server_res = server_side
        .join()
        .map_err(|_| anyhow::anyhow!("server thread"))?;
    Ok(server_res.and(client_res))
}

#[test]
fn a_principal_gets_its_own_svid_and_an_mtls_server_with_the_bundle_accepts_it_alone()
-> anyhow::Result<()> {
    let Some(s) = setup("spiffe-svid")? else {
        return Ok(());
    };
    let a = probe_in_session(&s.node, "s1", "svid")?;
    ensure!(a["error"].is_null(), "{a}");
    assert_eq!(a["spiffe_id"], ID, "{a}");
    assert_eq!(a["chain"], 1, "{a}");
    let leaf = bytes(&a["leaf"])?;
    assert_eq!(
        session_of(&leaf).as_deref(),
        Some("s1"),
        "session in the SVID"
    );
    let bundles = a["bundles"].as_object().context("bundles")?;
    let bundle = bundles
        .iter()
        .find(|(td, _)| td.contains("e2e.corral"))
        .map(|(_, b)| b)
        .context("a bundle for the principal's trust domain")?;
    let roots: Vec<Vec<u8>> = bundle
        .as_array()
        .context("authorities")?
        .iter()
        .map(bytes)
        .collect::<anyhow::Result<_>>()?;
    ensure!(!roots.is_empty(), "{a}");

    // Another session of the same identity: another credential.
    let b = probe_in_session(&s.node, "s2", "svid")?;
    ensure!(b["error"].is_null(), "{b}");
    assert_eq!(b["spiffe_id"], ID);
    let leaf_b = bytes(&b["leaf"])?;
    assert_ne!(leaf, leaf_b);
    assert_ne!(a["key"], b["key"]);
    assert_eq!(session_of(&leaf_b).as_deref(), Some("s2"));

    // mTLS with the bundle: each SVID with its own key is accepted; mixed, refused.
    let key_a = bytes(&a["key"])?;
    let key_b = bytes(&b["key"])?;
    assert_eq!(mtls(&roots, vec![leaf.clone()], key_a.clone())?, Ok(()));
    assert_eq!(mtls(&roots, vec![leaf_b.clone()], key_b)?, Ok(()));
    let mixed = mtls(&roots, vec![leaf.clone()], bytes(&b["key"])?)?;
    ensure!(
        mixed.is_err(),
        "s1's certificate with s2's key was accepted"
    );
    println!("s1's certificate with s2's key: {mixed:?}");

    // An SVID of another trust domain (its own CA) is refused by the same server.
    let other_ca_key = rcgen::KeyPair::generate()?;
    let mut other_ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    other_ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_issuer = rcgen::Issuer::new(other_ca, other_ca_key);
    let other_key = rcgen::KeyPair::generate()?;
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new())?;
    other.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://other.example/agent/spiffe".try_into()?,
    )];
    let other_cert = other.signed_by(&other_key, &other_issuer)?;
    let foreign = mtls(
        &roots,
        vec![other_cert.der().to_vec()],
        other_key.serialize_der(),
    )?;
    ensure!(foreign.is_err(), "another trust domain's SVID was accepted");
    println!("another trust domain's SVID: {foreign:?}");
    Ok(())
}

#[test]
fn outside_every_principal_is_denied_and_the_security_header_is_required() -> anyhow::Result<()> {
    let Some(s) = setup("spiffe-outside")? else {
        return Ok(());
    };
    // The same client, run by this test process: no principal.
    let out = std::process::Command::new(bin("corral-spiffe-probe")?)
        .arg("svid")
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", s.node.workload.display()),
        )
        .output()?;
    ensure!(!out.status.success());
    let v = last_json(&out.stdout)?;
    let err = v["error"].as_str().context("an error")?;
    ensure!(err.contains("PermissionDenied"), "{err}");
    println!("outside every principal: {err}");

    // Without the header (a raw client that does not add it): InvalidArgument, before
    // anything is looked at.
    let path = s.node.workload.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = rt.block_on(async move {
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")?
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await?;
        let mut c =
            corral_proto::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
        anyhow::Ok(
            c.fetch_x509svid(corral_proto::spiffe::X509svidRequest {})
                .await
                .err(),
        )
    })?;
    let status = status.context("a call without the header was answered")?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    Ok(())
}

/// The claims of a JWT (its payload, base64url JSON; no verification: the probe verified it).
fn claims(token: &str) -> anyhow::Result<Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).context("a JWT")?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    Ok(serde_json::from_slice(&raw)?)
}

fn session_enrolled(node: &Node, session: &str) -> anyhow::Result<bool> {
    Ok(node.status()?["principals"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["session"] == session)))
}

#[test]
fn a_jwt_svid_carries_the_session_and_stops_validating_when_the_session_ends() -> anyhow::Result<()>
{
    let Some(s) = setup("spiffe-jwt")? else {
        return Ok(());
    };
    // Session s1 lives while this holds it.
    let held = s.node.hold(ID, "s1")?;
    let a = probe_args(&s.node, "s1", &["jwt", "svc-a"])?;
    ensure!(a["error"].is_null(), "{a}");
    assert_eq!(
        a["spiffe_id"], ID,
        "verified by the library against the bundle: {a}"
    );
    let token = a["token"].as_str().context("token")?.to_owned();
    let c = claims(&token)?;
    assert_eq!(c["sub"], ID, "{c}");
    assert_eq!(c["corral_session"], "s1", "{c}");
    assert_eq!(c["aud"], serde_json::json!(["svc-a"]), "{c}");
    let ttl = c["exp"].as_u64().unwrap_or(0) - c["iat"].as_u64().unwrap_or(0);
    assert_eq!(ttl, 300, "5 minutes by default: {c}");

    // Another workload (session s2) validates it for its audience, and only that.
    let v = probe_args(&s.node, "s2", &["validate", "svc-a", &token])?;
    ensure!(v["error"].is_null(), "{v}");
    assert_eq!(v["spiffe_id"], ID);
    let w = probe_args(&s.node, "s2", &["validate", "svc-b", &token])?;
    let err = w["error"].as_str().context("another audience must fail")?;
    ensure!(err.contains("InvalidArgument"), "{err}");

    // The session ends: its token no longer validates, though unexpired.
    drop(held);
    corral_tests::e2e::wait_for(15, "session s1 to end", || {
        Ok((!session_enrolled(&s.node, "s1")?).then_some(()))
    })?;
    let x = probe_args(&s.node, "s2", &["validate", "svc-a", &token])?;
    let err = x["error"]
        .as_str()
        .context("an ended session's token must fail")?;
    ensure!(err.contains("ended"), "{err}");
    println!("after the session ended: {err}");
    Ok(())
}

#[test]
fn managed_nodes_sign_with_a_server_certified_intermediate_also_while_the_server_is_down()
-> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("spiffe-managed")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    // The trust domain's root CA, held by the server.
    let root_key = rcgen::KeyPair::generate()?;
    let mut root = rcgen::CertificateParams::new(Vec::<String>::new())?;
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "e2e.corral root");
    let root_cert = root.self_signed(&root_key)?;
    let cert_file = dir.write("td-ca.pem", &root_cert.pem())?;
    let key_file = dir.write("td-ca-key.pem", &root_key.serialize_pem())?;
    let (c, k) = (
        cert_file.display().to_string(),
        key_file.display().to_string(),
    );
    let mut server = Server::start_args(
        &dir,
        free_port()?,
        None,
        &["--workload-ca-cert", &c, "--workload-ca-key", &k],
    )?;
    let _agent = Agent::start(&node, &server.url, &[])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    let file = dir.write("spiffe.yaml", &policy(&node.workload)?)?;
    let out = server.apply(&file, &[])?;
    ensure!(out.status.success(), "apply: {}", text(&out));

    let check = |session: &str| -> anyhow::Result<()> {
        let v = probe_in_session(&node, session, "svid")?;
        ensure!(v["error"].is_null(), "{v}");
        assert_eq!(v["spiffe_id"], ID, "{v}");
        let certs: Vec<Vec<u8>> = v["certs"]
            .as_array()
            .context("certs")?
            .iter()
            .map(bytes)
            .collect::<anyhow::Result<_>>()?;
        assert_eq!(certs.len(), 2, "leaf and the node's intermediate");
        let bundles = v["bundles"].as_object().context("bundles")?;
        let served: Vec<Vec<u8>> = bundles
            .values()
            .next()
            .and_then(Value::as_array)
            .context("a bundle")?
            .iter()
            .map(bytes)
            .collect::<anyhow::Result<_>>()?;
        assert_eq!(
            served,
            [root_cert.der().to_vec()],
            "the bundle is the server's root"
        );
        // A service trusting only the trust domain's root accepts the chain.
        assert_eq!(mtls(&served, certs, bytes(&v["key"])?)?, Ok(()));
        Ok(())
    };
    // The intermediate arrives right after connecting.
    wait_for(10, "SVIDs chained to the server's root", || {
        let v = probe_in_session(&node, "s0", "svid")?;
        Ok((v["chain"] == 2).then_some(()))
    })?;
    check("s1")?;
    // The server goes: the node goes on issuing under its intermediate.
    server.stop()?;
    check("s2")?;
    Ok(())
}

#[test]
fn an_x509_stream_rotates_at_half_life_and_ends_when_its_session_does_for_a_process_that_outlives_it()
-> anyhow::Result<()> {
    // 10 s SVIDs: the stream sends a new one after 5 s.
    let Some(s) = setup_args("spiffe-stream-end", &["--svid-ttl-secs", "10"])? else {
        return Ok(());
    };
    // A container's cgroup, made by the test and enrolled the way an OCI runtime's hook
    // enrols one (`corral oci-hook`, the state on stdin): it is the runtime's, so the
    // principal ends when the cgroup goes.
    let base = corral_agent::paths::cgroup2_root()?.join("corral-test");
    let (ctr, out) = (
        base.join(format!("{}-ctr", s.node.name)),
        base.join(format!("{}-out", s.node.name)),
    );
    std::fs::create_dir_all(&ctr)?;
    std::fs::create_dir_all(&out)?;
    struct Rmdir(Vec<std::path::PathBuf>);
    impl Drop for Rmdir {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
    let _dirs = Rmdir(vec![ctr.clone(), out.clone()]);
    let holder = std::process::Command::new("sleep").arg("600").spawn()?;
    let holder_pid = holder.id();
    let mut holder = corral_tests::e2e::Reaped(Some(holder));
    std::fs::write(ctr.join("cgroup.procs"), holder_pid.to_string())?;
    let state = serde_json::json!({
        "ociVersion": "1.0.2", "id": "w1", "status": "creating", "pid": holder_pid,
        "annotations": { "corral.dev/identity": ID, "corral.dev/session": "w1" },
    });
    let mut hook = std::process::Command::new(bin("corral")?)
        .args(["oci-hook", "--socket"])
        .arg(&s.node.socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write as _;
        hook.stdin
            .take()
            .context("stdin")?
            .write_all(state.to_string().as_bytes())?;
    }
    let hooked = hook.wait_with_output()?;
    ensure!(hooked.status.success(), "oci-hook: {}", text(&hooked));

    // The watcher joins the container, opens its stream, then leaves for another cgroup.
    let mut watcher = std::process::Command::new(bin("corral-spiffe-probe")?)
        .arg("watch")
        .arg(&ctr)
        .arg(&out)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", s.node.workload.display()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = watcher.stdout.take().context("stdout")?;
    let _watcher = corral_tests::e2e::Reaped(Some(watcher));
    let lines = corral_tests::e2e::json_lines(stdout);
    let wait = std::time::Duration::from_secs(15);
    let first = lines.recv_timeout(wait).context("no SVID")?;
    let t0 = std::time::Instant::now();
    ensure!(first["error"].is_null(), "{first}");
    assert_eq!(first["spiffe_id"], ID, "{first}");
    assert_eq!(session_of(&bytes(&first["leaf"])?).as_deref(), Some("w1"));
    let left = lines.recv_timeout(wait).context("did not leave")?;
    ensure!(left["left"].is_string(), "{left}");
    // While the container's principal lives, the stream goes on: rotated at half-life.
    let rotated = lines.recv_timeout(wait).context("no rotation")?;
    let after = t0.elapsed();
    ensure!(rotated["error"].is_null(), "{rotated}");
    ensure!(
        after >= std::time::Duration::from_millis(4500),
        "rotated after {after:?}, before half-life"
    );
    assert_ne!(rotated["leaf"], first["leaf"], "a new certificate");
    assert_eq!(session_of(&bytes(&rotated["leaf"])?).as_deref(), Some("w1"));
    println!("rotated after {after:?}");

    // The container ends: its processes exit and the runtime removes its cgroup.
    drop(holder.0.take().map(|mut h| {
        let _ = h.kill();
        h.wait()
    }));
    wait_for(10, "the container's cgroup to go", || {
        Ok(std::fs::remove_dir(&ctr).is_ok().then_some(()))
    })?;
    let t = std::time::Instant::now();
    let end = lines
        .recv_timeout(wait)
        .context("the stream did not end with the session")?;
    let err = end["error"].as_str().context("an error ends it")?;
    ensure!(
        err.contains("PermissionDenied") && err.contains("session ended"),
        "{end}"
    );
    println!(
        "stream ended {:?} after the cgroup went: {err}",
        t.elapsed()
    );
    Ok(())
}
