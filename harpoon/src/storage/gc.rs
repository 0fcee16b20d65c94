//! Segment GC: drop the oldest seglog segments once no live record is in them.
//!
//! A record is live when it is a live entry (between its cell's first and last index and not
//! superseded), the record holding a cell's current hard state, or the one holding its
//! truncated state. Everything else (compacted or superseded entries, old hard states,
//! destroyed cells) is garbage. Segments are dropped as a prefix:
//! 1. `keep` = the oldest segment holding a live entry of any cell, at most the active segment.
//! 2. Hard states and truncated states living below `keep` are re-appended (checkpoints).
//! 3. Sync, so the checkpoints are durable before their old copies disappear.
//! 4. `SegLog::drop_segments_before(keep)`.
//!
//! A lagging cell (live entries in an old segment, because it cannot compact yet) blocks the
//! drop; GC does not rewrite its entries but reports it in [`GcStats::pinned`], leaving the
//! decision (force a snapshot and compaction, as TiKV/raft-engine do) to the caller.

use proto::CellId;

use super::error::{Op, StorageError};
use super::store::Inner;

/// A cell whose live entries keep old segments alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcPin {
    pub cell: CellId,
    /// Segment of its oldest live entry.
    pub segment: u64,
    /// Its first index (compacting past its entries in `segment` would unpin it).
    pub first_index: u64,
    /// Its live entry count.
    pub entries: u64,
}

/// What one [`LogStore::gc`](super::LogStore::gc) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Segments before the run.
    pub segments_before: u64,
    /// Segments dropped.
    pub segments_dropped: u64,
    /// Oldest segment kept (segments below it were dropped).
    pub kept_from: u64,
    /// The segment being appended to.
    pub active_segment: u64,
    /// Hard/truncated state records re-appended before dropping.
    pub checkpoints: u64,
    /// Cells with live entries below the active segment, oldest segment first. The first ones
    /// are what blocks further GC.
    pub pinned: Vec<GcPin>,
}

pub(crate) fn run(inner: &Inner) -> Result<GcStats, StorageError> {
    inner.check_poison()?;
    let Some(seg) = inner.backend.seg() else {
        return Ok(GcStats::default());
    };
    let _writer = inner.writer.lock();
    let segments_before = seg.segments().len() as u64;
    let active = seg.end().segment;
    let oldest = seg.first().segment;
    let cells: Vec<_> = inner.cells.read().values().cloned().collect();

    let mut keep = active;
    let mut pinned = Vec::new();
    for c in &cells {
        let log = c.log.lock();
        if let Some(s) = log.oldest_entry_segment() {
            keep = keep.min(s);
            if s < active {
                pinned.push(GcPin {
                    cell: c.id,
                    segment: s,
                    first_index: log.first_index(),
                    entries: log.last_index() + 1 - log.first_index(),
                });
            }
        }
    }
    pinned.sort_by_key(|p| (p.segment, p.cell));
    let mut stats = GcStats {
        segments_before,
        kept_from: oldest,
        active_segment: active,
        pinned,
        ..GcStats::default()
    };
    if keep <= oldest {
        return Ok(stats);
    }

    let mut owners = Vec::new();
    let mut checkpoints = Vec::new();
    for c in &cells {
        for r in c.log.lock().checkpoints_before(keep) {
            owners.push(c.clone());
            checkpoints.push(r);
        }
    }
    if !checkpoints.is_empty() {
        let positions = inner.append_records(&checkpoints)?;
        for ((rec, pos), c) in checkpoints.iter().zip(positions).zip(&owners) {
            c.log.lock().apply(rec.clone(), pos);
        }
    }
    inner
        .backend
        .sync()
        .map_err(|e| inner.poison(StorageError::log(Op::Sync, None, e)))?;
    stats.segments_dropped = seg
        .drop_segments_before(keep)
        .map_err(|e| inner.poison(StorageError::log(Op::Gc, None, e)))?;
    stats.checkpoints = checkpoints.len() as u64;
    stats.kept_from = keep;
    Ok(stats)
}
