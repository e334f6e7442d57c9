//! Content hashes of files and directories (BLAKE3), behind a stat cache.
//!
//! A file's identity is `(size, mtime, inode, ctime)`; while that is unchanged its hash is taken
//! from the cache under `.imba/stat-cache.json` and the file is not read. A directory hashes as a
//! sorted manifest of its files (relative path, size, hash), so renaming or editing any file in it
//! changes its hash and touching one does not.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The hash of a file or directory, with its size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentHash {
    /// BLAKE3, hex.
    pub hash: String,
    /// Bytes; for a directory, of all its files.
    pub size: u64,
    /// For a directory: how many files it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// For an S3 object: its ETag (the hash is then of its ETag, size and version, as S3
    /// reports them, so that its identity is known without downloading it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// Files above this size are hashed memory-mapped on all cores.
const MMAP_THRESHOLD: u64 = 1 << 20;
/// Bytes of a large file mapped at a time. A mapped page counts in the process's resident memory
/// until it is unmapped, so mapping a 1.1 GB input whole put 1.1 GB on the peak RSS of the run
/// that hashed it (twice what `clean` then needs for it); a window keeps that to 64 MiB at the
/// same speed. A multiple of the page size, as a mapping's offset must be.
const MMAP_WINDOW: u64 = 64 << 20;
/// A cache entry is trusted only when the file's mtime is older than the hashing by this margin,
/// so that a write in the same clock tick as the hash is never missed.
const RACY_MARGIN_NS: i128 = 2_000_000_000;
const CACHE_FORMAT: u32 = 1;

/// Hashes one file's bytes. Only a regular file is read: a FIFO, socket or device is an error
/// carrying [`imba_stages::safe::NotAFile`], at once (a FIFO would block the read forever).
pub fn hash_file_contents(path: &Path, size: u64) -> io::Result<String> {
    let mut file = imba_stages::safe::open_file(path)?;
    let mut hasher = blake3::Hasher::new();
    if size >= MMAP_THRESHOLD {
        hash_mapped(&mut hasher, &file, MMAP_WINDOW)?;
    } else {
        let mut bytes = Vec::with_capacity(size as usize);
        file.read_to_end(&mut bytes)?;
        hasher.update(&bytes);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Feeds a file to `hasher` a mapped window of `window` bytes at a time, each on all cores.
fn hash_mapped(hasher: &mut blake3::Hasher, file: &std::fs::File, window: u64) -> io::Result<()> {
    let len = file.metadata()?.len();
    let mut offset = 0;
    while offset < len {
        let take = window.min(len - offset);
        // SAFETY: read-only. A stage's input is not written while imba hashes it; if another
        // program truncates it meanwhile, the read of a vanished page faults, as with any mmap.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(take as usize)
                .populate()
                .map(file)?
        };
        hasher.update_rayon(&map);
        offset += take;
    }
    Ok(())
}

/// A file inside a directory input that imba does not read (a FIFO, a socket, a device), with
/// its path relative to the directory. Carried inside an [`io::Error`] from
/// [`StatCache::hash_path`], so that the caller can name it: "`data/dir/x` is a FIFO …".
#[derive(Debug)]
pub struct NotAFileInDir {
    pub relative: PathBuf,
    pub not: imba_stages::safe::NotAFile,
}

impl std::fmt::Display for NotAFileInDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "holds `{}`, which {}",
            imba_stages::safe::escape(&self.relative.to_string_lossy()),
            self.not
        )
    }
}

impl std::error::Error for NotAFileInDir {}

