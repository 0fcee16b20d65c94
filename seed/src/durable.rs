//! Files in the data dir replaced atomically and durably.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Replace `path` with `bytes` so that after a crash or power loss the file holds either its
/// old or its new content, and the new content once this returns: write a temporary file
/// beside it, fsync it, rename it over `path`, fsync the parent directory (which makes the
/// rename durable).
///
/// # Errors
/// Any I/O error; `path` then holds its old content (a stray `.tmp` may be left beside it).
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_durably(&p, b"one").unwrap();
        write_durably(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }

    #[test]
    fn a_missing_parent_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no").join("f");
        assert!(write_durably(&p, b"x").is_err());
    }
}
