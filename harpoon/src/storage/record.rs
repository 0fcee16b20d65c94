//! The byte format of every record this module writes to the seglog, in one place.
//!
//! A record is one seglog payload (seglog adds length and checksum). All integers are
//! little-endian, fixed width:
//!
//! ```text
//! record    := kind:u8 cell:u64 body
//! Entries   (kind 1) := first_index:u64 count:u32 { term:u64 type:u8 flags:u8
//!                        data_len:u32 data context_len:u32 context }*count
//! HardState (kind 2) := term:u64 vote:u64 commit:u64
//! Snapshot  (kind 3) := index:u64 term:u64
//! Compact   (kind 4) := index:u64 term:u64
//! Destroy   (kind 5) := (empty)
//! ```
//!
//! Entries in one record have consecutive indexes starting at `first_index`; `type` is the raft
//! `EntryType` number and `flags` bit 0 is the deprecated `sync_log`. `Compact` carries the new
//! truncated state (the last discarded index and its term). Trailing bytes, unknown kinds, unknown
//! flags, `count == 0`, `first_index == 0` and indexes above 2^62 are corruption.

use bytes::Bytes;
use proto::CellId;
use raft::eraftpb::{Entry, EntryType, HardState};

const KIND_ENTRIES: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
const KIND_COMPACT: u8 = 4;
const KIND_DESTROY: u8 = 5;

/// `kind` + `cell`.
pub(crate) const HEADER_LEN: usize = 1 + 8;
/// `first_index` + `count` after the header of an Entries record.
pub(crate) const ENTRIES_HEADER_LEN: usize = 8 + 4;
const FLAG_SYNC_LOG: u8 = 1;
/// Indexes above this are corruption (keeps index arithmetic far from overflow).
const MAX_INDEX: u64 = 1 << 62;

/// One decoded record.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Record {
    /// Entries replacing the cell's log from `entries[0].index` on (raft conflict rule).
    Entries {
        cell: CellId,
        entries: Vec<Entry>,
    },
    HardState {
        cell: CellId,
        hs: HardState,
    },
    /// A snapshot was installed: the log restarts after `index`.
    Snapshot {
        cell: CellId,
        index: u64,
        term: u64,
    },
    /// Entries up to `index` are discarded; `(index, term)` is the truncated state.
    Compact {
        cell: CellId,
        index: u64,
        term: u64,
    },
    /// The cell left this node; everything before this record about it is garbage.
    Destroy {
        cell: CellId,
    },
}

impl Record {
    pub(crate) fn cell(&self) -> CellId {
        match self {
            Record::Entries { cell, .. }
            | Record::HardState { cell, .. }
            | Record::Snapshot { cell, .. }
            | Record::Compact { cell, .. }
            | Record::Destroy { cell } => *cell,
        }
    }
}

