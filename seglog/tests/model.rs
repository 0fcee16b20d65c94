//! State-machine test: random sequences of operations against `SegLog` and an in-memory model
//! (`Vec` of records). Small segments make rollover frequent; after every operation the log must
//! equal the model.

mod common;

use proptest::prelude::*;
use proptest::sample::Index;
use seglog::{Config, Error, Position, SegLog, SyncMode};

const SEGMENT: u64 = 4096;
const MAX_RECORD: u32 = 2048;

#[derive(Clone, Debug)]
enum Op {
    Append(Vec<u8>),
    Batch(Vec<Vec<u8>>),
    TooLarge,
    Sync,
    Read(Index),
    ReadNotARecord(Index),
    Iter(Index),
    Truncate(Index),
    Gc(Index, bool),
    Reopen,
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..40),
        1 => proptest::collection::vec(any::<u8>(), 300..900),
        1 => proptest::collection::vec(any::<u8>(), 1900..=MAX_RECORD as usize),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => payload().prop_map(Op::Append),
        3 => proptest::collection::vec(payload(), 0..6).prop_map(Op::Batch),
        1 => Just(Op::TooLarge),
        3 => Just(Op::Sync),
        2 => any::<Index>().prop_map(Op::Read),
        1 => any::<Index>().prop_map(Op::ReadNotARecord),
        1 => any::<Index>().prop_map(Op::Iter),
        2 => any::<Index>().prop_map(Op::Truncate),
        1 => (any::<Index>(), any::<bool>()).prop_map(|(i, b)| Op::Gc(i, b)),
        2 => Just(Op::Reopen),
    ]
}

fn config(sync: SyncMode) -> Config {
    Config {
        segment_size: SEGMENT,
        max_record_size: MAX_RECORD,
        sync,
    }
}

/// The whole log equals the model, and the position accessors agree with it.
fn check(log: &SegLog, model: &[(Position, Vec<u8>)]) -> Result<(), TestCaseError> {
    let got = common::records(log);
    prop_assert_eq!(got.len(), model.len());
    prop_assert!(got == model, "log differs from model");
    let end = log.end();
    match model.first() {
        Some((p, _)) => prop_assert_eq!(log.first(), *p),
        None => prop_assert_eq!(log.first(), end),
    }
    if let Some((p, _)) = model.last() {
        prop_assert!(*p < end);
    }
    prop_assert!(log.durable_end() <= end);
    let segs = log.segments();
    prop_assert!(segs.windows(2).all(|w| w[1].number == w[0].number + 1));
    prop_assert_eq!(segs.last().unwrap().number, end.segment);
    Ok(())
}

fn run(ops: Vec<Op>, sync: SyncMode) -> Result<(), TestCaseError> {
    let dir = common::scratch();
    let (mut log, _) = SegLog::open(dir.path(), config(sync)).unwrap();
    let mut model: Vec<(Position, Vec<u8>)> = Vec::new();
    for op in ops {
        match op {
            Op::Append(p) => {
                let pos = log.append(&p).unwrap();
                model.push((pos, p));
            }
            Op::Batch(ps) => {
                let pos = log.append_batch(ps.iter().map(|p| p.as_slice())).unwrap();
                prop_assert_eq!(pos.len(), ps.len());
                model.extend(pos.into_iter().zip(ps));
            }
            Op::TooLarge => {
                let big = vec![7u8; MAX_RECORD as usize + 1];
                let before = log.end();
                assert!(matches!(
                    log.append(&big),
                    Err(Error::RecordTooLarge { .. })
                ));
                assert!(matches!(
                    log.append_batch([&b"x"[..], &big[..]]),
                    Err(Error::RecordTooLarge { .. })
                ));
                prop_assert_eq!(log.end(), before);
            }
            Op::Sync => {
                let end = log.end();
                let d = log.sync().unwrap();
                prop_assert_eq!(d, end);
                prop_assert_eq!(log.durable_end(), end);
            }
            Op::Read(i) if !model.is_empty() => {
                let (pos, want) = &model[i.index(model.len())];
                prop_assert_eq!(&log.read(*pos).unwrap(), want);
            }
            Op::ReadNotARecord(i) if !model.is_empty() => {
                let (pos, _) = model[i.index(model.len())];
                let bad = Position {
                    segment: pos.segment,
                    offset: pos.offset + 1,
                };
                assert!(matches!(log.read(bad), Err(Error::InvalidPosition { .. })));
            }
            Op::Iter(i) => {
                let k = i.index(model.len() + 1);
                let from = model.get(k).map_or(log.end(), |r| r.0);
                let got: Vec<_> = log.iter(from).collect::<Result<_, _>>().unwrap();
                prop_assert!(got == model[k..], "iter from {} differs", from);
            }
            Op::Truncate(i) => {
                let k = i.index(model.len() + 1);
                let from = model.get(k).map_or(log.end(), |r| r.0);
                log.truncate(from).unwrap();
                model.truncate(k);
                prop_assert!(log.durable_end() <= log.end());
                if let Some((p, _)) = model.get(k) {
                    assert!(matches!(log.read(*p), Err(Error::InvalidPosition { .. })));
                }
            }
            Op::Gc(i, above) => {
                let segs = log.segments();
                let s = segs[i.index(segs.len())].number + u64::from(above);
                let active = log.end().segment;
                let dropped = log.drop_segments_before(s).unwrap();
                let limit = s.min(active);
                prop_assert_eq!(
                    dropped,
                    segs.iter().filter(|g| g.number < limit).count() as u64
                );
                model.retain(|(p, _)| p.segment >= limit);
            }
            Op::Reopen => {
                drop(log);
                let (l, rec) = SegLog::open(dir.path(), config(sync)).unwrap();
                log = l;
                prop_assert_eq!(rec.records, model.len() as u64);
                prop_assert_eq!(rec.torn_tail_bytes, 0);
                prop_assert_eq!(rec.removed_segments, 0);
                prop_assert_eq!(log.durable_end(), log.end());
            }
            Op::Read(_) | Op::ReadNotARecord(_) => {}
        }
        check(&log, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No flushes: the logic of every operation, fast.
    #[test]
    fn log_equals_model_sync_none(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, SyncMode::None)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// With real msync/fsync and durable marks (on tmpfs when available).
    #[test]
    fn log_equals_model_sync_data(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, SyncMode::Data)?;
    }
}
