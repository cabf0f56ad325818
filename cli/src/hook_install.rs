//! `corral install-oci-hook [--root DIR] [--bin-dir DIR] [--hooks-dir DIR] [--socket S]
//! [--fail-open]`: puts the OCI hook on a node, as the DaemonSet's init container does (with
//! the host's directories mounted under `--root`):
//! - this binary as `BIN_DIR/corral` (copied from `/proc/self/exe`, then renamed into place),
//!   with `BIN_DIR/corral-oci-hook` a symlink to it;
//! - `HOOKS_DIR/corral.json`, the hook config CRI-O and Podman read (`createRuntime`, every
//!   container: see `oci_hook` for what it does with those that did not opt in).
//!
//! Idempotent: files already as they should be are left alone, so a restarted init container
//! changes nothing (and never replaces the binary while a runtime may be running it: a copy
//! is renamed over it, the running one keeps its inode). containerd has no hooks directory:
//! see deploy/README.md.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde_json::json;

use crate::error::CliError;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the node's root filesystem is (the init container mounts host paths under it).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Directory (on the node) for `corral` and the `corral-oci-hook` link.
    #[arg(long, default_value = "/opt/corral/bin")]
    bin_dir: PathBuf,
    /// OCI hooks directory (on the node) CRI-O and Podman read.
    #[arg(long, default_value = "/etc/containers/oci/hooks.d")]
    hooks_dir: PathBuf,
    /// The agent's socket as the hook will reach it on the node.
    #[arg(long, default_value = "/run/corral/agent.sock")]
    socket: PathBuf,
    /// Install the hook with `--fail-open` (opted-in containers start UNPOLICED while the
    /// agent is unreachable; recorded and reported).
    #[arg(long)]
    fail_open: bool,
}

/// The hook config (OCI hooks schema 1.0.0, as CRI-O and Podman read `hooks.d`).
pub fn hook_config(bin_dir: &Path, socket: &Path, fail_open: bool) -> serde_json::Value {
    let mut args = vec![
        "corral-oci-hook".to_owned(),
        "--socket".to_owned(),
        socket.display().to_string(),
    ];
    if fail_open {
        args.push("--fail-open".to_owned());
    }
    json!({
        "version": "1.0.0",
        "hook": {
            "path": bin_dir.join("corral-oci-hook"),
            "args": args,
            "timeout": 10,
        },
        // Every container: one that did not opt in may still join an enrolled pod (its exec
        // rules are then resolved in its files); the hook never stops those.
        "when": { "always": true },
        "stages": ["createRuntime"],
    })
}

/// `path` under `root` (both absolute node paths).
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Install {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` unless it already holds them (a temp file renamed into place, so
/// a reader sees the old file or the new one); returns whether it wrote.
fn put(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, CliError> {
    use std::os::unix::fs::PermissionsExt as _;
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(
        ".{}.corral-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(true)
}

/// What [`install`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub changed: Vec<PathBuf>,
}

/// Installs `exe` (this binary) and the hook config under `a.root`.
pub fn install(a: &Args, exe: &[u8]) -> Result<Installed, CliError> {
    let mut out = Installed::default();
    let bin_dir = under(&a.root, &a.bin_dir);
    let bin = bin_dir.join("corral");
    if put(&bin, exe, 0o755)? {
        out.changed.push(bin.clone());
    }
    let link = bin_dir.join("corral-oci-hook");
    if std::fs::read_link(&link).ok().as_deref() != Some(Path::new("corral")) {
        let tmp = bin_dir.join(".corral-oci-hook.corral-tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink("corral", &tmp).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &link).map_err(io(&link))?;
        out.changed.push(link);
    }
    let config = hook_config(&a.bin_dir, &a.socket, a.fail_open);
    let mut text = serde_json::to_vec_pretty(&config).map_err(|e| CliError::Install {
        path: a.hooks_dir.clone(),
        source: std::io::Error::other(e),
    })?;
    text.push(b'\n');
    let json = under(&a.root, &a.hooks_dir).join("corral.json");
    if put(&json, &text, 0o644)? {
        out.changed.push(json);
    }
    Ok(out)
}

pub async fn run(a: &Args) -> Result<ExitCode, CliError> {
    let self_exe = Path::new("/proc/self/exe");
    let exe = std::fs::read(self_exe).map_err(io(self_exe))?;
    let done = install(a, &exe)?;
    if done.changed.is_empty() {
        println!("OCI hook already installed under {}", a.root.display());
    }
    for p in &done.changed {
        println!("installed {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_once_and_then_changes_nothing() -> Result<(), CliError> {
        let root = std::env::temp_dir().join(format!("corral-hook-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let a = Args {
            root: root.clone(),
            bin_dir: "/usr/local/bin".into(),
            hooks_dir: "/etc/containers/oci/hooks.d".into(),
            socket: "/run/corral/agent.sock".into(),
            fail_open: false,
        };
        let first = install(&a, b"binary v1")?;
        assert_eq!(first.changed.len(), 3, "{first:?}");
        let bin = root.join("usr/local/bin/corral");
        assert_eq!(std::fs::read(&bin).ok().as_deref(), Some(&b"binary v1"[..]));
        assert_eq!(
            std::fs::read_link(root.join("usr/local/bin/corral-oci-hook")).ok(),
            Some(PathBuf::from("corral"))
        );
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join("etc/containers/oci/hooks.d/corral.json"))
                .map_err(io(&root))?,
        )
        .map_err(|e| CliError::Install {
            path: root.clone(),
            source: std::io::Error::other(e),
        })?;
        // The node's paths, not the init container's.
        assert_eq!(json["hook"]["path"], "/usr/local/bin/corral-oci-hook");
        assert_eq!(json["stages"][0], "createRuntime");
        assert_eq!(json["hook"]["args"][2], "/run/corral/agent.sock");

        assert_eq!(
            install(&a, b"binary v1")?,
            Installed::default(),
            "idempotent"
        );
        let upgraded = install(&a, b"binary v2")?;
        assert_eq!(upgraded.changed, vec![bin.clone()]);
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn the_shipped_hook_config_is_what_the_installer_writes() -> Result<(), CliError> {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/oci-hooks/corral.json");
        let text = std::fs::read(&shipped).map_err(io(&shipped))?;
        let shipped: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| CliError::Install {
                path: "corral.json".into(),
                source: std::io::Error::other(e),
            })?;
        assert_eq!(
            shipped,
            hook_config(
                Path::new("/opt/corral/bin"),
                Path::new("/run/corral/agent.sock"),
                false
            )
        );
        Ok(())
    }

    #[test]
    fn fail_open_is_in_the_hooks_args() {
        let c = hook_config(Path::new("/opt/bin"), Path::new("/s"), true);
        assert_eq!(c["hook"]["path"], "/opt/bin/corral-oci-hook");
        assert_eq!(c["hook"]["args"][3], "--fail-open");
    }
}