/// Encoded size of one entry inside an Entries record.
pub(crate) fn entry_len(e: &Entry) -> usize {
    8 + 1 + 1 + 4 + e.data.len() + 4 + e.context.len()
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<(), String> {
    let len = u32::try_from(b.len()).map_err(|_| format!("field of {} bytes", b.len()))?;
    put_u32(out, len);
    out.extend_from_slice(b);
    Ok(())
}

fn header(out: &mut Vec<u8>, kind: u8, cell: CellId) {
    out.push(kind);
    put_u64(out, cell.get());
}

/// Encodes an Entries record. The caller guarantees `entries` is non-empty, contiguous and that
/// every field is below 4 GiB (checked against the record limit before).
pub(crate) fn encode_entries(cell: CellId, entries: &[Entry]) -> Result<Vec<u8>, String> {
    let first = entries.first().map_or(0, |e| e.index);
    let count = u32::try_from(entries.len()).map_err(|_| "too many entries".to_string())?;
    let size = HEADER_LEN + ENTRIES_HEADER_LEN + entries.iter().map(entry_len).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    header(&mut out, KIND_ENTRIES, cell);
    put_u64(&mut out, first);
    put_u32(&mut out, count);
    for e in entries {
        put_u64(&mut out, e.term);
        out.push(entry_type_code(e.entry_type));
        out.push(if e.sync_log { FLAG_SYNC_LOG } else { 0 });
        put_bytes(&mut out, &e.data)?;
        put_bytes(&mut out, &e.context)?;
    }
    Ok(out)
}

/// Encodes a record that is not `Entries`.
pub(crate) fn encode_small(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 24);
    match record {
        Record::Entries { cell, entries } => {
            // Not used for entries (they go through `encode_entries`), kept total for safety.
            return encode_entries(*cell, entries).unwrap_or_default();
        }
        Record::HardState { cell, hs } => {
            header(&mut out, KIND_HARD_STATE, *cell);
            put_u64(&mut out, hs.term);
            put_u64(&mut out, hs.vote);
            put_u64(&mut out, hs.commit);
        }
        Record::Snapshot { cell, index, term } => {
            header(&mut out, KIND_SNAPSHOT, *cell);
            put_u64(&mut out, *index);
            put_u64(&mut out, *term);
        }
        Record::Compact { cell, index, term } => {
            header(&mut out, KIND_COMPACT, *cell);
            put_u64(&mut out, *index);
            put_u64(&mut out, *term);
        }
        Record::Destroy { cell } => header(&mut out, KIND_DESTROY, *cell),
    }
    out
}

fn entry_type_code(t: EntryType) -> u8 {
    match t {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
    }
}

/// A decode failure: the reason, and the cell when the header was readable.
#[derive(Debug)]
pub(crate) struct DecodeError {
    pub(crate) cell: Option<CellId>,
    pub(crate) reason: String,
}

/// Bounds-checked little-endian reader over bytes from disk.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!("needs {n} more bytes, {} left", self.buf.len()));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        let b = self.take(1)?;
        b.first().copied().ok_or_else(|| "empty".to_string())
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn bytes(&mut self) -> Result<Bytes, String> {
        let len = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(len)?))
    }
}

/// Decodes one record; never panics on arbitrary input.
pub(crate) fn decode(buf: &[u8]) -> Result<Record, DecodeError> {
    let mut r = Reader { buf };
    let kind = r
        .u8()
        .map_err(|reason| DecodeError { cell: None, reason })?;
    let cell = CellId(
        r.u64()
            .map_err(|reason| DecodeError { cell: None, reason })?,
    );
    decode_body(kind, cell, &mut r).map_err(|reason| DecodeError {
        cell: Some(cell),
        reason,
    })
}

fn index(r: &mut Reader<'_>) -> Result<u64, String> {
    let i = r.u64()?;
    if i > MAX_INDEX {
        return Err(format!("index {i} out of range"));
    }
    Ok(i)
}

