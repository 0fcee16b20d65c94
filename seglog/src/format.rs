//! The byte format: segment header, durable-mark slot, record frame, checksums.
//!
//! Pure functions over byte slices, no I/O; `docs/design/log-format.md` is the prose version.
//! All integers are little-endian (`to_le_bytes`/`from_le_bytes`), never host order.
//!
//! ```text
//! segment file (preallocated to its size, zero-filled):
//!   [0, 64)       segment header (immutable, written once before the file gets its name)
//!   [512, 528)    durable-mark slot (rewritten after syncs; own sector)
//!   [1024, ...)   records, back to back, then zeros
//! record:
//!   frame_len u32 | crc u32 | payload (frame_len - 8 bytes)
//!   crc = crc32 seeded with the segment nonce, over frame_len (4 LE bytes) || payload
//! ```

/// Magic bytes at the start of every segment file.
pub const MAGIC: [u8; 8] = *b"QVSEGLOG";
/// Format version written into new segments; recovery accepts only this version.
pub const VERSION: u32 = 1;
/// Bytes reserved at the start of each segment; the first record starts here.
pub const HEADER_LEN: u64 = 1024;
/// Bytes of the immutable header that are actually used (the rest of the sector is zero).
pub const HEADER_USED: usize = 64;
/// Offset of the durable-mark slot (its own 512-byte sector).
pub const MARK_OFFSET: u64 = 512;
/// Bytes of the durable-mark slot.
pub const MARK_LEN: usize = 16;
/// `frame_len` and `crc`.
pub const RECORD_HEADER_LEN: u64 = 8;

/// The immutable segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Segment number; must match the file name.
    pub number: u64,
    /// Non-zero random checksum seed for every record of this segment.
    pub nonce: u32,
    /// File size the segment was created with.
    pub size: u64,
    /// Where the previous segment's records end (the writer rolled because the next record did
    /// not fit there); 0 if there was no previous segment.
    pub prev_tail: u64,
}

