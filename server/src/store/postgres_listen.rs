//! Being told at once when another replica commits: one connection per replica (outside the
//! pool) that `LISTEN`s on the channel every commit notifies (`postgres_schema::CHANGES`). A
//! notification, and every (re)connection of this listener, wakes [`crate::replicas`], which
//! reads the database; notifications sent while the listener was down are lost, which is why
//! that task also checks on a timer.

use std::{sync::Arc, time::Duration};

use corral_runtime::shutdown::ShutdownSignal;
use tokio::sync::{Notify, mpsc};
use tokio_postgres::AsyncMessage;
use tracing::{debug, warn};

use super::{
    StoreError,
    postgres::redacted,
    postgres_schema::{CHANGES, pg},
};

/// Waits before connecting again after the listener's connection failed.
const RETRY: Duration = Duration::from_secs(1);

/// Listens on `url` until `stop`, waking `wake` on every notification and (re)connection.
pub async fn listen_task(url: String, wake: Arc<Notify>, mut stop: ShutdownSignal) {
    loop {
        match listen(&url, &wake, &mut stop).await {
            Ok(()) => return,
            Err(e) => warn!(
                url = %redacted(&url),
                error = %corral_runtime::error_chain(&e),
                "listening for other replicas' changes failed; the periodic check covers until it reconnects"
            ),
        }
        tokio::select! {
            () = stop.wait() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// One listening connection: `Ok` when stopped, an error when the connection is lost.
async fn listen(url: &str, wake: &Notify, stop: &mut ShutdownSignal) -> Result<(), StoreError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| StoreError::PgConnect {
        url: redacted(url),
        source: Box::new(e),
    })?;
    config.connect_timeout(Duration::from_secs(5));
    let (client, mut conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(pg("connect to listen"))?;
    // The connection is driven here; its notifications come out of `poll_message`.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    debug!(error = %e, "the listening connection failed");
                    return;
                }
                None => return,
            }
        }
    });
    let listened = client
        .batch_execute(&format!("LISTEN {CHANGES}"))
        .await
        .map_err(pg("listen for changes"));
    if let Err(e) = listened {
        driver.abort();
        return Err(e);
    }
    // What changed while this replica was not listening.
    wake.notify_one();
    loop {
        tokio::select! {
            () = stop.wait() => {
                driver.abort();
                return Ok(());
            }
            m = rx.recv() => match m {
                Some(what) => {
                    debug!(%what, "another replica committed");
                    wake.notify_one();
                }
                None => return Err(StoreError::PgListenEnded),
            }
        }
    }
}
