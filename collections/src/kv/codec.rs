//! Little-endian binary encoding shared by the data-log records and the snapshot records.
//!
//! Fixed-width `u64`/`u32` little-endian integers and `u32`-length-prefixed byte strings: simple,
//! platform-independent and easy to document byte by byte (`docs/design/collections.md`).
//! Protobuf is used for commands and replies only (TESTING.md: never compare re-encoded protobufs).

use crate::error::{KvError, Result};

/// Appends fields to a byte buffer.
#[derive(Default)]
pub(crate) struct Enc(pub(crate) Vec<u8>);

impl Enc {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Enc(Vec::with_capacity(n))
    }
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// `u32` length then the bytes. Callers bound lengths well below 4 GiB (limits).
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
        self
    }
    pub(crate) fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// Reads fields back; every read is bounds-checked and fails with [`KvError::Corrupt`].
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Dec { buf, what }
    }
    fn err(&self, why: &str) -> KvError {
        KvError::Corrupt {
            what: self.what,
            why: why.to_string(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(self.err("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        Ok(u32::from_le_bytes(a))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// Everything not yet read.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    /// Offset of the next unread byte relative to `base` (which must contain it).
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn end(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut e = Enc::default();
        e.u8(7).u32(9).u64(u64::MAX).bytes(b"key").raw(b"tail");
        let mut d = Dec::new(&e.0, "test");
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u32().unwrap(), 9);
        assert_eq!(d.u64().unwrap(), u64::MAX);
        assert_eq!(d.bytes().unwrap(), b"key");
        assert_eq!(d.remaining(), 4);
        assert_eq!(d.rest(), b"tail");
        d.end().unwrap();
        for cut in 0..e.0.len() - 4 {
            let mut d = Dec::new(&e.0[..cut], "test");
            let r = (|| {
                d.u8()?;
                d.u32()?;
                d.u64()?;
                d.bytes()?;
                Ok::<_, KvError>(())
            })();
            assert!(matches!(r, Err(KvError::Corrupt { .. })), "cut {cut}");
        }
    }
}
