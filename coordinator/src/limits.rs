//! Token buckets, one per node: relayed bytes per second, audits an owner
//! may ask for per second. Pure: the time is passed in.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` per second; a
//! node that has not been seen starts full. A clock that steps back does
//! not stop the refill: the bucket carries on from the new time.

use std::collections::HashMap;

use pluto_plugins_api::NodeId;

/// Past this many buckets, those idle for a minute (full again, so the
/// same as new ones) are forgotten.
const MANY: usize = 100_000;

/// One bucket per node.
#[derive(Debug)]
pub(crate) struct TokenBuckets {
    rate: u64,
    burst: u64,
    map: HashMap<NodeId, (f64, u64)>,
}

impl TokenBuckets {
    /// Buckets refilled at `rate` per second up to `burst`.
    pub(crate) fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate,
            burst,
            map: HashMap::new(),
        }
    }

    /// Takes `n` tokens from `node`'s bucket at `now_ms`; false when there
    /// are not enough (and then none are taken).
    pub(crate) fn take(&mut self, node: &NodeId, n: u64, now_ms: u64) -> bool {
        if self.map.len() > MANY {
            self.map
                .retain(|_, (_, at)| now_ms.saturating_sub(*at) < 60_000);
        }
        let burst = self.burst as f64;
        let (tokens, at) = self.map.entry(*node).or_insert((burst, now_ms));
        let elapsed = now_ms.saturating_sub(*at) as f64 / 1000.0;
        *tokens = (*tokens + elapsed * self.rate as f64).min(burst);
        // A clock that stepped back resumes refilling from its new time
        // rather than waiting to catch up with the old one.
        *at = now_ms;
        if *tokens >= n as f64 {
            *tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId([1; 32]);
    const B: NodeId = NodeId([2; 32]);

    #[test]
    fn a_burst_then_the_rate() {
        let mut b = TokenBuckets::new(100, 1000);
        assert!(b.take(&A, 600, 0));
        assert!(!b.take(&A, 600, 0), "the burst is spent");
        assert!(b.take(&B, 1000, 0), "each node has its own bucket");
        assert!(b.take(&A, 400, 0));
        assert!(!b.take(&A, 100, 500), "half a second refills 50");
        assert!(b.take(&A, 100, 1000));
        assert!(b.take(&A, 1000, 1_000_000), "refilled, up to the burst");
        assert!(!b.take(&A, 1001, 2_000_000), "never above the burst");
    }

    #[test]
    fn a_clock_that_steps_back_does_not_stop_the_refill() {
        let mut b = TokenBuckets::new(100, 1000);
        assert!(b.take(&A, 1000, 10_000_000));
        // An hour back: no refill for the step itself, but from then on.
        assert!(!b.take(&A, 1, 10_000_000 - 3_600_000));
        assert!(b.take(&A, 100, 10_000_000 - 3_600_000 + 1000));
    }
}
