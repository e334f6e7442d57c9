//! File-system helpers with the atomicity imba promises: write to a temporary name, then rename.

use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` so that a reader sees the old content or the new, never a mix:
/// a temporary file beside it, flushed to disk, then renamed over it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = written_beside(path, bytes)?;
    let renamed = std::fs::rename(&tmp, path);
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed
}

/// Writes `bytes` to `path` only if nothing is there: `Ok(true)` when this call created it. The
/// file is written whole beside `path`, then linked to its name, which fails when the name is
/// taken: a reader never sees it half-written, and of two writers exactly one creates it.
pub fn create_new(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let tmp = written_beside(path, bytes)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// A temporary file beside `path` holding `bytes`, flushed to disk.
fn written_beside(path: &Path, bytes: &[u8]) -> io::Result<std::path::PathBuf> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per process and call: two threads writing the same file never share a temporary.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = parent.join(format!(".{name}.tmp-{}-{call}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Moves `from` to `to`, replacing what is there. A file is replaced atomically; a directory is
/// swapped in by two renames (the old one is removed only after the new one is in place). Across
/// file systems the content is copied beside `to` first, then renamed.
pub fn replace(from: &Path, to: &Path) -> io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let from_is_dir = std::fs::metadata(from)?.is_dir();
    let to_meta = std::fs::symlink_metadata(to).ok();
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = to.parent().unwrap_or(Path::new("."));
    let near = |tag: &str| parent.join(format!(".{name}.imba-{tag}-{}", std::process::id()));

    // Bring the new content onto the destination's file system.
    let source = match std::fs::rename(from, near("new")) {
        Ok(()) => near("new"),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            // A copy that fails half-way (no space left, say) is removed, so that it neither
            // lingers beside the output nor keeps holding the space that ran out.
            if let Err(e) = copy_recursive(from, &near("new")) {
                remove_any(&near("new"));
                return Err(e);
            }
            near("new")
        }
        Err(e) => return Err(e),
    };
    match to_meta {
        Some(meta) if meta.is_dir() || from_is_dir => {
            let old = near("old");
            std::fs::rename(to, &old)?;
            if let Err(e) = std::fs::rename(&source, to) {
                let _ = std::fs::rename(&old, to);
                return Err(e);
            }
            if meta.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            }
        }
        _ => std::fs::rename(&source, to),
    }
}

/// The bytes of the files under `dir`.
pub fn size_of(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Removes a file or a directory tree, ignoring errors: the clean-up of a failed step.
pub(crate) fn remove_any(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Copies a file or a directory tree (across file systems, where a rename cannot go).
pub(crate) fn copy_recursive(from: &Path, to: &Path) -> io::Result<()> {
    if std::fs::metadata(from)?.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_recursive(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/f.json");
        write_atomic(&path, b"1").unwrap();
        write_atomic(&path, b"2").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"2");
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }

    #[test]
    fn replace_swaps_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let staged = dir.path().join("staged");
        std::fs::create_dir_all(staged.join("d")).unwrap();
        std::fs::write(staged.join("d/new"), "n").unwrap();
        let out = dir.path().join("out/d");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("old"), "o").unwrap();
        replace(&staged.join("d"), &out).unwrap();
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("new")]);
        assert_eq!(
            std::fs::read_dir(dir.path().join("out")).unwrap().count(),
            1,
            "no leftovers"
        );

        std::fs::write(staged.join("f"), "2").unwrap();
        std::fs::write(dir.path().join("out/f"), "1").unwrap();
        replace(&staged.join("f"), &dir.path().join("out/f")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("out/f")).unwrap(), b"2");
    }
}
