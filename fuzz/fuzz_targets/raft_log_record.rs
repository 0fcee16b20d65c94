//! Harpoon's raft-log record decoder (`harpoon/src/storage/record.rs`) on arbitrary bytes.
//!
//! `record::decode` is crate-private, so the target compiles that very source file as a module
//! of its own (it depends only on `bytes`, `proto` and `raft`). Properties:
//! - `decode` returns a record or a `DecodeError`, never panics; the error names the cell
//!   exactly when the 9-byte header was readable;
//! - the format is fixed-width and canonical (not protobuf): a decoded record re-encodes to
//!   exactly the input bytes, and decodes again to the same record;
//! - the documented rules hold for every accepted record: entries non-empty, consecutive from
//!   `first_index >= 1`, and no index above 2^62 (module doc of record.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../harpoon/src/storage/record.rs"]
#[allow(dead_code)]
mod record;

use record::Record;

const MAX_INDEX: u64 = 1 << 62;

fuzz_target!(|data: &[u8]| {
    match record::decode(data) {
        Ok(rec) => {
            let enc = match &rec {
                Record::Entries { cell, entries } => {
                    record::encode_entries(*cell, entries).expect("decoded entries re-encode")
                }
                other => record::encode_small(other),
            };
            assert_eq!(enc, data, "decode/encode is not the identity on {rec:?}");
            assert_eq!(record::decode(&enc).expect("re-decodes"), rec);
            match &rec {
                Record::Entries { entries, .. } => {
                    assert!(!entries.is_empty());
                    let first = entries[0].index;
                    assert!(first >= 1);
                    for (i, e) in entries.iter().enumerate() {
                        assert_eq!(e.index, first + i as u64, "entries not consecutive");
                    }
                    if !quiver_fuzz::allowed("record-index-above-max") {
                        let last = entries[entries.len() - 1].index;
                        assert!(
                            last <= MAX_INDEX,
                            "accepted entry index {last} above 2^62 (first {first}, {} entries)",
                            entries.len()
                        );
                    }
                }
                Record::Snapshot { index, .. } | Record::Compact { index, .. } => {
                    assert!(*index <= MAX_INDEX);
                }
                Record::HardState { .. } | Record::Destroy { .. } => {}
            }
        }
        Err(e) => {
            assert_eq!(e.cell.is_some(), data.len() >= record::HEADER_LEN, "{e:?}");
            assert!(!e.reason.is_empty());
        }
    }
});
