//! Helpers shared by the integration tests: fast scratch directories, directory images, and the
//! record listing every checker compares against.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use seglog::{Position, SegLog};

/// A scratch directory. Tests that fsync a lot run on tmpfs (`/dev/shm`) when it exists, so the
/// suite stays fast on a shared 2-core machine; `SEGLOG_TEST_DIR` overrides the location (point it
/// at a real disk to run the same tests against ext4/xfs).
pub fn scratch() -> tempfile::TempDir {
    if let Ok(d) = std::env::var("SEGLOG_TEST_DIR") {
        return tempfile::tempdir_in(d).expect("SEGLOG_TEST_DIR is writable");
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(t) = tempfile::tempdir_in(shm) {
            return t;
        }
    }
    tempfile::tempdir().expect("temp dir")
}

/// The segment files of a directory: name -> bytes.
pub type Image = BTreeMap<String, Vec<u8>>;

/// Reads every `*.seg` file of `dir`.
pub fn snapshot(dir: &Path) -> Image {
    let mut img = Image::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name.ends_with(".seg") {
            img.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
    img
}

/// Writes `img` into the (empty) directory `dir`.
pub fn restore(dir: &Path, img: &Image) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in img {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Every record of the log, in order.
pub fn records(log: &SegLog) -> Vec<(Position, Vec<u8>)> {
    log.iter(Position::default())
        .collect::<Result<Vec<_>, _>>()
        .expect("iteration over a recovered log never fails")
}

/// A payload that names its index, so a checker can tell records apart (and see reordering).
pub fn payload(i: usize, len: usize) -> Vec<u8> {
    let mut p = (i as u64).to_le_bytes().to_vec();
    p.extend((0..len).map(|k| (i.wrapping_mul(31) + k) as u8));
    p
}
