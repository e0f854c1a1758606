//! Answers already sent, by (sender, request nonce), so that a node that
//! missed an answer and sends the very same request again gets the very
//! same answer, and the request (a match that reserves space, say) is not
//! carried out twice.
//!
//! Bounded by bytes (`answer_cache_bytes`) and by time (an answer is kept
//! for the replay window; after it, the replay guard refuses the request as
//! stale anyway). Answers leave in the order they were put.
//!
//! An answer is sent again at most once: anyone on the broker can copy a
//! request, and re-publishing it a hundred times must not push a hundred
//! answers to its sender.

use std::collections::{HashMap, VecDeque};

use pluto_plugins_api::NodeId;

/// A request: its sender and nonce.
type RequestKey = (NodeId, [u8; 16]);

/// An answer kept: the request's digest, the signed reply, when it lapses,
/// whether it was sent again already.
type Answer = ([u8; 32], Vec<u8>, u64, bool);

/// What to do with a request, by what was answered before.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Kept {
    /// Not answered yet (or its answer lapsed, or another request).
    New,
    /// Answered: send this again.
    Again(Vec<u8>),
    /// Answered and sent again already: nothing more.
    Spent,
}

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
    /// (same digest) was answered, the answer has not lapsed and was not
    /// sent again already.
    pub(crate) fn get(
        &mut self,
        from: &NodeId,
        nonce: &[u8; 16],
        request: &[u8; 32],
        now: u64,
    ) -> Kept {
        match self.map.get_mut(&(*from, *nonce)) {
            Some((digest, reply, expiry, again)) if digest == request && *expiry > now => {
                if std::mem::replace(again, true) {
                    Kept::Spent
                } else {
                    Kept::Again(reply.clone())
                }
            }
            _ => Kept::New,
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
            if let Some((_, r, _, _)) = self.map.remove(&key) {
                self.bytes -= r.len();
            }
        }
        self.bytes += reply.len();
        if let Some((_, old, _, _)) = self.map.insert(key, (request, reply, expiry, false)) {
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
            a.get(&key(1).0, &key(1).1, &[2; 32], 150),
            Kept::New,
            "another request"
        );
        assert_eq!(
            a.get(&key(2).0, &key(1).1, &[1; 32], 150),
            Kept::New,
            "another sender"
        );
        assert_eq!(
            a.get(&key(1).0, &key(1).1, &[1; 32], 200),
            Kept::New,
            "lapsed"
        );
    }

    #[test]
    fn an_answer_is_sent_again_once() {
        let mut a = Answers::new(1000);
        a.put(key(1), [1; 32], b"reply".to_vec(), 200, 100);
        assert_eq!(
            a.get(&key(1).0, &key(1).1, &[1; 32], 150),
            Kept::Again(b"reply".to_vec())
        );
        for _ in 0..100 {
            assert_eq!(a.get(&key(1).0, &key(1).1, &[1; 32], 150), Kept::Spent);
        }
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
            Kept::New,
            "the oldest left"
        );
        assert!(matches!(
            a.get(&key(3).0, &key(3).1, &[3; 32], 1),
            Kept::Again(_)
        ));
        // An answer bigger than the budget is not kept, and pushes nothing out.
        a.put(key(4), [4; 32], vec![4; 11], 1000, 0);
        assert_eq!(a.get(&key(4).0, &key(4).1, &[4; 32], 1), Kept::New);
        assert!(a.map.contains_key(&key(3)));
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