impl SegmentHeader {
    /// `magic[8] | version u32 | nonce u32 | number u64 | size u64 | prev_tail u64 | zero[20] |
    /// crc32(bytes 0..60) u32`
    pub fn encode(&self) -> [u8; HEADER_USED] {
        let mut b = [0u8; HEADER_USED];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.nonce.to_le_bytes());
        b[16..24].copy_from_slice(&self.number.to_le_bytes());
        b[24..32].copy_from_slice(&self.size.to_le_bytes());
        b[32..40].copy_from_slice(&self.prev_tail.to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a header; the error says what is wrong.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, String> {
        if b.len() < HEADER_USED {
            return Err(format!(
                "header needs {HEADER_USED} bytes, file has {}",
                b.len()
            ));
        }
        if b[0..8] != MAGIC {
            return Err("bad magic (not a seglog segment)".into());
        }
        let crc = u32_at(b, 60);
        if crc != crc32fast::hash(&b[0..60]) {
            return Err("header checksum mismatch".into());
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(format!("unsupported format version {version}"));
        }
        let nonce = u32_at(b, 12);
        if nonce == 0 {
            return Err("zero checksum nonce".into());
        }
        Ok(SegmentHeader {
            number: u64_at(b, 16),
            nonce,
            size: u64_at(b, 24),
            prev_tail: u64_at(b, 32),
        })
    }
}

/// A fresh non-zero nonce.
pub fn new_nonce() -> u32 {
    loop {
        let n: u32 = rand::random();
        if n != 0 {
            return n;
        }
    }
}

/// The durable-mark slot: `mark u64 | crc32(seed nonce, mark) u32 | zero u32`.
///
/// A valid mark `m` in segment `s` promises: every record of `s` that ends at or before `m` was
/// durable, and every segment before `s` was durable in full. An all-zero slot means "no promise".
pub fn encode_mark(mark: u64, nonce: u32) -> [u8; MARK_LEN] {
    let mut b = [0u8; MARK_LEN];
    b[0..8].copy_from_slice(&mark.to_le_bytes());
    let mut h = crc32fast::Hasher::new_with_initial(nonce);
    h.update(&b[0..8]);
    b[8..12].copy_from_slice(&h.finalize().to_le_bytes());
    b
}

/// The mark stored in a slot, or `None` if the slot is empty or damaged.
pub fn decode_mark(b: &[u8], nonce: u32) -> Option<u64> {
    if b.len() < MARK_LEN {
        return None;
    }
    let mark = u64_at(b, 0);
    if mark < HEADER_LEN {
        return None;
    }
    let mut h = crc32fast::Hasher::new_with_initial(nonce);
    h.update(&b[0..8]);
    (h.finalize() == u32_at(b, 8)).then_some(mark)
}

/// Checksum of one record: crc32 seeded with the segment nonce over `frame_len` and the payload.
/// The seed makes an all-zero frame invalid even though `crc32("") == 0`.
pub fn record_crc(nonce: u32, frame_len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(nonce);
    h.update(&frame_len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Frame length (header plus payload) of a payload of `len` bytes.
pub fn frame_len(payload_len: usize) -> u64 {
    RECORD_HEADER_LEN + payload_len as u64
}

/// The 8-byte record header for `payload`. The caller checked that the frame fits a `u32`.
pub fn encode_record_header(nonce: u32, payload: &[u8]) -> [u8; RECORD_HEADER_LEN as usize] {
    let len = u32::try_from(frame_len(payload.len())).expect("frame length checked by caller");
    let mut b = [0u8; RECORD_HEADER_LEN as usize];
    b[0..4].copy_from_slice(&len.to_le_bytes());
    b[4..8].copy_from_slice(&record_crc(nonce, len, payload).to_le_bytes());
    b
}

/// A whole record encoded (header then payload), for tests.
#[cfg(test)]
pub fn encode_record(nonce: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_HEADER_LEN as usize + payload.len());
    v.extend_from_slice(&encode_record_header(nonce, payload));
    v.extend_from_slice(payload);
    v
}

/// Why the bytes at some offset are not a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BadRecord {
    /// Fewer than 8 bytes left.
    NoHeader,
    /// `frame_len` is below 8 (0 for a zero-filled tail).
    BadLength(u32),
    /// The frame runs past the end of the segment's data.
    PastEnd {
        /// Claimed frame length.
        frame_len: u32,
        /// Bytes available from the record's start.
        available: u64,
    },
    /// The checksum does not match.
    BadChecksum,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadRecord::NoHeader => write!(f, "no room for a record header"),
            BadRecord::BadLength(0) => write!(f, "zero length (unwritten space)"),
            BadRecord::BadLength(n) => write!(f, "frame length {n} is below the header size"),
            BadRecord::PastEnd {
                frame_len,
                available,
            } => write!(
                f,
                "frame length {frame_len} runs past the end ({available} bytes left)"
            ),
            BadRecord::BadChecksum => write!(f, "checksum mismatch"),
        }
    }
}

/// Reads the record header at the start of `b` (which holds every byte up to the end of the
/// segment's data) and checks length and checksum. Returns the frame length.
pub fn check_record(b: &[u8], nonce: u32) -> Result<u64, BadRecord> {
    if (b.len() as u64) < RECORD_HEADER_LEN {
        return Err(BadRecord::NoHeader);
    }
    let len = u32_at(b, 0);
    if u64::from(len) < RECORD_HEADER_LEN {
        return Err(BadRecord::BadLength(len));
    }
    if u64::from(len) > b.len() as u64 {
        return Err(BadRecord::PastEnd {
            frame_len: len,
            available: b.len() as u64,
        });
    }
    let payload = &b[RECORD_HEADER_LEN as usize..len as usize];
    if record_crc(nonce, len, payload) != u32_at(b, 4) {
        return Err(BadRecord::BadChecksum);
    }
    Ok(u64::from(len))
}

