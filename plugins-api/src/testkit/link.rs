//! Links in memory: two ends of a [`Link`] joined by bounded channels, for
//! tests and benchmarks of what runs over a link without a network.

use tokio::sync::mpsc;

use crate::{Link, NodeId, TransportError};

/// Frames each direction holds before `send` waits.
const QUEUE: usize = 4;

struct MemoryLink {
    peer: NodeId,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    rx: mpsc::Receiver<Vec<u8>>,
}

#[async_trait::async_trait]
impl Link for MemoryLink {
    fn peer(&self) -> NodeId {
        self.peer
    }
    fn transport(&self) -> &'static str {
        "memory"
    }
    async fn send(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| TransportError::Closed("finished".into()))?;
        tx.send(frame.to_vec())
            .await
            .map_err(|_| TransportError::Closed("the other end is gone".into()))
    }
    async fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        Ok(self.rx.recv().await)
    }
    async fn finish(&mut self) -> Result<(), TransportError> {
        self.tx = None;
        Ok(())
    }
}

/// Two ends of one link: the first is `a`'s (its peer is `b`), the second
/// `b`'s. Dropping or finishing one end ends the other's `recv`.
pub fn memory_link_pair(a: NodeId, b: NodeId) -> (Box<dyn Link>, Box<dyn Link>) {
    let (to_b, from_a) = mpsc::channel(QUEUE);
    let (to_a, from_b) = mpsc::channel(QUEUE);
    (
        Box::new(MemoryLink {
            peer: b,
            tx: Some(to_b),
            rx: from_b,
        }),
        Box::new(MemoryLink {
            peer: a,
            tx: Some(to_a),
            rx: from_a,
        }),
    )
}
