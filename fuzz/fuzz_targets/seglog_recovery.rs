//! `seglog::SegLog::open` (recovery) over one or two segment files of fuzzer-chosen bytes.
//!
//! Each file gets a valid header (fuzzer-chosen nonce, size, prev_tail, durable mark, number)
//! or arbitrary header bytes, then a body of valid records (checksummed with the header's
//! nonce), records with a bad checksum, garbage, zeros, and maybe a cut. Stray `.seg.tmp`,
//! misnamed and foreign files are added on request. The files live on tmpfs when available.
//!
//! Properties:
//! - `open` returns a log or a typed error; never a panic, never SIGBUS;
//! - a recovered log holds exactly the valid records at the start of its first N segments
//!   (compared with an independent re-implementation of the record check), in order;
//! - the recovered log works: every record reads back by position, a new record appends,
//!   syncs and reads back, and reopening gives the same records plus the new one.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use seglog::{Config, SegLog, SyncMode};
use std::path::Path;

const MAGIC: &[u8; 8] = b"QVSEGLOG";
const HEADER_LEN: usize = 1024;
const MARK_OFFSET: usize = 512;
/// Small segments keep every exec cheap.
const SEGMENT_SIZE: u64 = 64 << 10;
const MAX_RECORD: u32 = 16 << 10;

#[derive(Debug, Arbitrary)]
enum Number {
    One,
    Two,
    Three,
    Zero,
    Big,
}

