//! One shutdown future for SIGTERM/SIGINT, broadcast to every task through a watch channel.

use tokio::sync::watch;

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

/// Resolves on the first SIGTERM or SIGINT (returns the signal's name).
pub async fn signal() -> Result<&'static str, std::io::Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
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
}
