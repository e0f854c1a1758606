//! One link's reliability and flow control, as a pure state machine: the
//! caller passes packets, frames and the time in, and takes out payloads to
//! transmit and frames to deliver.
//!
//! Sending: frames are cut into segments of at most `seg_max` bytes, each
//! with a sequence number and its stream offset. New segments go out while
//! the bytes in flight stay under the send window and their offsets under
//! the peer's `max_data`. A segment is forgotten once cumulatively acked;
//! selectively acked ones are not resent; the others are resent after the
//! retransmission timeout (RTT-based, doubling on each expiry) or at once
//! when three later segments were selectively acked.
//!
//! Receiving: segments are buffered until they can be taken in order (at
//! most `max_ooo` beyond the next expected one, and only below the
//! `max_data` this end advertised), then reassembled into frames. This end
//! advertises `max_data = consumed + recv_window`, so the peer never makes
//! it hold more than `recv_window` bytes the application has not read.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::crypto::{Keys, OpenError, Opener, Sealer};
use crate::wire::{
    Plain, SegmentHeader, FLAG_CLOSE, FLAG_PING, MAX_SACKS, SEG_END_OF_FRAME, SEG_FIN, SEG_OPEN,
};

/// What both ends assume the other accepts before its first advertisement.
pub(crate) const INITIAL_MAX_DATA: u64 = 4 << 20;

/// The limits and timers of one link.
#[derive(Clone, Debug)]
pub(crate) struct Params {
    pub(crate) max_frame: usize,
    pub(crate) seg_max: usize,
    pub(crate) send_window: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) recv_window: usize,
    pub(crate) max_ooo: u64,
    pub(crate) initial_rto: Duration,
    pub(crate) min_rto: Duration,
    pub(crate) max_rto: Duration,
    pub(crate) keepalive: Duration,
    pub(crate) dead_after: Duration,
}

/// What the link hands the application.
#[derive(Debug)]
pub(crate) enum Delivery {
    Frame(Vec<u8>),
    End,
}

#[derive(Clone)]
struct Chunk {
    buf: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or_default()
    }
    fn len(&self) -> usize {
        self.end - self.start
    }
}

struct OutSegment {
    header: SegmentHeader,
    data: Chunk,
}

struct InFlight {
    seg: OutSegment,
    first_sent: Instant,
    last_sent: Instant,
    retransmitted: bool,
    sacked: bool,
    fast_resent: bool,
}

/// Counters of what was refused, for logs and tests.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Refused {
    pub(crate) unauthenticated: u64,
    pub(crate) replayed: u64,
    pub(crate) over_window: u64,
}

pub(crate) struct Conn {
    p: Params,
    sealer: Sealer,
    opener: Opener,
    // Sending.
    next_seq: u64,
    next_offset: u64,
    unsent: VecDeque<OutSegment>,
    unsent_bytes: usize,
    in_flight: BTreeMap<u64, InFlight>,
    in_flight_bytes: usize,
    peer_max_data: u64,
    fin_queued: bool,
    // Receiving.
    rcv_next: u64,
    ooo: BTreeMap<u64, (SegmentHeader, Vec<u8>)>,
    consumed: u64,
    advertised: u64,
    partial: Vec<u8>,
    peer_fin: bool,
    ack_due: bool,
    sack_due: bool,
    // Timing.
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
    last_heard: Instant,
    last_sent: Instant,
    // State.
    pub(crate) authenticated: bool,
    pub(crate) peer_closed: bool,
    pub(crate) failure: Option<String>,
    pub(crate) refused: Refused,
    /// Payloads to hand the carrier.
    pub(crate) transmit: Vec<Vec<u8>>,
    /// What to hand the application.
    pub(crate) delivered: Vec<Delivery>,
}

impl Conn {
    pub(crate) fn new(p: Params, keys: Keys, initiator: bool, now: Instant) -> Self {
        let rto = p.initial_rto;
        let mut c = Self {
            p,
            sealer: keys.seal,
            opener: keys.open,
            next_seq: 0,
            next_offset: 0,
            unsent: VecDeque::new(),
            unsent_bytes: 0,
            in_flight: BTreeMap::new(),
            in_flight_bytes: 0,
            peer_max_data: INITIAL_MAX_DATA,
            fin_queued: false,
            rcv_next: 0,
            ooo: BTreeMap::new(),
            consumed: 0,
            advertised: INITIAL_MAX_DATA,
            partial: Vec::new(),
            peer_fin: false,
            ack_due: false,
            sack_due: false,
            srtt: None,
            rttvar: Duration::ZERO,
            rto,
            last_heard: now,
            last_sent: now,
            authenticated: false,
            peer_closed: false,
            failure: None,
            refused: Refused::default(),
            transmit: Vec::new(),
            delivered: Vec::new(),
        };
        if initiator {
            c.queue(SEG_OPEN, empty_chunk());
        }
        c
    }

