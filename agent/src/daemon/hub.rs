//! Fan-out of enriched events to subscribers. Each subscriber has its own bounded queue; the
//! publisher never waits: when a queue is full the event is dropped for that subscriber only,
//! and counted (reported to it in `WatchEventsResponse.subscriber_dropped`, and in status).
//! A bounded history serves `corral events` without `--follow`.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use corral_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::identity::{IdentityError, IdentityPattern};

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    identity: Option<IdentityPattern>,
    verdicts: Vec<i32>,
    kinds: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("bad identity filter")]
    Identity(#[from] IdentityError),
    #[error("unknown event kind `{0}` (connect, exec)")]
    Kind(String),
}

/// The kind of an event, as filters name it.
pub fn kind(e: &pb::Event) -> &'static str {
    match e.call {
        Some(pb::event::Call::Connect(_)) => "connect",
        Some(pb::event::Call::Exec(_)) => "exec",
        None => "process",
    }
}

impl Filter {
    pub fn new(f: Option<pb::EventFilter>) -> Result<Self, FilterError> {
        let Some(f) = f else {
            return Ok(Self::default());
        };
        let identity = if f.identity.is_empty() {
            None
        } else {
            Some(IdentityPattern::parse(&f.identity)?)
        };
        for k in &f.kinds {
            if !matches!(k.as_str(), "connect" | "exec" | "process") {
                return Err(FilterError::Kind(k.clone()));
            }
        }
        Ok(Self {
            identity,
            verdicts: f.verdicts,
            kinds: f.kinds,
        })
    }

    pub fn matches(&self, e: &pb::Event) -> bool {
        if let Some(p) = &self.identity {
            let id = e.principal.as_ref().map_or("", |p| p.identity.as_str());
            if !p.matches(id) {
                return false;
            }
        }
        if !self.verdicts.is_empty() {
            let v = e.decision.as_ref().map_or(0, |d| d.verdict);
            if !self.verdicts.contains(&v) {
                return false;
            }
        }
        self.kinds.is_empty() || self.kinds.iter().any(|k| k == kind(e))
    }
}

struct Sub {
    filter: Filter,
    tx: mpsc::Sender<Arc<pb::Event>>,
    dropped: Arc<AtomicU64>,
}

struct Inner {
    history: VecDeque<Arc<pb::Event>>,
    subs: Vec<Sub>,
}

/// A live subscription.
pub struct Subscription {
    pub history: Vec<Arc<pb::Event>>,
    pub rx: Option<mpsc::Receiver<Arc<pb::Event>>>,
    pub dropped: Arc<AtomicU64>,
}

pub struct Hub {
    inner: Mutex<Inner>,
    history_cap: usize,
    queue: usize,
    /// Events published (each counted once, however many subscribers got it).
    pub published: AtomicU64,
    /// Events dropped for slow subscribers, summed over subscribers.
    pub subscriber_dropped: AtomicU64,
}

impl Hub {
    pub fn new(history_cap: usize, queue: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                history: VecDeque::with_capacity(history_cap.min(1 << 16)),
                subs: Vec::new(),
            }),
            history_cap,
            queue: queue.max(1),
            published: AtomicU64::new(0),
            subscriber_dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes a batch; never blocks on a subscriber.
    pub fn publish(&self, batch: &[Arc<pb::Event>]) {
        if batch.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let mut lost = 0u64;
        for e in batch {
            if self.history_cap > 0 {
                if inner.history.len() >= self.history_cap {
                    inner.history.pop_front();
                }
                inner.history.push_back(e.clone());
            }
            inner.subs.retain(|s| {
                if !s.filter.matches(e) {
                    return !s.tx.is_closed();
                }
                match s.tx.try_send(e.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.dropped.fetch_add(1, Ordering::Relaxed);
                        lost += 1;
                        true
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        }
        drop(inner);
        self.published
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if lost > 0 {
            self.subscriber_dropped.fetch_add(lost, Ordering::Relaxed);
        }
    }

    /// The matching history and, with `follow`, a queue of what comes after it (no gap, no
    /// duplicate: both are taken under the publisher's lock).
    pub fn subscribe(&self, filter: Filter, follow: bool) -> Subscription {
        let mut inner = self.lock();
        let history = inner
            .history
            .iter()
            .filter(|e| filter.matches(e))
            .cloned()
            .collect();
        let dropped = Arc::new(AtomicU64::new(0));
        let rx = follow.then(|| {
            let (tx, rx) = mpsc::channel(self.queue);
            inner.subs.push(Sub {
                filter,
                tx,
                dropped: dropped.clone(),
            });
            rx
        });
        Subscription {
            history,
            rx,
            dropped,
        }
    }

    /// Ends every follower's stream (at shutdown).
    pub fn close(&self) {
        self.lock().subs.clear();
    }

    pub fn subscribers(&self) -> usize {
        self.lock().subs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, identity: &str, verdict: pb::Verdict) -> Arc<pb::Event> {
        Arc::new(pb::Event {
            seq,
            principal: Some(pb::Principal {
                identity: identity.into(),
                ..Default::default()
            }),
            decision: Some(pb::Decision {
                verdict: verdict as i32,
                ..Default::default()
            }),
            call: Some(pb::event::Call::Connect(pb::ConnectCall::default())),
            ..Default::default()
        })
    }

    #[test]
    fn a_full_subscriber_loses_counted_events_and_others_get_everything() {
        let hub = Hub::new(10, 2);
        let mut slow = hub.subscribe(Filter::default(), true);
        let mut fast = hub.subscribe(Filter::default(), true);
        let mut fast_got = 0;
        for i in 0..10 {
            hub.publish(&[ev(i, "spiffe://t/a", pb::Verdict::Deny)]);
            let rx = fast.rx.as_mut().expect("follow");
            while rx.try_recv().is_ok() {
                fast_got += 1;
            }
        }
        assert_eq!(fast_got, 10);
        assert_eq!(fast.dropped.load(Ordering::Relaxed), 0);
        let rx = slow.rx.as_mut().expect("follow");
        let mut slow_got = 0;
        while rx.try_recv().is_ok() {
            slow_got += 1;
        }
        assert_eq!(slow_got, 2);
        assert_eq!(slow.dropped.load(Ordering::Relaxed), 8);
        assert_eq!(hub.subscriber_dropped.load(Ordering::Relaxed), 8);
        assert_eq!(hub.published.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn filters_select_identity_verdict_and_kind() -> Result<(), FilterError> {
        let hub = Hub::new(10, 10);
        hub.publish(&[
            ev(1, "spiffe://t/a", pb::Verdict::Deny),
            ev(2, "spiffe://t/b", pb::Verdict::Deny),
            ev(3, "spiffe://t/a", pb::Verdict::Allow),
        ]);
        let f = Filter::new(Some(pb::EventFilter {
            identity: "spiffe://t/a".into(),
            verdicts: vec![pb::Verdict::Deny as i32],
            kinds: vec![],
        }))?;
        let s = hub.subscribe(f, false);
        assert_eq!(s.history.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
        assert!(s.rx.is_none());
        let f = Filter::new(Some(pb::EventFilter {
            kinds: vec!["exec".into()],
            ..Default::default()
        }))?;
        assert!(hub.subscribe(f, false).history.is_empty());
        assert!(
            Filter::new(Some(pb::EventFilter {
                kinds: vec!["nope".into()],
                ..Default::default()
            }))
            .is_err()
        );
        Ok(())
    }
}
