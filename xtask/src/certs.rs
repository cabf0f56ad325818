//! `cargo xtask certs --out DIR`: a development CA and certificates for Corral's mTLS (rcgen).
//! For development and tests only: the CA key is written next to the certificates.
//!
//! Writes `ca.pem` (+ `ca-key.pem`), `server.pem`/`server-key.pem` (server auth; names
//! `localhost`, `127.0.0.1`, `::1` and each `--server-name`), and for each `--client` NAME
//! (default: `admin`, `node`) `NAME.pem`/`NAME-key.pem` (client auth, CN and DNS name =
//! NAME: the server lets an agent sync only as the node name its certificate carries).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write the PEM files to (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Extra DNS names or IP addresses for the server certificate.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Client certificates to issue (agents' node names, CLI users).
    #[arg(long = "client")]
    clients: Vec<String>,
}

fn write(dir: &Path, name: &str, pem: &str) -> anyhow::Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, pem).with_context(|| format!("write {}", p.display()))
}

fn leaf(
    dir: &Path,
    file: &str,
    cn: &str,
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<()> {
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.use_authority_key_identifier_extension = true;
    p.key_usages.push(KeyUsagePurpose::DigitalSignature);
    p.extended_key_usages.push(usage);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    write(dir, &format!("{file}.pem"), &cert.pem())?;
    write(dir, &format!("{file}-key.pem"), &key.serialize_pem())
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("create {}", a.out.display()))?;
    let mut ca = CertificateParams::new(Vec::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Corral development CA");
    ca.key_usages.push(KeyUsagePurpose::KeyCertSign);
    ca.key_usages.push(KeyUsagePurpose::CrlSign);
    ca.key_usages.push(KeyUsagePurpose::DigitalSignature);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    write(&a.out, "ca.pem", &ca_cert.pem())?;
    write(&a.out, "ca-key.pem", &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca, ca_key);
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    names.extend(a.server_names.iter().cloned());
    leaf(
        &a.out,
        "server",
        "corral-server",
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
        &issuer,
    )?;
    let clients = if a.clients.is_empty() {
        vec!["admin".to_owned(), "node".into()]
    } else {
        a.clients.clone()
    };
    for c in &clients {
        leaf(
            &a.out,
            c,
            c,
            vec![c.clone()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        )?;
    }
    println!(
        "wrote a development CA, a server certificate and client certificates ({}) to {}",
        clients.join(", "),
        a.out.display()
    );
    Ok(())
}