    fn fail(&mut self, why: impl Into<String>) {
        if self.failure.is_none() {
            self.failure = Some(why.into());
        }
    }

    fn queue(&mut self, flags: u8, data: Chunk) {
        let len = data.len();
        self.unsent.push_back(OutSegment {
            header: SegmentHeader {
                seq: self.next_seq,
                offset: self.next_offset,
                flags,
            },
            data,
        });
        self.next_seq += 1;
        self.next_offset += len as u64;
        self.unsent_bytes += len;
    }

    /// Whether the caller should hand over another frame now.
    pub(crate) fn wants_frames(&self) -> bool {
        !self.fin_queued && self.failure.is_none() && self.unsent_bytes < self.p.max_frame.max(1)
    }

    /// Queues a frame (the caller checked its size).
    pub(crate) fn push_frame(&mut self, frame: Vec<u8>) {
        if self.fin_queued {
            return;
        }
        let len = frame.len();
        let buf = Arc::new(frame);
        if len == 0 {
            self.queue(
                SEG_END_OF_FRAME,
                Chunk {
                    buf,
                    start: 0,
                    end: 0,
                },
            );
            return;
        }
        let mut start = 0;
        while start < len {
            let end = (start + self.p.seg_max).min(len);
            let flags = if end == len { SEG_END_OF_FRAME } else { 0 };
            self.queue(
                flags,
                Chunk {
                    buf: buf.clone(),
                    start,
                    end,
                },
            );
            start = end;
        }
    }

    /// Queues the end marker.
    pub(crate) fn push_fin(&mut self) {
        if !self.fin_queued {
            self.queue(SEG_FIN, empty_chunk());
            self.fin_queued = true;
        }
    }

    /// Whether everything this end queued, the end marker included, was acked.
    pub(crate) fn send_done(&self) -> bool {
        self.fin_queued && self.unsent.is_empty() && self.in_flight.is_empty()
    }

    /// Whether both directions are complete.
    pub(crate) fn done(&self) -> bool {
        self.send_done() && self.peer_fin
    }

    pub(crate) fn peer_finished(&self) -> bool {
        self.peer_fin
    }

    /// The application took `n` bytes of delivered frames.
    pub(crate) fn consumed(&mut self, n: u64) {
        self.consumed += n;
        let window = self.p.recv_window as u64;
        if self.consumed + window >= self.advertised + window / 4 {
            self.ack_due = true;
        }
    }

    fn base_plain(&mut self) -> Plain {
        self.advertised = self
            .advertised
            .max(self.consumed + self.p.recv_window as u64);
        Plain {
            flags: 0,
            ack: self.rcv_next,
            max_data: self.advertised,
            sacks: Vec::new(),
            segment: None,
        }
    }

    fn send(&mut self, plain: &Plain, data: &[u8], now: Instant) {
        match self.sealer.seal(plain, data) {
            Some(p) => {
                self.transmit.push(p);
                self.last_sent = now;
                self.ack_due = false;
            }
            None => self.fail("packet numbers exhausted"),
        }
    }

    fn send_segment(&mut self, seg: &OutSegment, now: Instant) {
        let mut plain = self.base_plain();
        plain.segment = Some(seg.header);
        self.send(&plain, seg.data.bytes(), now);
    }

    fn sacks(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &seq in self.ooo.keys() {
            match out.last_mut() {
                Some((_, end)) if *end == seq => *end += 1,
                _ => {
                    if out.len() == MAX_SACKS {
                        break;
                    }
                    out.push((seq, seq + 1));
                }
            }
        }
        out
    }

    /// A packet with acknowledgements only (and `flags`).
    fn send_control(&mut self, flags: u8, now: Instant) {
        let mut plain = self.base_plain();
        plain.flags = flags;
        plain.sacks = self.sacks();
        self.sack_due = false;
        self.send(&plain, &[], now);
    }

