//! Fan-out of enriched events to subscribers. Each subscriber has its own bounded queue; the
//! publisher never waits: when a queue is full the event is dropped for that subscriber only,
//! and counted (reported to it in `WatchEventsResponse.subscriber_dropped`, and in status).
//! A bounded history serves `corral events` without `--follow`.
//!
//! What travels is a [`HubEvent`]: the event's protobuf encoding, made once by the pipeline,
//! plus the few fields filters look at. Fan-out is a reference count per subscriber; the gRPC
//! layer sends the shared bytes as they are (`pb::WatchEventsResponse::shared`).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use corral_proto::v1 as pb;
use prost::Message as _;
use tokio::sync::mpsc;

use corral_policy::identity::{IdentityError, IdentityPattern};

/// One published event: its encoding and what filters need.
#[derive(Debug, Clone, PartialEq)]
pub struct HubEvent {
    pub seq: u64,
    /// The principal's identity (shared among that principal's events), empty if unknown.
    pub identity: Arc<str>,
    /// `pb::Verdict` as i32.
    pub verdict: i32,
    /// As [`kind`] names it.
    pub kind: &'static str,
    /// Protobuf encoding of the `pb::Event`.
    pub encoded: Bytes,
}

impl HubEvent {
    /// Encodes `e` (tests, and producers that have a `pb::Event` at hand).
    pub fn from_pb(e: &pb::Event) -> Self {
        Self {
            seq: e.seq,
            identity: e
                .principal
                .as_ref()
                .map_or_else(|| Arc::from(""), |p| Arc::from(p.identity.as_str())),
            verdict: e.decision.as_ref().map_or(0, |d| d.verdict),
            kind: kind(e),
            encoded: Bytes::from(e.encode_to_vec()),
        }
    }

    /// The event as a message (decodes; for consumers that need its fields).
    pub fn to_pb(&self) -> Result<pb::Event, prost::DecodeError> {
        pb::Event::decode(self.encoded.as_ref())
    }
}

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
    #[error("unknown event kind `{0}` (connect, exec, socket, process, grant, container, dns)")]
    Kind(String),
}

/// The kind of an event, as filters name it.
pub fn kind(e: &pb::Event) -> &'static str {
    match e.call {
        Some(pb::event::Call::Connect(_)) => "connect",
        Some(pb::event::Call::Exec(_)) => "exec",
        Some(pb::event::Call::Grant(_)) => "grant",
        Some(pb::event::Call::Socket(_)) => "socket",
        Some(pb::event::Call::Container(_)) => "container",
        Some(pb::event::Call::Dns(_)) => "dns",
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
            if !matches!(
                k.as_str(),
                "connect" | "exec" | "socket" | "process" | "grant" | "container" | "dns"
            ) {
                return Err(FilterError::Kind(k.clone()));
            }
        }
        Ok(Self {
            identity,
            verdicts: f.verdicts,
            kinds: f.kinds,
        })
    }

    pub fn matches(&self, e: &HubEvent) -> bool {
        if let Some(p) = &self.identity
            && !p.matches(&e.identity)
        {
            return false;
        }
        self.matches_call(e)
    }

    /// Verdict and kind (everything but the identity).
    fn matches_call(&self, e: &HubEvent) -> bool {
        if !self.verdicts.is_empty() && !self.verdicts.contains(&e.verdict) {
            return false;
        }
        self.kinds.is_empty() || self.kinds.iter().any(|k| k == e.kind)
    }
}

struct Sub {
    filter: Filter,
    tx: mpsc::Sender<Arc<HubEvent>>,
    dropped: Arc<AtomicU64>,
    /// The last identity matched against the filter, and the answer: events of one principal
    /// share their identity `Arc`, so a burst is matched once.
    last_identity: Option<(Arc<str>, bool)>,
}

impl Sub {
    fn wants(&mut self, e: &HubEvent) -> bool {
        if self.filter.identity.is_some() {
            let ok = match &self.last_identity {
                Some((id, ok)) if Arc::ptr_eq(id, &e.identity) => *ok,
                _ => {
                    let ok = self
                        .filter
                        .identity
                        .as_ref()
                        .is_none_or(|p| p.matches(&e.identity));
                    self.last_identity = Some((e.identity.clone(), ok));
                    ok
                }
            };
            if !ok {
                return false;
            }
        }
        self.filter.matches_call(e)
    }
}

struct Inner {
    history: VecDeque<Arc<HubEvent>>,
    subs: Vec<Sub>,
}

/// A live subscription.
pub struct Subscription {
    pub history: Vec<Arc<HubEvent>>,
    pub rx: Option<mpsc::Receiver<Arc<HubEvent>>>,
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
    pub fn publish(&self, batch: &[Arc<HubEvent>]) {
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
            inner.subs.retain_mut(|s| {
                if !s.wants(e) {
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
                last_identity: None,
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

    fn ev(seq: u64, identity: &str, verdict: pb::Verdict) -> Arc<HubEvent> {
        Arc::new(HubEvent::from_pb(&pb::Event {
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
        }))
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
    fn fan_out_shares_one_encoding_that_decodes_to_the_event() -> Result<(), prost::DecodeError> {
        let hub = Hub::new(4, 4);
        let mut a = hub.subscribe(Filter::default(), true);
        let mut b = hub.subscribe(Filter::default(), true);
        let e = ev(5, "spiffe://t/a", pb::Verdict::Allow);
        hub.publish(std::slice::from_ref(&e));
        let ga =
            a.rx.as_mut()
                .and_then(|r| r.try_recv().ok())
                .expect("a got it");
        let gb =
            b.rx.as_mut()
                .and_then(|r| r.try_recv().ok())
                .expect("b got it");
        assert!(
            Arc::ptr_eq(&ga, &e) && Arc::ptr_eq(&gb, &e),
            "no copy per subscriber"
        );
        let back = ga.to_pb()?;
        assert_eq!(back.seq, 5);
        assert_eq!(
            back.principal.map(|p| p.identity).as_deref(),
            Some("spiffe://t/a")
        );
        Ok(())
    }

    #[test]
    fn followers_filter_by_identity_across_alternating_principals() -> Result<(), FilterError> {
        let hub = Hub::new(0, 64);
        let f = Filter::new(Some(pb::EventFilter {
            identity: "spiffe://t/a/*".into(),
            ..Default::default()
        }))?;
        let mut s = hub.subscribe(f, true);
        let a = ev(0, "spiffe://t/a/x", pb::Verdict::Allow);
        let b = ev(0, "spiffe://t/b/x", pb::Verdict::Allow);
        let mut batch = Vec::new();
        for i in 0..20u64 {
            // Shared identity Arcs within a principal's burst, fresh ones in between.
            let src = if i % 3 == 0 { &b } else { &a };
            let mut e = (**src).clone();
            e.seq = i;
            if i % 5 == 0 {
                e.identity = Arc::from(&*src.identity);
            }
            batch.push(Arc::new(e));
        }
        hub.publish(&batch);
        let rx = s.rx.as_mut().expect("follow");
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(e.seq);
        }
        let want: Vec<u64> = (0..20).filter(|i| i % 3 != 0).collect();
        assert_eq!(got, want);
        Ok(())
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
