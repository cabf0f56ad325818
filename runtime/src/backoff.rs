//! Jittered exponential backoff for reconnect loops.

use std::{
    hash::{BuildHasher as _, RandomState},
    time::Duration,
};

/// Jittered exponential backoff: the n-th delay is drawn from [d/2, d] with
/// d = min(max, min * 2^n) ("equal jitter"), so a fleet that lost the server does not
/// reconnect in lockstep.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    random: RandomState,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            attempt: 0,
            random: RandomState::new(),
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        let span = u64::try_from((d - half).as_nanos()).unwrap_or(u64::MAX);
        let r = self.random.hash_one(self.attempt) % span.max(1);
        half + Duration::from_nanos(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(15));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10));
        let mut last = first;
        for _ in 0..30 {
            last = b.next_delay();
            assert!(last <= Duration::from_secs(15));
        }
        assert!(
            last >= Duration::from_millis(7500),
            "capped near 15 s: {last:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(10));
    }
}