    /// Tells the peer this end forgets the link (best effort).
    pub(crate) fn send_close(&mut self, now: Instant) {
        self.send_control(FLAG_CLOSE, now);
    }

    /// Takes one payload the demultiplexer routed here; whether it authenticated.
    pub(crate) fn on_payload(&mut self, payload: Vec<u8>, now: Instant) -> bool {
        let (plain, data) = match self.opener.open(payload) {
            Ok(x) => x,
            Err(OpenError::Wire(e)) => {
                tracing::trace!("relay: dropped a malformed payload: {e}");
                self.refused.unauthenticated += 1;
                return false;
            }
            Err(OpenError::Auth) => {
                tracing::trace!("relay: dropped a payload that does not authenticate");
                self.refused.unauthenticated += 1;
                return false;
            }
            Err(OpenError::Replay) => {
                tracing::trace!("relay: dropped a replayed payload");
                self.refused.replayed += 1;
                return false;
            }
            Err(OpenError::Violation(e)) => {
                self.fail(format!("the peer broke the relay protocol: {e}"));
                return true;
            }
        };
        self.authenticated = true;
        self.last_heard = now;
        self.on_ack(&plain, now);
        if plain.flags & FLAG_PING != 0 {
            self.ack_due = true;
        }
        if plain.flags & FLAG_CLOSE != 0 {
            self.peer_closed = true;
        }
        if let Some(seg) = plain.segment {
            self.on_segment(seg, data);
        }
        true
    }

    fn on_ack(&mut self, plain: &Plain, now: Instant) {
        self.peer_max_data = self.peer_max_data.max(plain.max_data);
        let ack = plain.ack.min(self.next_seq);
        if let Some((&first, _)) = self.in_flight.first_key_value() {
            if ack > first {
                let rest = self.in_flight.split_off(&ack);
                let acked = std::mem::replace(&mut self.in_flight, rest);
                let mut sample = None;
                for f in acked.values() {
                    self.in_flight_bytes -= f.seg.data.len();
                    if !f.retransmitted {
                        sample = Some(now.saturating_duration_since(f.last_sent));
                    }
                }
                if let Some(s) = sample {
                    self.rtt_sample(s);
                } else {
                    self.rto = self.computed_rto();
                }
            }
        }
        if plain.sacks.is_empty() {
            return;
        }
        for &(s, e) in &plain.sacks {
            if s >= e || s >= self.next_seq {
                continue;
            }
            for (_, f) in self.in_flight.range_mut(s..e) {
                f.sacked = true;
            }
        }
        // Fast retransmission: a hole with three selectively acked segments after it.
        let mut sacked_above = self.in_flight.values().filter(|f| f.sacked).count();
        let mut resend = Vec::new();
        for (&seq, f) in &self.in_flight {
            if f.sacked {
                sacked_above -= 1;
            } else if sacked_above >= 3 && !f.fast_resent {
                resend.push(seq);
            }
        }
        for seq in resend {
            self.resend(seq, now, true);
        }
    }

    fn resend(&mut self, seq: u64, now: Instant, fast: bool) {
        let Some(f) = self.in_flight.get_mut(&seq) else {
            return;
        };
        f.retransmitted = true;
        f.last_sent = now;
        if fast {
            f.fast_resent = true;
        }
        let header = f.seg.header;
        let data = f.seg.data.clone();
        self.send_segment(&OutSegment { header, data }, now);
    }

    fn computed_rto(&self) -> Duration {
        let rto = match self.srtt {
            Some(srtt) => srtt + (self.rttvar * 4).max(Duration::from_millis(1)),
            None => self.p.initial_rto,
        };
        rto.clamp(self.p.min_rto, self.p.max_rto)
    }