impl NotAFileInDir {
    /// The [`NotAFileInDir`] inside an I/O error, when that is what it is.
    pub fn of(error: &io::Error) -> Option<&NotAFileInDir> {
        error.get_ref()?.downcast_ref::<NotAFileInDir>()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    /// When the hash was taken (ns since the epoch).
    hashed_ns: i128,
    hash: String,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    entries: HashMap<String, Entry>,
}

/// The stat cache: path → identity → hash. Safe to share between threads.
pub struct StatCache {
    file: Option<PathBuf>,
    entries: Mutex<HashMap<String, Entry>>,
    dirty: Mutex<bool>,
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn identity(meta: &std::fs::Metadata) -> (u64, i128, i128, u64) {
    (
        meta.len(),
        meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        meta.ino(),
    )
}

impl StatCache {
    /// A cache that lives only in memory.
    pub fn in_memory() -> Self {
        StatCache {
            file: None,
            entries: Mutex::new(HashMap::new()),
            dirty: Mutex::new(false),
        }
    }

    /// Loads the cache at `file`; a missing or unreadable cache is an empty one (and one that is
    /// not a regular file, a FIFO say, is not read: saving the cache replaces it).
    pub fn load(file: PathBuf) -> Self {
        let read = || -> io::Result<Vec<u8>> {
            let mut bytes = Vec::new();
            imba_stages::safe::open_file(&file)?.read_to_end(&mut bytes)?;
            Ok(bytes)
        };
        let bytes = match read() {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("stat cache {} not read: {e}", file.display());
                }
                None
            }
        };
        let entries = bytes
            .and_then(|bytes| serde_json::from_slice::<CacheFile>(&bytes).ok())
            .filter(|c| c.version == CACHE_FORMAT)
            .map(|c| c.entries)
            .unwrap_or_default();
        StatCache {
            file: Some(file),
            entries: Mutex::new(entries),
            dirty: Mutex::new(false),
        }
    }

