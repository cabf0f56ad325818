//! `corral policy check` / `explain` as a user runs them: the real binary, real files.

use std::process::Command;

fn corral(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(args)
        .output()
        .expect("run corral");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example(name: &str) -> String {
    format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_accepts_every_example() {
    let dir = format!("{}/../examples", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("examples dir") {
        let p = e.expect("entry").path();
        if p.extension().and_then(|x| x.to_str()) == Some("yaml") {
            let (code, out, err) = corral(&["policy", "check", &p.display().to_string()]);
            assert_eq!(code, 0, "{}: {err}", p.display());
            assert!(out.contains(": ok: "), "{out}");
            n += 1;
        }
    }
    assert!(n >= 5);
}

#[test]
fn check_rejects_with_one_located_line_per_error() {
    let dir = std::env::temp_dir().join(format!("corral-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let file = dir.join("bad.yaml");
    let src = std::fs::read_to_string(example("quickstart.yaml"))
        .expect("quickstart")
        .replace("ports: [53]", "ports: [53000000]")
        .replace("127.0.0.53/32", "127.0.0.53/8");
    std::fs::write(&file, &src).expect("write");
    let f = file.display().to_string();
    let (code, out, err) = corral(&["policy", "check", &f]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    let line_of = |needle: &str| {
        src.lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .expect("needle")
    };
    let col_of = |needle: &str| {
        src.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.find(needle))
            .map(|i| i + 1)
            .expect("needle")
    };
    assert_eq!(
        lines[0],
        format!(
            "{f}:{}:{}: CIDR `127.0.0.53/8` has host bits set: write `127.0.0.0/8`",
            line_of("127.0.0.53/8"),
            col_of("127.0.0.53/8")
        )
    );
    assert!(
        lines[1].starts_with(&format!(
            "{f}:{}:{}: port `53000000` is out of range",
            line_of("53000000"),
            col_of("53000000")
        )),
        "{err}"
    );
    let (code, _, err) = corral(&["policy", "check", "/nonexistent/p.yaml"]);
    assert_ne!(code, 0);
    assert!(
        err.starts_with("cannot read policy file /nonexistent/p.yaml"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn explain_quickstart() {
    let q = example("quickstart.yaml");
    let id = "spiffe://demo.corral/agent/quickstart";
    let (code, out, err) = corral(&[
        "policy",
        "explain",
        "--policy",
        &q,
        "--identity",
        id,
        "--connect",
        "127.0.0.1:9090/tcp",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("verdict:  deny"), "{out}");
    assert!(out.contains("zone:     local"), "{out}");
    assert!(out.contains(&format!("rule:     #1 at {q}:")), "{out}");
    let (_, out, _) = corral(&[
        "policy",
        "explain",
        "--policy",
        &q,
        "--identity",
        id,
        "--connect",
        "127.0.0.1:8080",
    ]);
    assert!(
        out.contains("verdict:  allow") && out.contains("rule:     #0 at"),
        "{out}"
    );
    let (_, out, _) = corral(&[
        "policy",
        "explain",
        "--policy",
        &q,
        "--identity",
        id,
        "--connect",
        "[::1]:22/udp",
    ]);
    assert!(
        out.contains("verdict:  deny") && out.contains("default action (deny)"),
        "{out}"
    );
    let (_, out, _) = corral(&[
        "policy",
        "explain",
        "--policy",
        &q,
        "--identity",
        id,
        "--exec",
        "/usr/bin/curl",
    ]);
    assert!(
        out.contains("verdict:  deny") && out.contains("rule:     #1 at"),
        "{out}"
    );
    let (_, out, _) = corral(&[
        "policy",
        "explain",
        "--policy",
        &q,
        "--identity",
        "spiffe://demo.corral/other",
        "--exec",
        "/usr/bin/env",
    ]);
    assert!(out.contains("policy:   none"), "{out}");
    let (code, _, err) = corral(&[
        "policy",
        "explain",
        "--policy",
        &q,
        "--identity",
        "nope",
        "--exec",
        "/bin/sh",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--identity: `nope` is not a SPIFFE ID"),
        "{err}"
    );
}
