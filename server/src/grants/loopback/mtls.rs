//! Under mTLS the caller is its client certificate's name, whatever header it sends.

use std::sync::Arc;

use corral_proto::v1::{
    grant_service_client::GrantServiceClient, grant_service_server::GrantServiceServer,
};
use corral_runtime::shutdown::Shutdown;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::{
    Code,
    transport::{
        Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig, server::TcpIncoming,
    },
};

use super::{harness::*, state};
use crate::{
    fleet::Fleet,
    grants::{Grants, service},
    store::{Change, PolicyStore, sqlite::SqliteStore},
};
use corral_proto::v1::GrantState;

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let mut ca = CertificateParams::new(Vec::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let ca_pem = ca.self_signed(&key)?.pem();
        Ok(Self {
            ca_pem,
            issuer: Issuer::new(ca, key),
        })
    }

    /// (cert PEM, key PEM) with these SANs.
    fn leaf(&self, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> anyhow::Result<Identity> {
        let mut p = CertificateParams::new(Vec::new())?;
        p.subject_alt_names = sans;
        p.key_usages.push(KeyUsagePurpose::DigitalSignature);
        p.extended_key_usages.push(usage);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Identity::from_pem(cert.pem(), key.serialize_pem()))
    }
}

fn dns(n: &str) -> anyhow::Result<SanType> {
    Ok(SanType::DnsName(n.try_into()?))
}

async fn client(url: &str, pki: &Pki, id: Identity) -> anyhow::Result<GrantServiceClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .identity(id)
        .domain_name("localhost");
    let ch = Channel::from_shared(url.to_owned())?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(GrantServiceClient::new(ch))
}

#[tokio::test]
async fn the_certificate_name_is_the_caller_and_the_header_is_ignored() -> anyhow::Result<()> {
    let db = temp_db("mtls");
    let store = Arc::new(SqliteStore::open(&db)?);
    store
        .commit(
            0,
            &Change {
                applied_by: "test".into(),
                upserts: vec![("agents".into(), POLICY.into())],
                deletes: Vec::new(),
            },
        )
        .await?;
    let fleet = Arc::new(Fleet::new(&store.current().await?, 16));
    let grants = Arc::new(Grants::new(
        store,
        fleet,
        &["spiffe://t/user/bob".to_owned()],
    ));
    let pki = Pki::new()?;
    let server_id = pki.leaf(vec![dns("localhost")?], ExtendedKeyUsagePurpose::ServerAuth)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://localhost:{}", listener.local_addr()?.port());
    let stop = Shutdown::new();
    let mut s = stop.subscribe();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(
                ServerTlsConfig::new()
                    .identity(server_id)
                    .client_ca_root(Certificate::from_pem(&pki.ca_pem)),
            )?
            .add_service(GrantServiceServer::new(service::GrantApi::new(grants)))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener),
                async move { s.wait().await },
            ),
    );
    let alice_id = pki.leaf(
        vec![dns("alice.example")?],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let bob_id = pki.leaf(
        vec![SanType::URI("spiffe://t/user/bob".try_into()?)],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let mut alice = client(&url, &pki, alice_id).await?;
    let mut bob = client(&url, &pki, bob_id).await?;

    // Alice claims to be bob in the header: her certificate says otherwise.
    let g = alice
        .request(as_user(
            "spiffe://t/user/bob",
            request("crm-write", "", 60, "r"),
        ))
        .await?
        .into_inner();
    assert!(
        g.requested_by.starts_with("alice.example from "),
        "{}",
        g.requested_by
    );
    let e = alice
        .approve(as_user("spiffe://t/user/bob", decision(&g.id, "")))
        .await
        .expect_err("not an approver");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(
        e.message().contains("`alice.example` is not an approver"),
        "{}",
        e.message()
    );
    // Bob (a URI name) is the approver.
    let a = bob.approve(decision(&g.id, "ok")).await?.into_inner();
    assert_eq!(state(&a), GrantState::Active);
    assert!(
        a.decided_by.starts_with("spiffe://t/user/bob from "),
        "{}",
        a.decided_by
    );
    // Bob may not approve what he requested, even as the only approver.
    let g = bob
        .request(request("crm-write", "", 60, "r"))
        .await?
        .into_inner();
    let e = bob.approve(decision(&g.id, "")).await.expect_err("self");
    assert_eq!(e.code(), Code::PermissionDenied);
    stop.trigger();
    let _ = std::fs::remove_file(&db);
    Ok(())
}
