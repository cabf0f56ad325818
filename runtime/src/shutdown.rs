//! One shutdown future for SIGTERM/SIGINT, broadcast to every task through a watch channel.
//!
//! [`Signals::install`] takes over SIGTERM/SIGINT at once (the daemon calls it first thing), so
//! a signal at any point of the start (loading programs, the first Kubernetes pod sync) is kept
//! and leads to the ordinary clean shutdown instead of the default action (death by signal).

use std::future::Future;

use tokio::{
    signal::unix::{self, Signal, SignalKind},
    sync::watch,
};

/// The sending side: [`Shutdown::trigger`] tells every [`ShutdownSignal`] to stop.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

/// A task's view of the shutdown: `.wait().await` returns once shutdown has begun.
#[derive(Debug, Clone)]
pub struct ShutdownSignal {
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Self { tx }
    }

    pub fn subscribe(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
        }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl ShutdownSignal {
    pub async fn wait(&mut self) {
        // An error means the sender is gone: shutting down as well.
        let _ = self.rx.wait_for(|v| *v).await;
    }

    pub fn is_set(&self) -> bool {
        *self.rx.borrow()
    }
}

/// SIGTERM and SIGINT, handled from [`Signals::install`] on (a signal that arrives before
/// anyone waits is kept, not lost).
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
    /// A signal already taken by [`Signals::until`].
    seen: Option<&'static str>,
}

impl Signals {
    /// Installs the handlers now (needs the tokio runtime).
    pub fn install() -> Result<Self, std::io::Error> {
        Ok(Self {
            term: unix::signal(SignalKind::terminate())?,
            int: unix::signal(SignalKind::interrupt())?,
            seen: None,
        })
    }

    /// The first SIGTERM or SIGINT (its name); at once if one was already seen.
    pub async fn recv(&mut self) -> &'static str {
        if let Some(s) = self.seen {
            return s;
        }
        let s = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        self.seen = Some(s);
        s
    }

    /// Waits for `f`, unless a signal comes first: then returns the signal (kept for
    /// [`Signals::recv`]) and drops `f`.
    pub async fn until<F: Future>(&mut self, f: F) -> Result<F::Output, &'static str> {
        tokio::select! {
            r = f => Ok(r),
            s = self.recv() => Err(s),
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT (returns the signal's name). The handlers exist only
/// once this is first polled: a daemon uses [`Signals::install`] instead.
pub async fn signal() -> Result<&'static str, std::io::Error> {
    Ok(Signals::install()?.recv().await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_reaches_every_subscriber() {
        let s = Shutdown::new();
        let mut a = s.subscribe();
        let mut b = s.subscribe();
        assert!(!a.is_set());
        s.trigger();
        a.wait().await;
        b.wait().await;
        assert!(b.is_set());
    }

    #[tokio::test]
    async fn a_signal_before_anyone_waits_is_kept() {
        let mut s = Signals::install().expect("install");
        // SIGINT to ourselves: the test harness installs no handler, so without ours this
        // would end the test process.
        std::process::Command::new("kill")
            .args(["-INT", &std::process::id().to_string()])
            .status()
            .expect("kill");
        let never = std::future::pending::<()>();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), s.until(never)).await;
        assert_eq!(r.expect("the signal ends the wait"), Err("SIGINT"));
        assert_eq!(s.recv().await, "SIGINT", "kept for the shutdown");
    }
}
