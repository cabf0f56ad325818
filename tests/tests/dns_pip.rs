//! `examples/pypi-only.yaml`, proven with the real `pip`: under the example policy, as is,
//! `pip download` and `pip install` fetch a package from `https://pypi.org/simple/` and
//! `https://files.pythonhosted.org/...`, reached by name through the agent's DNS proxy and a
//! real resolver (`dnsmasq`) that maps both names to a local HTTPS mirror the test starts
//! (Python's `http.server` with a certificate of the test's own). Nothing leaves the machine.
//! Another name is REFUSED by the proxy and never reaches the resolver.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use corral_tests::{
    dnsmasq::{Dnsmasq, Record},
    e2e::bin,
    fleet::{Agent, Dir, Node, free_port, stop_child, text},
    privileged,
};

const ID: &str = "spiffe://demo.corral/agent/pip";
const MIRROR: &str = "127.0.0.8";
const WHEEL: &str = "demo_pkg-1.0-py3-none-any.whl";

/// The mirror: `python3 -m http.server` over TLS on MIRROR:443, stopped by pid on drop.
struct Mirror(Child);

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = stop_child(&mut self.0);
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().context("run")?;
    ensure!(out.status.success(), "{cmd:?}: {}", text(&out));
    Ok(out)
}

/// A PEP 503 index for `demo-pkg` whose link is on files.pythonhosted.org, the wheel, and a
/// certificate for both names; returns the certificate's path.
fn mirror_files(root: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(root.join("simple/demo-pkg"))?;
    std::fs::create_dir_all(root.join("packages"))?;
    std::fs::write(
        root.join("simple/demo-pkg/index.html"),
        format!(
            "<!DOCTYPE html><html><body>\
             <a href=\"https://files.pythonhosted.org/packages/{WHEEL}\">{WHEEL}</a>\
             </body></html>\n"
        ),
    )?;
    let wheel = root.join("packages").join(WHEEL);
    run(Command::new("python3").args([
        "-c",
        "import sys, zipfile
z = zipfile.ZipFile(sys.argv[1], 'w')
z.writestr('demo_pkg/__init__.py', 'VALUE = 42\\n')
z.writestr('demo_pkg-1.0.dist-info/METADATA', 'Metadata-Version: 2.1\\nName: demo-pkg\\nVersion: 1.0\\n')
z.writestr('demo_pkg-1.0.dist-info/WHEEL', 'Wheel-Version: 1.0\\nGenerator: corral-tests\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n')
z.writestr('demo_pkg-1.0.dist-info/RECORD', 'demo_pkg/__init__.py,,\\ndemo_pkg-1.0.dist-info/METADATA,,\\ndemo_pkg-1.0.dist-info/WHEEL,,\\ndemo_pkg-1.0.dist-info/RECORD,,\\n')
z.close()",
        &wheel.display().to_string(),
    ]))?;
    let (cert, key) = (root.join("cert.pem"), root.join("key.pem"));
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=pypi.org",
        "-addext",
        "subjectAltName=DNS:pypi.org,DNS:files.pythonhosted.org",
        "-keyout",
        &key.display().to_string(),
        "-out",
        &cert.display().to_string(),
    ]))?;
    Ok(cert)
}