    /// Writes the cache back if it changed (atomically: a temp file, then a rename).
    pub fn save(&self) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if !*dirty {
            return Ok(());
        }
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let bytes = serde_json::to_vec(&CacheFile {
            version: CACHE_FORMAT,
            entries,
        })
        .map_err(io::Error::other)?;
        crate::store::fs::write_atomic(file, &bytes)?;
        *dirty = false;
        Ok(())
    }

    fn lookup(&self, key: &str, meta: &std::fs::Metadata) -> Option<String> {
        let (size, mtime_ns, ctime_ns, ino) = identity(meta);
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(key)?;
        let same = entry.size == size
            && entry.mtime_ns == mtime_ns
            && entry.ctime_ns == ctime_ns
            && entry.ino == ino;
        (same && mtime_ns < entry.hashed_ns - RACY_MARGIN_NS).then(|| entry.hash.clone())
    }

    fn remember(&self, key: String, meta: &std::fs::Metadata, hash: &str, hashed_ns: i128) {
        let (size, mtime_ns, ctime_ns, ino) = identity(meta);
        let entry = Entry {
            size,
            mtime_ns,
            ctime_ns,
            ino,
            hashed_ns,
            hash: hash.to_owned(),
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.get(&key) != Some(&entry) {
            entries.insert(key, entry);
            *self.dirty.lock().unwrap_or_else(|e| e.into_inner()) = true;
        }
    }

    /// The cached hashes of the files under `dir`, by path relative to it.
    pub fn hashes_under(&self, dir: &Path) -> Vec<(PathBuf, String)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .filter_map(|(key, entry)| {
                let relative = Path::new(key).strip_prefix(dir).ok()?;
                (!relative.as_os_str().is_empty())
                    .then(|| (relative.to_path_buf(), entry.hash.clone()))
            })
            .collect()
    }

    /// Records that `path` (just committed) has `hash`, so it is not read again.
    pub fn record(&self, path: &Path, hash: &str) {
        if let Ok(meta) = std::fs::metadata(path) {
            // The bytes were hashed before the rename that put them here; the rename changed
            // neither content nor mtime. Trust the entry only once the racy margin has passed.
            let hashed_ns = identity(&meta).1.max(now_ns());
            self.remember(path.to_string_lossy().into_owned(), &meta, hash, hashed_ns);
        }
    }

    fn file_hash(&self, path: &Path, meta: &std::fs::Metadata) -> io::Result<String> {
        let key = path.to_string_lossy().into_owned();
        if let Some(hash) = self.lookup(&key, meta) {
            return Ok(hash);
        }
        let hashed_ns = now_ns();
        tracing::trace!(path = %path.display(), size = meta.len(), "hashing");
        let hash = hash_file_contents(path, meta.len())?;
        self.remember(key, meta, &hash, hashed_ns);
        Ok(hash)
    }

    /// The hash of a file or directory; `None` when nothing is there.
    pub fn hash_path(&self, path: &Path) -> io::Result<Option<ContentHash>> {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            return self.hash_dir(path).map(Some);
        }
        // A FIFO, socket or device is refused before anything opens it.
        imba_stages::safe::check_walked(meta.file_type())?;
        Ok(Some(ContentHash {
            hash: self.file_hash(path, &meta)?,
            size: meta.len(),
            files: None,
            etag: None,
        }))
    }

    fn hash_dir(&self, dir: &Path) -> io::Result<ContentHash> {
        let mut manifest = blake3::Hasher::new();
        let (mut size, mut files) = (0u64, 0u64);
        for entry in walkdir::WalkDir::new(dir)
            .follow_links(true)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| {
                let path = e
                    .path()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| dir.to_path_buf());
                io::Error::other(format!("{}: {e}", path.display()))
            })?;
            if entry.file_type().is_dir() {
                continue;
            }
            let relative = entry.path().strip_prefix(dir).unwrap_or(entry.path());
            // A FIFO, socket or device in the directory is an error naming it, not skipped:
            // its content is not part of the hash, so changing it would go unnoticed.
            let in_dir = |error: io::Error| match imba_stages::safe::NotAFile::of(&error) {
                Some(not) => io::Error::new(
                    io::ErrorKind::InvalidInput,
                    NotAFileInDir {
                        relative: relative.to_path_buf(),
                        not: not.clone(),
                    },
                ),
                None => error,
            };
            imba_stages::safe::check_walked(entry.file_type()).map_err(in_dir)?;
            let meta = entry.metadata().map_err(io::Error::other)?;
            let hash = self.file_hash(entry.path(), &meta).map_err(in_dir)?;
            manifest.update(relative.to_string_lossy().as_bytes());
            manifest.update(&[0]);
            manifest.update(meta.len().to_string().as_bytes());
            manifest.update(&[0]);
            manifest.update(hash.as_bytes());
            manifest.update(b"\n");
            size += meta.len();
            files += 1;
        }
        Ok(ContentHash {
            hash: manifest.finalize().to_hex().to_string(),
            size,
            files: Some(files),
            etag: None,
        })
    }
}

/// BLAKE3 over the canonical JSON encoding of `value` (object keys sorted at every level).
pub fn fingerprint(value: &serde_json::Value) -> String {
    let mut bytes = Vec::new();
    canonical(value, &mut bytes);
    blake3::hash(&bytes).to_hex().to_string()
}

