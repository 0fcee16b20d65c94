//! Where records go: a seglog (durable) or nowhere (memory, where the cell index keeps every
//! entry). Everything above this file is shared by both backends.

use seglog::{Position, SegLog};

use super::error::LogPosition;

pub(crate) enum Backend {
    /// Nothing is written; entries live in the cell index only.
    Memory,
    /// The node's seglog.
    Seg(SegLog),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Memory => f.write_str("Memory"),
            Backend::Seg(_) => f.write_str("Seg"),
        }
    }
}

pub(crate) fn to_pos(p: LogPosition) -> Position {
    Position {
        segment: p.segment,
        offset: p.offset,
    }
}

pub(crate) fn from_pos(p: Position) -> LogPosition {
    LogPosition {
        segment: p.segment,
        offset: p.offset,
    }
}

impl Backend {
    /// Appends records in order; one location per record (`None` for memory).
    pub(crate) fn append(
        &self,
        records: &[Vec<u8>],
    ) -> Result<Vec<Option<LogPosition>>, seglog::Error> {
        match self {
            Backend::Memory => Ok(vec![None; records.len()]),
            Backend::Seg(log) => {
                let positions = log.append_batch(records.iter().map(|r| r.as_slice()))?;
                Ok(positions.into_iter().map(|p| Some(from_pos(p))).collect())
            }
        }
    }

    /// Group commit; returns the durable end (`None` for memory).
    pub(crate) fn sync(&self) -> Result<Option<LogPosition>, seglog::Error> {
        match self {
            Backend::Memory => Ok(None),
            Backend::Seg(log) => log.sync().map(|p| Some(from_pos(p))),
        }
    }

    pub(crate) fn seg(&self) -> Option<&SegLog> {
        match self {
            Backend::Memory => None,
            Backend::Seg(log) => Some(log),
        }
    }
}
