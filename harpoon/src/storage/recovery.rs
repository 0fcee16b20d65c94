//! Opening the durable backend: replay every record of the seglog, in log order, through
//! [`CellLog::apply`], the code the write path uses.
//!
//! The seglog itself cuts a torn tail (records after the durable end that fail their checksum
//! with nothing valid after them) and reports corruption anywhere else as an error, which is
//! returned here as is: a corrupt log is never truncated.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use proto::CellId;
use seglog::SegLog;

use super::backend::{from_pos, Backend};
use super::cell_log::CellLog;
use super::error::{LogPosition, Op, StorageError};
use super::record::{self, Record};
use super::store::{CellShared, Inner, LogStore, SnapOffers, StoreOptions};

/// Every entry is readable from the seglog during recovery, so caches can be trimmed freely.
const ALL_DURABLE: LogPosition = LogPosition {
    segment: u64::MAX,
    offset: u64::MAX,
};

pub(crate) fn open(
    dir: &Path,
    config: seglog::Config,
    options: StoreOptions,
) -> Result<(LogStore, Vec<CellId>), StorageError> {
    let max_record = config.max_record_size as usize;
    let (log, _recovery) =
        SegLog::open(dir, config).map_err(|e| StorageError::log(Op::Recover, None, e))?;
    let cells = replay(&log, &options)?;
    let inner = Inner::new(Backend::Seg(log), options, max_record);
    let mut ids: Vec<CellId> = Vec::new();
    {
        let mut map = inner.cells.write();
        for (id, cell_log) in cells {
            if cell_log.destroyed {
                continue;
            }
            ids.push(id);
            map.insert(
                id,
                Arc::new(CellShared {
                    id,
                    log: Mutex::new(cell_log),
                    snap: Mutex::new(SnapOffers::default()),
                }),
            );
        }
    }
    ids.sort();
    Ok((
        LogStore {
            inner: Arc::new(inner),
        },
        ids,
    ))
}

fn replay(log: &SegLog, options: &StoreOptions) -> Result<HashMap<CellId, CellLog>, StorageError> {
    let mut cells: HashMap<CellId, CellLog> = HashMap::new();
    for item in log.iter(log.first()) {
        let (pos, bytes) = item.map_err(|e| StorageError::log(Op::Recover, None, e))?;
        let position = from_pos(pos);
        let rec = record::decode(&bytes).map_err(|e| StorageError::Corrupt {
            op: Op::Recover,
            cell: e.cell,
            position,
            reason: e.reason,
        })?;
        let id = rec.cell();
        let cell = cells.entry(id).or_insert_with(|| CellLog::new(id));
        if cell.destroyed && !matches!(rec, Record::Destroy { .. }) {
            // Records after a Destroy belong to a new incarnation of the cell.
            *cell = CellLog::new(id);
        }
        cell.apply(rec, Some(position));
        // Keep memory bounded while replaying a long log (amortised: trim at twice the budget).
        if cell.cached_entries() > 2 * options.cache_entries_per_cell.max(1) {
            cell.trim_cache(
                ALL_DURABLE,
                options.cache_entries_per_cell,
                options.cache_bytes_per_cell,
            );
        }
    }
    for (id, cell) in cells.iter_mut() {
        if !cell.is_contiguous() && !cell.destroyed {
            return Err(StorageError::Corrupt {
                op: Op::Recover,
                cell: Some(*id),
                position: from_pos(log.end()),
                reason: format!(
                    "entries after truncated index {} are not contiguous",
                    cell.first_index() - 1
                ),
            });
        }
        cell.trim_cache(
            ALL_DURABLE,
            options.cache_entries_per_cell,
            options.cache_bytes_per_cell,
        );
    }
    Ok(cells)
}
