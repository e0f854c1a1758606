//! Answers already sent, by (sender, request nonce), so that a node that
//! missed an answer and sends the very same request again gets the very
//! same answer, and the request (a match that reserves space, say) is not
//! carried out twice.
//!
//! Bounded by bytes (`answer_cache_bytes`) and by time (an answer is kept
//! for the replay window; after it, the replay guard refuses the request as
//! stale anyway). Answers leave in the order they were put.

use std::collections::{HashMap, VecDeque};

use pluto_plugins_api::NodeId;

/// A request: its sender and nonce.
type RequestKey = (NodeId, [u8; 16]);

/// An answer kept: the request's digest, the signed reply, when it lapses.
type Answer = ([u8; 32], Vec<u8>, u64);

/// The answers kept.
#[derive(Debug)]
pub(crate) struct Answers {
    map: HashMap<RequestKey, Answer>,
    order: VecDeque<(RequestKey, u64)>,
    bytes: usize,
    budget: usize,
}

impl Answers {
    /// Keeps at most `budget` bytes of answers.
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    /// The answer to `from`'s request `nonce`, when that very request
    /// (same digest) was answered and the answer has not lapsed.
    pub(crate) fn get(
        &self,
        from: &NodeId,
        nonce: &[u8; 16],
        request: &[u8; 32],
        now: u64,
    ) -> Option<Vec<u8>> {
        match self.map.get(&(*from, *nonce)) {
            Some((digest, reply, expiry)) if digest == request && *expiry > now => {
                Some(reply.clone())
            }
            _ => None,
        }
    }

    /// Keeps `reply` to request `key` (digest `request`) until `expiry`,
    /// forgetting lapsed answers and, when over budget, the oldest.
    pub(crate) fn put(
        &mut self,
        key: RequestKey,
        request: [u8; 32],
        reply: Vec<u8>,
        expiry: u64,
        now: u64,
    ) {
        // Checked first: one answer too big to keep does not push out the
        // others.
        if reply.len() > self.budget {
            return;
        }
        while let Some(&(key, at)) = self.order.front() {
            if at > now && self.bytes.saturating_add(reply.len()) <= self.budget {
                break;
            }
            self.order.pop_front();
            if let Some((_, r, _)) = self.map.remove(&key) {
                self.bytes -= r.len();
            }
        }
        self.bytes += reply.len();
        if let Some((_, old, _)) = self.map.insert(key, (request, reply, expiry)) {
            self.bytes -= old.len();
        }
        self.order.push_back((key, expiry));
    }

    /// Bytes of answers kept.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> RequestKey {
        (NodeId([n; 32]), [n; 16])
    }

    #[test]
    fn the_same_request_gets_the_same_answer_until_it_lapses() {
        let mut a = Answers::new(1000);
        a.put(key(1), [1; 32], b"reply".to_vec(), 200, 100);
        assert_eq!(
            a.get(&key(1).0, &key(1).1, &[1; 32], 150),
            Some(b"reply".to_vec())
        );
        assert_eq!(
            a.get(&key(1).0, &key(1).1, &[2; 32], 150),
            None,
            "another request"
        );
        assert_eq!(
            a.get(&key(2).0, &key(1).1, &[1; 32], 150),
            None,
            "another sender"
        );
        assert_eq!(a.get(&key(1).0, &key(1).1, &[1; 32], 200), None, "lapsed");
    }

    #[test]
    fn bounded_by_bytes_oldest_first() {
        let mut a = Answers::new(10);
        a.put(key(1), [1; 32], vec![1; 4], 1000, 0);
        a.put(key(2), [2; 32], vec![2; 4], 1000, 0);
        a.put(key(3), [3; 32], vec![3; 4], 1000, 0);
        assert_eq!(a.bytes(), 8);
        assert_eq!(
            a.get(&key(1).0, &key(1).1, &[1; 32], 1),
            None,
            "the oldest left"
        );
        assert!(a.get(&key(3).0, &key(3).1, &[3; 32], 1).is_some());
        // An answer bigger than the budget is not kept, and pushes nothing out.
        a.put(key(4), [4; 32], vec![4; 11], 1000, 0);
        assert_eq!(a.get(&key(4).0, &key(4).1, &[4; 32], 1), None);
        assert!(a.get(&key(3).0, &key(3).1, &[3; 32], 1).is_some());
        assert_eq!(a.bytes(), 8);
    }

    #[test]
    fn lapsed_answers_leave_first() {
        let mut a = Answers::new(100);
        a.put(key(1), [1; 32], vec![1; 10], 50, 0);
        a.put(key(2), [2; 32], vec![2; 10], 500, 100);
        assert_eq!(a.bytes(), 10);
    }
}