fn decode_body(kind: u8, cell: CellId, r: &mut Reader<'_>) -> Result<Record, String> {
    let record = match kind {
        KIND_ENTRIES => {
            let first = r.u64()?;
            let count = r.u32()?;
            if count == 0 {
                return Err("entries record with no entries".into());
            }
            let last = first.saturating_add(u64::from(count) - 1);
            if first == 0 || last > MAX_INDEX {
                return Err(format!("entry indexes {first}..={last} out of range"));
            }
            // Each entry takes at least 18 bytes: bound the allocation by what is there.
            let mut entries = Vec::with_capacity((count as usize).min(r.buf.len() / 18 + 1));
            for i in 0..u64::from(count) {
                // Cannot overflow: first + count - 1 <= MAX_INDEX was checked above.
                let index = first + i;
                let term = r.u64()?;
                let entry_type = match r.u8()? {
                    0 => EntryType::EntryNormal,
                    1 => EntryType::EntryConfChange,
                    2 => EntryType::EntryConfChangeV2,
                    t => return Err(format!("unknown entry type {t}")),
                };
                let flags = r.u8()?;
                if flags & !FLAG_SYNC_LOG != 0 {
                    return Err(format!("unknown entry flags {flags:#x}"));
                }
                entries.push(Entry {
                    index,
                    term,
                    entry_type,
                    sync_log: flags & FLAG_SYNC_LOG != 0,
                    data: r.bytes()?,
                    context: r.bytes()?,
                    ..Default::default()
                });
            }
            Record::Entries { cell, entries }
        }
        KIND_HARD_STATE => {
            let hs = HardState {
                term: r.u64()?,
                vote: r.u64()?,
                commit: r.u64()?,
                ..Default::default()
            };
            Record::HardState { cell, hs }
        }
        KIND_SNAPSHOT => Record::Snapshot {
            cell,
            index: index(r)?,
            term: r.u64()?,
        },
        KIND_COMPACT => Record::Compact {
            cell,
            index: index(r)?,
            term: r.u64()?,
        },
        KIND_DESTROY => Record::Destroy { cell },
        k => return Err(format!("unknown record kind {k}")),
    };
    if !r.buf.is_empty() {
        return Err(format!("{} trailing bytes", r.buf.len()));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: Bytes::copy_from_slice(data),
            ..Default::default()
        }
    }

    #[test]
    fn storage_record_roundtrip_each_kind() {
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 9,
            ..Default::default()
        };
        let mut conf = entry(8, 3, b"cc");
        conf.entry_type = EntryType::EntryConfChangeV2;
        conf.context = Bytes::from_static(b"ctx");
        conf.sync_log = true;
        let records = vec![
            Record::Entries {
                cell: CellId(7),
                entries: vec![entry(7, 2, b"a"), conf],
            },
            Record::HardState {
                cell: CellId(7),
                hs,
            },
            Record::Snapshot {
                cell: CellId(1),
                index: 100,
                term: 4,
            },
            Record::Compact {
                cell: CellId(u64::MAX),
                index: 5,
                term: 1,
            },
            Record::Destroy { cell: CellId(2) },
        ];
        for r in records {
            let bytes = match &r {
                Record::Entries { cell, entries } => encode_entries(*cell, entries).unwrap(),
                other => encode_small(other),
            };
            assert_eq!(decode(&bytes).unwrap(), r);
        }
    }

    #[test]
    fn storage_record_rejects_trailing_and_unknown() {
        let mut b = encode_small(&Record::Destroy { cell: CellId(1) });
        b.push(0);
        assert!(decode(&b).is_err());
        assert!(decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(decode(&[]).is_err());
    }

    proptest! {
        #[test]
        fn storage_record_decode_garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&buf);
        }

        #[test]
        fn storage_record_truncated_entries_rejected(n in 1usize..5, cut in 0usize..100) {
            let entries: Vec<Entry> = (0..n as u64).map(|i| entry(10 + i, 2, b"xyz")).collect();
            let b = encode_entries(CellId(3), &entries).unwrap();
            let cut = cut % b.len();
            prop_assert!(decode(&b[..cut]).is_err());
        }
    }

    /// Found by the `raft_log_record` fuzz target: an Entries record starting at 2^62 with two
    /// entries decoded to index 2^62 + 1, past the documented bound.
    #[test]
    fn entries_record_with_an_index_above_2_62_is_corrupt() {
        let mut b = vec![1u8]; // kind: Entries
        b.extend_from_slice(&7u64.to_le_bytes()); // cell 7
        b.extend_from_slice(&(1u64 << 62).to_le_bytes()); // first_index = 2^62 (allowed)
        b.extend_from_slice(&2u32.to_le_bytes()); // count 2: the second entry is 2^62 + 1
        for _ in 0..2 {
            b.extend_from_slice(&1u64.to_le_bytes()); // term
            b.extend_from_slice(&[0, 0]); // EntryNormal, no flags
            b.extend_from_slice(&0u32.to_le_bytes()); // data_len
            b.extend_from_slice(&0u32.to_le_bytes()); // context_len
        }
        let err = decode(&b).expect_err("entry index 2^62 + 1 must be corruption");
        assert_eq!(err.cell, Some(CellId(7)));
    }
}
