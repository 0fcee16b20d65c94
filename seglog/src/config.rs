//! [`Config`] and [`SyncMode`]: a plain struct with defaults in one place and a `validate()`.

use crate::error::{Error, Result};
use crate::format::{HEADER_LEN, RECORD_HEADER_LEN};

/// Largest segment accepted by [`Config::validate`] (1 TiB).
pub const MAX_SEGMENT_SIZE: u64 = 1 << 40;

/// How `sync()` makes records durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// `sync()` flushes with `msync(MS_SYNC)` (an fdatasync of the dirty range); new segments and
    /// deletions are followed by an fsync of the directory. What `sync()` reports survives power loss.
    #[default]
    Data,
    /// `sync()` only advances the durable mark; nothing is flushed and no durable mark is written to
    /// disk. A process crash loses nothing (the page cache keeps mmap writes), a power loss can lose
    /// anything not yet written back. For benchmarks and memory-ish persistence modes.
    None,
}

/// Log configuration. Build with `Config::default()` and struct update syntax, then `validate()`
/// (which [`crate::SegLog::open`] also calls).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Size of each new segment file, preallocated in full. Default 64 MiB. Existing segments keep the
    /// size they were created with. Must hold a header plus one record of `max_record_size`, so a
    /// record always fits in a fresh segment.
    pub segment_size: u64,
    /// Largest payload `append` accepts; bigger payloads get [`Error::RecordTooLarge`]. Default 16 MiB.
    pub max_record_size: u32,
    /// Durability of `sync()`. Default [`SyncMode::Data`].
    pub sync: SyncMode,
}

impl Config {
    /// Default segment size: 64 MiB.
    pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
    /// Default record size limit: 16 MiB.
    pub const DEFAULT_MAX_RECORD_SIZE: u32 = 16 << 20;

    /// Checks the fields against each other and the format limits.
    pub fn validate(&self) -> Result<()> {
        let max_payload = u64::from(u32::MAX) - RECORD_HEADER_LEN;
        if u64::from(self.max_record_size) > max_payload {
            return Err(Error::InvalidConfig {
                field: "max_record_size",
                why: format!(
                    "{} exceeds the format limit {max_payload}",
                    self.max_record_size
                ),
            });
        }
        let min_segment = HEADER_LEN + RECORD_HEADER_LEN + u64::from(self.max_record_size);
        if self.segment_size < min_segment {
            return Err(Error::InvalidConfig {
                field: "segment_size",
                why: format!(
                    "{} cannot hold the {HEADER_LEN}-byte segment header plus one record of \
                     max_record_size {} (needs at least {min_segment})",
                    self.segment_size, self.max_record_size
                ),
            });
        }
        if self.segment_size > MAX_SEGMENT_SIZE {
            return Err(Error::InvalidConfig {
                field: "segment_size",
                why: format!("{} exceeds the limit {MAX_SEGMENT_SIZE}", self.segment_size),
            });
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            segment_size: Self::DEFAULT_SEGMENT_SIZE,
            max_record_size: Self::DEFAULT_MAX_RECORD_SIZE,
            sync: SyncMode::Data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn segment_must_hold_largest_record() {
        let c = Config {
            segment_size: 4096,
            max_record_size: 4096,
            sync: SyncMode::Data,
        };
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "segment_size",
                ..
            })
        ));
        let ok = Config {
            segment_size: HEADER_LEN + RECORD_HEADER_LEN + 4096,
            ..c
        };
        ok.validate().unwrap();
    }

    #[test]
    fn record_limit_fits_the_length_field() {
        let c = Config {
            segment_size: MAX_SEGMENT_SIZE,
            max_record_size: u32::MAX,
            sync: SyncMode::None,
        };
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "max_record_size",
                ..
            })
        ));
    }
}
