//! Deleting dropped segments without stalling the file system.
//!
//! Deleting a 64 MiB segment frees its extents in one journal transaction (and, on a file
//! system mounted with `discard`, discards them as it commits); every `fsync` on that file
//! system waits for that commit. GC used to delete several segments at once on the thread that
//! runs it, with the log's sync gate held: the raft log's syncs stalled for up to 250 ms
//! (measured: W12 after W10, three nodes on one disk). Now GC only renames a dropped segment
//! to `NNN.seg.old` (cheap, ordered and fsynced like the delete was) and hands it here: a
//! thread shrinks the file a few MiB at a time, pausing between steps so other syncs slip in
//! between the small transactions, then unlinks it. A restart deletes leftovers (`recovery`).
//!
//! The file is only shrunk once this thread holds the last reference to its [`Segment`] (so
//! the mapping is gone: shrinking a mapped file would fault on access past the new end); if
//! some reader still holds one after [`WAIT_UNMAPPED`], the file is unlinked unshrunk (the
//! kernel frees it when the mapping goes).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::segment::Segment;

/// Bytes freed per step.
const STEP: u64 = 4 << 20;
/// Pause between two steps.
const PAUSE: Duration = Duration::from_millis(5);
/// How long to wait for the last other reference to a segment to go.
const WAIT_UNMAPPED: Duration = Duration::from_secs(10);

/// Deletes `retired` segments (each renamed to the path beside it) on a thread of its own.
/// Best effort: a failure leaves a `.seg.old` file that the next open deletes.
pub(crate) fn spawn(retired: Vec<(Arc<Segment>, PathBuf)>) {
    if retired.is_empty() {
        return;
    }
    let run = move || {
        for (seg, path) in retired {
            reap_one(seg, &path);
        }
    };
    // No thread: the files stay until the next open deletes them.
    let _ = std::thread::Builder::new()
        .name("seglog-reap".into())
        .spawn(run);
}

fn reap_one(mut seg: Arc<Segment>, path: &Path) {
    let deadline = Instant::now() + WAIT_UNMAPPED;
    let sole = loop {
        match Arc::try_unwrap(seg) {
            Ok(s) => break Some(s),
            Err(s) if Instant::now() < deadline => {
                seg = s;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => break None,
        }
    };
    match sole {
        Some(s) => {
            let size = s.capacity();
            // Unmaps it.
            drop(s);
            shrink_and_unlink(path, size);
        }
        None => {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Shrinks the file at `path` (about `size` bytes) [`STEP`] bytes at a time with a pause
/// after each, then unlinks it. Best effort.
fn shrink_and_unlink(path: &Path, mut size: u64) {
    if let Ok(f) = OpenOptions::new().write(true).open(path) {
        while size > 0 {
            size = size.saturating_sub(STEP);
            if f.set_len(size).is_err() {
                break;
            }
            std::thread::sleep(PAUSE);
        }
    }
    let _ = std::fs::remove_file(path);
}

/// Deletes a large file without stalling the file system's other syncs (module doc): a thread
/// of its own shrinks it a few MiB at a time, then unlinks it. For files nothing maps or
/// writes any more, and that no other name links (shrinking changes every link's data); other
/// stores use it for their own large files (a KV store's replaced snapshot image). Best
/// effort: if the thread cannot start, the file is unlinked here, at once.
pub fn remove_file_gently(path: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("seglog-reap".into())
        .spawn({
            let path = path.clone();
            move || shrink_and_remove(&path)
        });
    if spawned.is_err() {
        let _ = std::fs::remove_file(&path);
    }
}

/// [`remove_file_gently`] on the calling thread: returns once the file is gone (about 5 ms per
/// 4 MiB). The same conditions: nothing maps or writes it, no other name links it.
pub fn shrink_and_remove(path: &Path) {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    shrink_and_unlink(path, size);
}
