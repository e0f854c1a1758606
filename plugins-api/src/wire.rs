//! The byte-level codec every pluto format is built from: little-endian
//! fixed-width integers, LEB128 varints, and length-prefixed byte strings.
//!
//! [`Reader`] never trusts a length it reads: a length longer than what is
//! left is an error before any allocation, so hostile input cannot make a
//! decoder allocate more than the input's size.

/// Input that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct DecodeError {
    /// What was being decoded.
    pub what: &'static str,
    /// What was wrong.
    pub why: String,
}

impl DecodeError {
    /// A decode error.
    pub fn new(what: &'static str, why: impl Into<String>) -> Self {
        Self {
            what,
            why: why.into(),
        }
    }
}

/// Appends encoded values to a buffer.
#[derive(Default, Debug)]
pub struct Writer {
    /// What was written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Four bytes, little-endian.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Eight bytes, little-endian.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Eight bytes, little-endian two's complement.
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// An unsigned LEB128 varint.
    pub fn varint(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(byte);
                return;
            }
            self.buf.push(byte | 0x80);
        }
    }
    /// A varint length, then the bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
    /// 32 raw bytes.
    pub fn id(&mut self, id: &[u8; 32]) {
        self.buf.extend_from_slice(id);
    }
    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads encoded values from a slice, refusing truncated or oversized input.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `buf`, naming errors after `what`.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }
    /// An error about the thing being read.
    pub fn error(&self, why: impl Into<String>) -> DecodeError {
        DecodeError::new(self.what, why)
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// Fails unless everything was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.error(format!("{} trailing bytes", self.buf.len())))
        }
    }
    /// `n` raw bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(self.error(format!("needs {n} bytes, {} left", self.buf.len())));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// A little-endian i64.
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }
    /// An unsigned LEB128 varint of at most 10 bytes, in its shortest form.
    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(self.error("varint overflows 64 bits"));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(self.error("varint not in shortest form"));
                }
                return Ok(v);
            }
        }
        Err(self.error("varint longer than 10 bytes"))
    }
    /// A count of items that each take at least `min_item` bytes; refused
    /// when the input is too short to hold that many.
    pub fn count(&mut self, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| self.error("count too large"))?;
        if n.saturating_mul(min_item.max(1)) > self.buf.len() {
            return Err(self.error(format!("count {n} exceeds the input")));
        }
        Ok(n)
    }
    /// A varint-prefixed byte string.
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| self.error("length too large"))?;
        self.take(n)
    }
    /// A varint-prefixed UTF-8 string.
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.error("string is not UTF-8"))
    }
    /// 32 raw bytes.
    pub fn id(&mut self) -> Result<[u8; 32], DecodeError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_round_trip(v: u64) {
            let mut w = Writer::new();
            w.varint(v);
            let buf = w.finish();
            let mut r = Reader::new(&buf, "test");
            prop_assert_eq!(r.varint().unwrap(), v);
            r.finish().unwrap();
        }

        #[test]
        fn reader_never_panics(data: Vec<u8>) {
            let mut r = Reader::new(&data, "test");
            let _ = r.varint();
            let _ = r.bytes();
            let _ = r.count(8);
            let _ = r.id();
        }
    }

    #[test]
    fn refuses_lies() {
        let mut r = Reader::new(&[0xff; 11], "test");
        assert!(r.varint().is_err());
        let mut r = Reader::new(&[0x80, 0x00], "test");
        assert!(r.varint().is_err(), "non-shortest form");
        let mut w = Writer::new();
        w.varint(1 << 40);
        let buf = w.finish();
        assert!(Reader::new(&buf, "test").bytes().is_err());
        assert!(Reader::new(&buf, "test").count(1).is_err());
    }
}