/// Splits a record header into `(frame_len, crc)` without checking it.
pub fn parse_record_header(b: &[u8; RECORD_HEADER_LEN as usize]) -> (u32, u32) {
    (u32_at(b, 0), u32_at(b, 4))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn crc_of_empty_is_zero_so_we_seed_it() {
        assert_eq!(crc32fast::hash(b""), 0);
        assert_ne!(record_crc(1, 0, b""), 0);
    }

    #[test]
    fn zero_filled_space_is_never_a_record() {
        let zeros = [0u8; 64];
        assert_eq!(
            check_record(&zeros, 0xdead_beef),
            Err(BadRecord::BadLength(0))
        );
    }

    #[test]
    fn header_round_trip_and_damage() {
        let h = SegmentHeader {
            number: 42,
            nonce: 7,
            size: 1 << 20,
            prev_tail: 5000,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        for i in 0..HEADER_USED {
            let mut d = b;
            d[i] ^= 0x10;
            assert!(SegmentHeader::decode(&d).is_err(), "flip at {i} accepted");
        }
        assert!(SegmentHeader::decode(&[0u8; HEADER_USED]).is_err());
        assert!(SegmentHeader::decode(&b[..10]).is_err());
    }

    #[test]
    fn header_is_little_endian() {
        let h = SegmentHeader {
            number: 0x0102,
            nonce: 0x0a0b_0c0d,
            size: 0,
            prev_tail: 0,
        };
        let b = h.encode();
        assert_eq!(&b[12..16], &[0x0d, 0x0c, 0x0b, 0x0a]);
        assert_eq!(&b[16..18], &[0x02, 0x01]);
    }

    #[test]
    fn mark_round_trip() {
        let b = encode_mark(4096, 99);
        assert_eq!(decode_mark(&b, 99), Some(4096));
        assert_eq!(decode_mark(&b, 98), None, "mark of another segment");
        assert_eq!(decode_mark(&[0u8; MARK_LEN], 99), None);
        let mut d = b;
        d[1] ^= 1;
        assert_eq!(decode_mark(&d, 99), None);
    }

    #[test]
    fn empty_payload_is_a_valid_record() {
        let r = encode_record(5, b"");
        assert_eq!(r.len(), 8);
        assert_eq!(check_record(&r, 5), Ok(8));
    }

    #[test]
    fn record_of_other_segment_is_rejected() {
        let r = encode_record(5, b"hello");
        assert_eq!(check_record(&r, 6), Err(BadRecord::BadChecksum));
    }

    proptest! {
        #[test]
        fn record_round_trip(nonce in 1u32.., payload in proptest::collection::vec(any::<u8>(), 0..300), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut r = encode_record(nonce, &payload);
            let n = r.len() as u64;
            r.extend_from_slice(&tail);
            prop_assert_eq!(check_record(&r, nonce), Ok(n));
            prop_assert_eq!(&r[8..n as usize], &payload[..]);
        }

        #[test]
        fn any_single_bit_flip_is_detected(nonce in 1u32.., payload in proptest::collection::vec(any::<u8>(), 0..100), bit in any::<proptest::sample::Index>()) {
            let r = encode_record(nonce, &payload);
            let mut d = r.clone();
            let i = bit.index(d.len() * 8);
            d[i / 8] ^= 1 << (i % 8);
            prop_assert!(check_record(&d, nonce).is_err());
        }

        #[test]
        fn truncated_record_is_rejected(nonce in 1u32.., payload in proptest::collection::vec(any::<u8>(), 0..100), cut in any::<proptest::sample::Index>()) {
            let r = encode_record(nonce, &payload);
            let cut = cut.index(r.len());
            prop_assert!(check_record(&r[..cut], nonce).is_err());
        }
    }
}