    fn rtt_sample(&mut self, s: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(s);
                self.rttvar = s / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(s);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + s) / 8);
            }
        }
        self.rto = self.computed_rto();
    }

    fn on_segment(&mut self, h: SegmentHeader, data: Vec<u8>) {
        self.ack_due = true;
        if h.seq < self.rcv_next || self.ooo.contains_key(&h.seq) {
            return;
        }
        if h.seq - self.rcv_next >= self.p.max_ooo
            || h.offset.saturating_add(data.len() as u64) > self.advertised
        {
            self.refused.over_window += 1;
            return;
        }
        self.ooo.insert(h.seq, (h, data));
        while let Some((h, data)) = self.ooo.remove(&self.rcv_next) {
            self.rcv_next += 1;
            self.take_in_order(h, data);
            if self.failure.is_some() {
                return;
            }
        }
        self.sack_due = !self.ooo.is_empty();
    }

    fn take_in_order(&mut self, h: SegmentHeader, data: Vec<u8>) {
        if self.peer_fin {
            self.fail("the peer sent data after its end marker");
            return;
        }
        if h.flags & SEG_OPEN != 0 {
            return;
        }
        if h.flags & SEG_FIN != 0 {
            if !self.partial.is_empty() {
                self.fail("the peer ended in the middle of a frame");
                return;
            }
            self.peer_fin = true;
            self.delivered.push(Delivery::End);
            return;
        }
        if self.partial.len() + data.len() > self.p.max_frame {
            self.fail(format!(
                "the peer sent a frame over the limit of {} bytes",
                self.p.max_frame
            ));
            return;
        }
        if self.partial.is_empty() {
            self.partial = data;
        } else {
            self.partial.extend_from_slice(&data);
        }
        if h.flags & SEG_END_OF_FRAME != 0 {
            let frame = std::mem::take(&mut self.partial);
            self.delivered.push(Delivery::Frame(frame));
        }
    }

    /// Sends what the windows allow and the acknowledgements due.
    pub(crate) fn flush(&mut self, now: Instant) {
        if self.failure.is_some() {
            return;
        }
        while let Some(front) = self.unsent.front() {
            let len = front.data.len();
            if front.header.offset + len as u64 > self.peer_max_data
                || (!self.in_flight.is_empty()
                    && (self.in_flight_bytes + len > self.p.send_window
                        || self.in_flight.len() >= self.p.max_in_flight))
            {
                break;
            }
            let Some(seg) = self.unsent.pop_front() else {
                break;
            };
            self.unsent_bytes -= len;
            self.send_segment(&seg, now);
            self.in_flight_bytes += len;
            self.in_flight.insert(
                seg.header.seq,
                InFlight {
                    seg,
                    first_sent: now,
                    last_sent: now,
                    retransmitted: false,
                    sacked: false,
                    fast_resent: false,
                },
            );
        }
        if self.ack_due || self.sack_due {
            self.send_control(0, now);
        }
    }

    /// When [`Conn::on_timer`] next has something to do.
    pub(crate) fn deadline(&self) -> Instant {
        let mut d = (self.last_heard + self.p.dead_after).min(self.last_sent + self.p.keepalive);
        if let Some(f) = self.in_flight.values().next() {
            d = d.min(f.first_sent + self.p.dead_after);
        }
        if let Some(oldest) = self
            .in_flight
            .values()
            .filter(|f| !f.sacked)
            .map(|f| f.last_sent)
            .min()
        {
            d = d.min(oldest + self.rto);
        }
        if self.in_flight.is_empty() && !self.unsent.is_empty() {
            // Blocked on the peer's window: probe in case its update was lost.
            d = d.min(self.last_sent + self.rto);
        }
        d
    }

    /// Retransmissions, probes, keepalives and the dead-peer check.
    pub(crate) fn on_timer(&mut self, now: Instant) {
        if self.failure.is_some() {
            return;
        }
        let silent = now.saturating_duration_since(self.last_heard);
        if silent >= self.p.dead_after {
            self.fail(format!("no word from the peer for {silent:?}"));
            return;
        }
        if let Some(f) = self.in_flight.values().next() {
            if now.saturating_duration_since(f.first_sent) >= self.p.dead_after {
                self.fail(format!(
                    "the peer acknowledged nothing for {:?}",
                    self.p.dead_after
                ));
                return;
            }
        }
        let due: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| !f.sacked && now.saturating_duration_since(f.last_sent) >= self.rto)
            .map(|(&s, _)| s)
            .collect();
        if !due.is_empty() {
            for seq in due {
                self.resend(seq, now, false);
            }
            self.rto = (self.rto * 2).min(self.p.max_rto);
        }
        let idle = now.saturating_duration_since(self.last_sent);
        if (self.in_flight.is_empty() && !self.unsent.is_empty() && idle >= self.rto)
            || idle >= self.p.keepalive
        {
            self.send_control(FLAG_PING, now);
        }
    }
}

fn empty_chunk() -> Chunk {
    Chunk {
        buf: Arc::new(Vec::new()),
        start: 0,
        end: 0,
    }
}
