// Regression test for a bug found by the `raft_log_record` fuzz target (docs/fuzzing.md).
//
// Move this test into the `tests` module of harpoon/src/storage/record.rs (it uses the
// crate-private `decode`). The input is `raft_log_record-index-above-max.bin` next to this file.
//
// Bug: the module doc of record.rs says "indexes above 2^62 are corruption", but `decode` checks
// only `first_index <= 2^62`; an Entries record whose first index is 2^62 and whose count is 2
// decodes to entries 2^62 and 2^62 + 1. Fix: reject when `first + count - 1 > MAX_INDEX`.

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