impl Number {
    fn get(&self) -> u64 {
        match self {
            Number::One => 1,
            Number::Two => 2,
            Number::Three => 3,
            Number::Zero => 0,
            Number::Big => 1 << 40,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Size {
    /// The file's own length.
    FileLen,
    /// The configured segment size.
    Segment,
    Small(u16),
    /// Far beyond any filesystem: preallocation must fail cleanly (never a size that would
    /// really allocate: this machine is shared).
    Huge(u8),
}

#[derive(Debug, Arbitrary)]
enum Mark {
    /// End of the valid records.
    Tail,
    /// Somewhere after them.
    After(u16),
    Before(u16),
    Raw(u64),
    /// The right value with a wrong checksum.
    BadCrc,
}

#[derive(Debug, Arbitrary)]
enum PrevTail {
    /// Where the previous file's valid records end.
    Natural,
    Zero,
    Raw(u16),
}

#[derive(Debug, Arbitrary)]
enum Header {
    Valid {
        nonce: u32,
        size: Size,
        prev_tail: PrevTail,
        mark: Option<Mark>,
        /// Number in the header differs from the file name.
        wrong_number: bool,
        version: Option<u32>,
    },
    /// Arbitrary bytes where the header goes (padded with zeros to the header length).
    Raw(Vec<u8>),
    /// A valid header with one flipped byte.
    Flipped { at: u8, mask: u8 },
}

#[derive(Debug, Arbitrary)]
enum Chunk {
    Record(Vec<u8>),
    Empty,
    BadCrc(Vec<u8>),
    /// A length prefix only (runs past the end or below the header size).
    Len(u32),
    Garbage(Vec<u8>),
    Zeros(u8),
}

#[derive(Debug, Arbitrary)]
struct File {
    number: Number,
    header: Header,
    body: Vec<Chunk>,
    /// Cut the file to this many bytes (it may fall inside the header).
    cut: Option<u16>,
    /// Zero padding after the body, in KiB.
    pad_kib: u8,
}

#[derive(Debug, Arbitrary)]
enum Stray {
    Tmp,
    Misnamed,
    Foreign,
}

#[derive(Debug, Arbitrary)]
struct Input {
    files: Vec<File>,
    stray: Option<Stray>,
    sync_data: bool,
    append: Vec<u8>,
}

fn crc_seeded(nonce: u32, parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(nonce);
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn record(nonce: u32, payload: &[u8], good: bool) -> Vec<u8> {
    let len = (8 + payload.len()) as u32;
    let mut crc = crc_seeded(nonce, &[&len.to_le_bytes(), payload]);
    if !good {
        crc ^= 1;
    }
    let mut v = len.to_le_bytes().to_vec();
    v.extend_from_slice(&crc.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Independent reference walk: the valid records from the first record offset, and where they end.
fn valid_run(data: &[u8], nonce: u32) -> (Vec<Vec<u8>>, u64) {
    let mut out = Vec::new();
    let mut off = HEADER_LEN;
    loop {
        let Some(h) = data.get(off..off + 8) else {
            break;
        };
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if len < 8 {
            break;
        }
        let Some(payload) = data.get(off + 8..off + len as usize) else {
            break;
        };
        if crc_seeded(nonce, &[&len.to_le_bytes(), payload]) != crc {
            break;
        }
        out.push(payload.to_vec());
        off += len as usize;
    }
    (out, off as u64)
}

fn header_bytes(number: u64, nonce: u32, size: u64, prev_tail: u64, version: u32) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[12..16].copy_from_slice(&nonce.to_le_bytes());
    b[16..24].copy_from_slice(&number.to_le_bytes());
    b[24..32].copy_from_slice(&size.to_le_bytes());
    b[32..40].copy_from_slice(&prev_tail.to_le_bytes());
    let crc = crc32fast::hash(&b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Builds one file; returns its bytes and, for a well-formed header, the nonce.
fn build(f: &File, number: u64, prev_natural: u64) -> (Vec<u8>, Option<u32>) {
    let nonce_for_body = match &f.header {
        Header::Valid { nonce, .. } => *nonce,
        _ => 0x5eed,
    };
    let mut body = Vec::new();
    for c in f.body.iter().take(16) {
        match c {
            Chunk::Record(p) => body.extend(record(nonce_for_body, p, true)),
            Chunk::Empty => body.extend(record(nonce_for_body, &[], true)),
            Chunk::BadCrc(p) => body.extend(record(nonce_for_body, p, false)),
            Chunk::Len(n) => body.extend_from_slice(&n.to_le_bytes()),
            Chunk::Garbage(g) => body.extend_from_slice(g),
            Chunk::Zeros(n) => body.extend(std::iter::repeat(0).take(*n as usize)),
        }
    }
    let mut data = vec![0u8; HEADER_LEN];
    data.extend_from_slice(&body);
    data.extend(std::iter::repeat(0).take(f.pad_kib as usize % 64 * 1024));
    let valid_nonce = match &f.header {
        Header::Valid {
            nonce,
            size,
            prev_tail,
            mark,
            wrong_number,
            version,
        } => {
            let len = data.len() as u64;
            let size = match size {
                Size::FileLen => len,
                Size::Segment => SEGMENT_SIZE,
                Size::Small(s) => u64::from(*s),
                Size::Huge(x) => u64::MAX - u64::from(*x),
            };
            let prev = match prev_tail {
                PrevTail::Natural => prev_natural,
                PrevTail::Zero => 0,
                PrevTail::Raw(r) => HEADER_LEN as u64 + u64::from(*r),
            };
            let hnum = if *wrong_number { number ^ 1 } else { number };
            let version = version.unwrap_or(1);
            data[..64].copy_from_slice(&header_bytes(hnum, *nonce, size, prev, version));
            if let Some(m) = mark {
                let tail = valid_run(&data, *nonce).1;
                let value = match m {
                    Mark::Tail | Mark::BadCrc => tail,
                    Mark::After(d) => tail + u64::from(*d),
                    Mark::Before(d) => tail.saturating_sub(u64::from(*d)),
                    Mark::Raw(r) => *r,
                };
                let mut crc = crc_seeded(*nonce, &[&value.to_le_bytes()]);
                if matches!(m, Mark::BadCrc) {
                    crc ^= 1;
                }
                data[MARK_OFFSET..MARK_OFFSET + 8].copy_from_slice(&value.to_le_bytes());
                data[MARK_OFFSET + 8..MARK_OFFSET + 12].copy_from_slice(&crc.to_le_bytes());
            }
            (*nonce != 0 && !*wrong_number && version == 1).then_some(*nonce)
        }
        Header::Raw(bytes) => {
            let n = bytes.len().min(HEADER_LEN);
            data[..n].copy_from_slice(&bytes[..n]);
            None
        }
        Header::Flipped { at, mask } => {
            data[..64].copy_from_slice(&header_bytes(number, 0x5eed, SEGMENT_SIZE, 0, 1));
            data[(*at % 64) as usize] ^= *mask;
            (*mask == 0).then_some(0x5eed)
        }
    };
    if let Some(c) = f.cut {
        data.truncate(c as usize);
    }
    (data, valid_nonce)
}

fn seg_name(n: u64) -> String {
    format!("{n:020}.seg")
}

fn records(log: &SegLog) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for item in log.iter(log.first()) {
        let (pos, payload) = item.expect("recovered log iterates");
        assert_eq!(log.read(pos).expect("recovered record reads"), payload);
        out.push(payload);
    }
    out
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir")
}

fn run(dir: &Path, input: &Input) {
    // Files numbered from the first one's choice, so two files are contiguous unless the
    // second one's number says otherwise.
    let mut expected: Vec<(u64, Vec<Vec<u8>>)> = Vec::new();
    let mut all_valid = true;
    let mut prev_natural = 0u64;
    let mut numbers = Vec::new();
    for (i, f) in input.files.iter().take(2).enumerate() {
        let number = match (i, &f.number) {
            (0, n) => n.get(),
            (_, Number::Two) | (_, Number::One) => numbers[0] + 1,
            (_, n) => n.get(),
        };
        if numbers.contains(&number) {
            break;
        }
        let (data, nonce) = build(f, number, prev_natural);
        std::fs::write(dir.join(seg_name(number)), &data).expect("write segment");
        numbers.push(number);
        match nonce {
            Some(n) if data.len() >= HEADER_LEN => {
                let (recs, tail) = valid_run(&data, n);
                prev_natural = tail;
                expected.push((number, recs));
            }
            _ => all_valid = false,
        }
    }
    match input.stray {
        Some(Stray::Tmp) => std::fs::write(dir.join("00000000000000000009.seg.tmp"), b"x"),
        Some(Stray::Misnamed) => std::fs::write(dir.join("7.seg"), b"x"),
        Some(Stray::Foreign) => std::fs::write(dir.join("notes.txt"), b"x"),
        None => Ok(()),
    }
    .expect("write stray file");

    let config = Config {
        segment_size: SEGMENT_SIZE,
        max_record_size: MAX_RECORD,
        sync: if input.sync_data {
            SyncMode::Data
        } else {
            SyncMode::None
        },
    };
    let (log, report) = match SegLog::open(dir, config.clone()) {
        Ok(x) => x,
        Err(e) => {
            assert!(
                !matches!(e, seglog::Error::InvalidConfig { .. }),
                "config rejected: {e}"
            );
            return;
        }
    };
    assert!(
        all_valid,
        "opened a log with a bad header: {report:?} {numbers:?}"
    );
    let got = records(&log);
    assert_eq!(report.records, got.len() as u64);
    // Exactly the valid runs of the first `report.segments` files (none if the log was empty).
    if numbers.is_empty() {
        assert!(got.is_empty());
    } else {
        assert!(report.segments >= 1 && report.segments <= expected.len());
        expected.sort_by_key(|(n, _)| *n);
        let want: Vec<Vec<u8>> = expected[..report.segments]
            .iter()
            .flat_map(|(_, r)| r.iter().cloned())
            .collect();
        assert_eq!(
            got, want,
            "recovered records are not the valid prefix ({report:?})"
        );
    }

    // The recovered log keeps working.
    let payload = &input.append[..input.append.len().min(MAX_RECORD as usize)];
    let pos = log.append(payload).expect("append after recovery");
    log.sync().expect("sync after recovery");
    assert_eq!(log.read(pos).expect("read back"), payload);
    let before = records(&log);
    drop(log);
    let (log, _) = SegLog::open(dir, config).expect("reopen after a clean append");
    assert_eq!(records(&log), before, "records changed across reopen");
}

fuzz_target!(|input: Input| {
    let dir = scratch();
    run(dir.path(), &input);
});
