//! A real PostgreSQL for the control-plane tests: a throwaway cluster (Debian's `postgresql`,
//! found under `/usr/lib/postgresql/*/bin`) made by `initdb` in a temp dir and run as the
//! `postgres` user on a loopback port of its own, trust authentication for user `corral`.
//! It can be stopped and started again on the same data (a restart test), and is stopped by
//! pid on drop.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::fleet::{Dir, free_port};

pub struct Postgres {
    child: Option<Child>,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    pub port: u16,
    _dir: Dir,
}

/// The directory of the newest PostgreSQL's programs, if one is installed.
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// `setpriv` to the `postgres` user (initdb and postgres refuse to run as root).
fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ])
    .arg(program);
    c
}

impl Postgres {
    /// Makes a new cluster and starts it.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let bin = bin_dir()
            .context("PostgreSQL is not installed (Debian's `postgresql`: .ci/run installs it)")?;
        let dir = Dir::new(&format!("pg-{name}"))?;
        // The postgres user needs its own directory: data (0700) and the unix socket.
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755))?;
        let data = dir.0.join("data");
        std::fs::create_dir(&data)?;
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir.0)
            .status()?;
        anyhow::ensure!(st.success(), "chown the cluster's directory to postgres");
        let log = dir.0.join("postgres.log");
        let out = as_postgres(&bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "corral",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut pg = Self {
            child: None,
            bin,
            data,
            log,
            port: free_port()?,
            _dir: dir,
        };
        pg.run()?;
        Ok(pg)
    }

    /// The URL `corral-server --db` takes.
    pub fn url(&self) -> String {
        format!("postgres://corral@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs one SQL statement with `psql`; its unaligned output.
    pub fn sql(&self, query: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "corral",
            ])
            .args(["-d", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("-c")
            .arg(query)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("psql {query:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts the server on the cluster's data, then waits until it accepts connections.
    fn run(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let sockets = self.data.parent().unwrap_or(&self.data).to_owned();
        let child = as_postgres(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .arg("-c")
            .arg(format!("port={}", self.port))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", sockets.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start postgres")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p"])
                .arg(self.port.to_string())
                .status()?
                .success();
            if ready {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                self.child = None;
                bail!(
                    "postgres exited ({st}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres not ready in 30 s: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (a fast shutdown, SIGINT: clients are disconnected, work is saved),
    /// keeping the data.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.signal("-INT")
    }

    /// Kills the server (SIGKILL: no shutdown at all), keeping the data.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.signal("-KILL")
    }

    fn signal(&mut self, sig: &str) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .arg(sig)
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while c.try_wait()?.is_none() {
            if Instant::now() > deadline {
                c.kill()?;
                c.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts it again on the same data and port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.run()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