fn canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(
                    serde_json::Value::String(key.clone())
                        .to_string()
                        .as_bytes(),
                );
                out.push(b':');
                canonical(&map[key], out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn file_hash_is_blake3_of_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, b"hello").unwrap();
        let cache = StatCache::in_memory();
        let hash = cache.hash_path(&path).unwrap().unwrap();
        assert_eq!(hash.hash, blake3::hash(b"hello").to_hex().to_string());
        assert_eq!(hash.size, 5);
        assert!(cache.hash_path(&dir.path().join("nope")).unwrap().is_none());
    }

    #[test]
    fn large_files_hash_the_same_through_mmap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let hash = StatCache::in_memory().hash_path(&path).unwrap().unwrap();
        assert_eq!(hash.hash, blake3::hash(&bytes).to_hex().to_string());
        // In windows of one page, of 1 MiB (a window ending mid-file) or larger than the file,
        // the hash is the whole file's.
        let whole = blake3::hash(&bytes);
        for window in [4096, 1 << 20, 1 << 30] {
            let mut hasher = blake3::Hasher::new();
            hash_mapped(&mut hasher, &std::fs::File::open(&path).unwrap(), window).unwrap();
            assert_eq!(hasher.finalize(), whole, "window {window}");
        }
    }

    /// Makes a FIFO at `path`.
    pub(crate) fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o644) }, 0, "mkfifo");
    }

    #[test]
    fn a_fifo_is_refused_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("in.csv");
        mkfifo(&fifo);
        let cache = StatCache::in_memory();
        // Returns at once: nothing opens the FIFO to read it.
        let error = cache.hash_path(&fifo).unwrap_err();
        assert_eq!(
            imba_stages::safe::NotAFile::of(&error).unwrap().kind,
            "a FIFO (named pipe)"
        );
        let error = hash_file_contents(&fifo, 0).unwrap_err();
        assert!(imba_stages::safe::NotAFile::of(&error).is_some());
    }

    #[test]
    fn a_fifo_in_a_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("a"), "1").unwrap();
        mkfifo(&d.join("sub/p"));
        let error = StatCache::in_memory().hash_path(&d).unwrap_err();
        let inner = NotAFileInDir::of(&error).expect("names the entry");
        assert_eq!(inner.relative, Path::new("sub/p"));
        assert_eq!(
            inner.to_string(),
            "holds `sub/p`, which is a FIFO (named pipe); imba reads only regular files and directories"
        );
    }

    #[test]
    fn a_fifo_stat_cache_is_an_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cache.json");
        mkfifo(&file);
        let cache = StatCache::load(file.clone());
        assert!(cache.hashes_under(dir.path()).is_empty());
        // Saving replaces the FIFO with the cache.
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        cache.hash_path(&path).unwrap();
        cache.save().unwrap();
        assert!(std::fs::metadata(&file).unwrap().is_file());
    }

    #[test]
    fn directory_hash_follows_names_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("a"), "1").unwrap();
        std::fs::write(d.join("sub/b"), "2").unwrap();
        let cache = StatCache::in_memory();
        let first = cache.hash_path(&d).unwrap().unwrap();
        assert_eq!((first.size, first.files), (2, Some(2)));
        std::fs::rename(d.join("a"), d.join("c")).unwrap();
        let renamed = cache.hash_path(&d).unwrap().unwrap();
        assert_ne!(first.hash, renamed.hash);
        std::fs::rename(d.join("c"), d.join("a")).unwrap();
        assert_eq!(cache.hash_path(&d).unwrap().unwrap().hash, first.hash);
    }

    #[test]
    fn the_cache_is_used_only_for_files_older_than_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let cache = StatCache::in_memory();
        let meta = std::fs::metadata(&path).unwrap();
        // Pretend the file was hashed long after it was written, with a wrong hash: the cache
        // answers without reading.
        cache.remember(
            path.to_string_lossy().into(),
            &meta,
            "cached",
            now_ns() + 10 * RACY_MARGIN_NS,
        );
        assert_eq!(cache.hash_path(&path).unwrap().unwrap().hash, "cached");
        // Hashed in the same instant as the write: not trusted, the file is read.
        cache.remember(
            path.to_string_lossy().into(),
            &meta,
            "cached",
            identity(&meta).1,
        );
        assert_eq!(
            cache.hash_path(&path).unwrap().unwrap().hash,
            blake3::hash(b"one").to_hex().to_string()
        );
    }

    #[test]
    fn the_cache_survives_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cache.json");
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        let cache = StatCache::load(file.clone());
        let meta = std::fs::metadata(&path).unwrap();
        cache.remember(
            path.to_string_lossy().into(),
            &meta,
            "h",
            now_ns() + 10 * RACY_MARGIN_NS,
        );
        cache.save().unwrap();
        let again = StatCache::load(file);
        assert_eq!(again.hash_path(&path).unwrap().unwrap().hash, "h");
    }
}