fn start_mirror(root: &Path, dir: &Dir) -> anyhow::Result<Mirror> {
    let log = dir.0.join("mirror.log");
    let child = Command::new("python3")
        .args([
            "-c",
            "import functools, http.server, ssl, sys
root, addr = sys.argv[1], sys.argv[2]
h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
s = http.server.ThreadingHTTPServer((addr, 443), h)
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
c.load_cert_chain(root + '/cert.pem', root + '/key.pem')
s.socket = c.wrap_socket(s.socket, server_side=True)
s.serve_forever()",
            &root.display().to_string(),
            MIRROR,
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let mut m = Mirror(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect((MIRROR, 443)).is_err() {
        if let Some(st) = m.0.try_wait()? {
            bail!(
                "the mirror exited with {st}: {}",
                std::fs::read_to_string(&log)?
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the mirror is not listening: {}",
                std::fs::read_to_string(&log)?
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    m.0.try_wait()?;
    Ok(m)
}

#[test]
fn pip_reaches_pypi_by_name_and_nothing_else() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("dns-pip")?;
    let root = dir.0.join("mirror");
    let cert = mirror_files(&root)?;
    let _mirror = start_mirror(&root, &dir)?;
    let resolver = Dnsmasq::start(
        &dir,
        &[
            Record::Address("pypi.org", MIRROR),
            Record::Address("files.pythonhosted.org", MIRROR),
            Record::Address("example.com", "127.0.0.9"),
        ],
        300,
    )?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pypi-only.yaml");
    let upstream = resolver.addr.to_string();
    let dns_port = free_port()?.to_string();
    let agent = Agent::standalone(
        &node,
        &example,
        &["--dns-upstream", &upstream, "--dns-port", &dns_port],
    )?;
    let cert = cert.display().to_string();
    let pip = |args: &[&str]| -> anyhow::Result<Output> {
        let mut a = vec![
            "run",
            "--identity",
            ID,
            "--session",
            "s1",
            "--",
            "/usr/bin/python3",
            "-m",
            "pip",
        ];
        a.extend_from_slice(args);
        a.extend_from_slice(&[
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-input",
            "--index-url",
            "https://pypi.org/simple/",
            "--cert",
            &cert,
            "demo-pkg",
        ]);
        // The machine's pip and TLS settings (PIP_*, /etc/pip.conf, CA bundles in the
        // environment, which win over `--cert`) stay out; the mirror's certificate is trusted.
        let mut cmd = Command::new(bin("corral")?);
        cmd.arg(a[0])
            .arg("--socket")
            .arg(&node.socket)
            .args(&a[1..]);
        for (k, _) in std::env::vars() {
            if k.starts_with("PIP_") || k.ends_with("_CA_BUNDLE") || k.contains("SSL_CERT") {
                cmd.env_remove(k);
            }
        }
        cmd.env("PIP_CONFIG_FILE", "/dev/null")
            .env("SSL_CERT_FILE", &cert)
            .env("REQUESTS_CA_BUNDLE", &cert);
        cmd.output().context("corral run pip")
    };
    let downloads = dir.0.join("downloads");
    let out = pip(&[
        "download",
        "--no-deps",
        "-d",
        &downloads.display().to_string(),
    ])?;
    ensure!(
        out.status.success(),
        "pip download: {}\nagent:\n{}\nresolver:\n{}",
        text(&out),
        agent.log_text(),
        resolver.log_text()
    );
    assert!(downloads.join(WHEEL).exists(), "{}", text(&out));
    let target = dir.0.join("site");
    let out = pip(&[
        "install",
        "--no-deps",
        "--break-system-packages",
        "--target",
        &target.display().to_string(),
    ])?;
    ensure!(out.status.success(), "pip install: {}", text(&out));
    assert!(
        target.join("demo_pkg/__init__.py").exists(),
        "{}",
        text(&out)
    );
    assert!(
        resolver.queries_for("pypi.org") >= 1,
        "{}",
        resolver.log_text()
    );
    assert!(
        resolver.queries_for("files.pythonhosted.org") >= 1,
        "{}",
        resolver.log_text()
    );

    // Python code run as the principal: its stdout, trimmed, and the run's output.
    let python = |code: &str| -> anyhow::Result<(String, Output)> {
        let out = node.local(&[
            "run",
            "--identity",
            ID,
            "--session",
            "s1",
            "--",
            "/usr/bin/python3",
            "-c",
            code,
        ])?;
        Ok((String::from_utf8_lossy(&out.stdout).trim().to_owned(), out))
    };
    // Anything else: the name does not resolve, and the resolver never hears of it.
    let (said, out) = python(
        "import socket
try:
    socket.getaddrinfo('example.com', 443)
    print('resolved')
except socket.gaierror as e:
    print('unresolved', e.errno)",
    )?;
    assert!(said.starts_with("unresolved"), "{}", text(&out));
    assert_eq!(
        resolver.queries_for("example.com"),
        0,
        "{}",
        resolver.log_text()
    );
    // And its address, known or not, is closed.
    let (said, out) = python(
        "import socket
s = socket.socket()
try:
    s.connect(('127.0.0.9', 443))
    print('connected')
except OSError as e:
    print('refused', e.errno)",
    )?;
    assert_eq!(said, format!("refused {}", libc::EPERM), "{}", text(&out));
    Ok(())
}
