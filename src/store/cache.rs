//! The run cache under `.imba/cache/`: every committed output's content once by BLAKE3, and
//! per stage fingerprint the outputs it produced, so that a stage computed once is never
//! computed again on this machine: when its fingerprint comes back (a param changed and changed
//! back, an `out` folder visited again), its outputs are restored instead.
//!
//! Layout (next to the S3 download cache, `objects/` and `dirs/`):
//!
//! ```text
//! .imba/cache/blobs/ab/cdef…      a file's bytes, read-only, named by their BLAKE3
//! .imba/cache/trees/ab/cdef….json  a folder: its files (relative path, size, BLAKE3), sorted
//! .imba/cache/runs/ab/cdef….json   a fingerprint: its outputs, checks and report
//! ```
//!
//! A folder's hash is the hash of its manifest, computed as the stat cache hashes a directory
//! and as a version's `content_hash` is computed, so the three agree. Blobs are written to a
//! temporary name and renamed; an entry is written only after its blobs, atomically; an entry's
//! file time is its last use (for `imba cache` and least-recently-used eviction). Blobs are
//! copied in and out (reflinked where the file system can), never hard-linked: a restored
//! output may be edited in place without touching the cache.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::hash::ContentHash;
use super::versions::{content_hash, MetaFile};

/// The entry format this build reads and writes.
pub const ENTRY_FORMAT: u32 = 1;

/// The imba release line whose entries this build uses: an entry written by another major
/// version (or, before 1.0, another minor) never matches, even where the fingerprint would.
pub fn release_line() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let mut parts = version.split('.');
    match (parts.next(), parts.next()) {
        (Some("0"), Some(minor)) => format!("0.{minor}"),
        (Some(major), _) => major.to_owned(),
        _ => version.to_owned(),
    }
}

/// One output of a cached run: its content, and its identity as the store committed it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedOutput {
    /// BLAKE3 of a file's bytes, or of a folder's manifest.
    pub blake3: String,
    pub size: u64,
    /// For a folder: how many files it holds (its manifest is under `trees/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// What the lock file recorded for it when it was committed (a local output: the same
    /// hash; an S3 output: its ETag-based identity; a versioned one: its version's folder).
    pub committed: ContentHash,
    /// A local versioned output: the blob of its version's `_meta.json`, which a restore
    /// into a new version keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<String>,
    /// The files that were executable (paths in a folder; `""` for a file output): restored
    /// so. Every other restored file is an ordinary 0644 file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub executable: Vec<String>,
}

/// What a stage fingerprint produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub format: u32,
    /// [`release_line`] of the imba that wrote it.
    pub imba: String,
    pub fingerprint: String,
    /// The stage that computed it (a name only: the fingerprint is what matches).
    pub stage: String,
    /// When it was computed (RFC 3339).
    pub created_at: String,
    /// How long computing it took.
    pub duration_ms: u64,
    /// Each output by the path the lock file shows (relative to the workdir, or the S3 URL).
    pub outputs: BTreeMap<String, CachedOutput>,
    /// The checks a built-in stage reported about itself.
    #[serde(default)]
    pub reported_checks: Vec<Json>,
    /// The stage's `checks:` as they were evaluated when it was computed, in order.
    #[serde(default)]
    pub checks: Vec<Json>,
    /// What a built-in stage reported.
    #[serde(default)]
    pub report: Json,
}

/// What an entry needs: its blobs (hash and size; a version's metadata counts 0) and its
/// folders' manifests, each once, sorted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Needs {
    pub blobs: Vec<(String, u64)>,
    pub trees: Vec<String>,
}

impl Entry {
    /// Whether every hash it names is one: an entry from elsewhere (a remote) that names
    /// anything else is not used.
    pub fn is_valid(&self) -> bool {
        is_hash(&self.fingerprint)
            && self
                .outputs
                .values()
                .all(|o| is_hash(&o.blake3) && o.meta.as_deref().is_none_or(is_hash))
    }

    /// Every blob and folder manifest this entry refers to, the files of a folder read through
    /// `manifest` (from this cache, or from a remote).
    pub fn needs<E>(
        &self,
        mut manifest: impl FnMut(&str) -> Result<Vec<MetaFile>, E>,
    ) -> Result<Needs, E> {
        let mut needs = Needs::default();
        for output in self.outputs.values() {
            needs
                .blobs
                .extend(output.meta.iter().map(|m| (m.clone(), 0)));
            match output.files {
                None => needs.blobs.push((output.blake3.clone(), output.size)),
                Some(_) => {
                    needs.trees.push(output.blake3.clone());
                    let files = manifest(&output.blake3)?;
                    needs
                        .blobs
                        .extend(files.into_iter().map(|f| (f.blake3, f.size)));
                }
            }
        }
        needs.blobs.sort();
        needs.blobs.dedup_by(|a, b| a.0 == b.0);
        needs.trees.sort();
        needs.trees.dedup();
        Ok(needs)
    }
}

/// What [`RunCache::store`] kept of one staged output.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub blake3: String,
    pub size: u64,
    pub files: Option<u64>,
    /// The executable files, as [`CachedOutput::executable`] lists them.
    pub executable: Vec<String>,
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

/// Why a cached output could not be brought back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the cache has no {what} {hash}")]
    Missing { what: &'static str, hash: String },
    #[error(
        "the cached {what} of `{output}` is corrupt: expected BLAKE3 {expected}, found {actual}"
    )]
    Corrupt {
        what: &'static str,
        output: String,
        expected: String,
        actual: String,
    },
    #[error("cannot restore `{output}`: {source}")]
    Io { output: String, source: io::Error },
}

/// Sizes and ages, for `imba cache`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    pub entries: u64,
    pub blobs: u64,
    pub trees: u64,
    /// Bytes of the blobs.
    pub bytes: u64,
    /// The entry used least recently, and when.
    pub oldest_use: Option<SystemTime>,
    pub newest_use: Option<SystemTime>,
}

/// What a garbage collection removed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Removed {
    pub entries: u64,
    pub blobs: u64,
    pub trees: u64,
    pub bytes: u64,
}

/// The run cache of one workdir.
#[derive(Clone, Debug)]
pub struct RunCache {
    root: PathBuf,
}

/// `ab`, `cdef…` for a hash `abcdef…`. Anything but a BLAKE3 in lowercase hex (which a
/// tampered entry could hold: `../…`, an absolute path) names a place that is never written,
/// so that no path built from it leaves the cache.
pub(super) fn split(hash: &str) -> (&str, &str) {
    if is_hash(hash) {
        hash.split_at(2)
    } else {
        ("invalid", "invalid")
    }
}

/// A BLAKE3 as imba writes it: 64 lowercase hex digits.
pub fn is_hash(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A name for a temporary file under `dir`, unique per process and call.
fn temporary(dir: &Path, tag: &str) -> PathBuf {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!(".{tag}-{}-{call}", std::process::id()))
}

/// Copies `from` to `to` (a reflink where the file system has them) and gives the BLAKE3 and
/// size of what `to` then holds, read back from `to`.
fn copy_and_hash(from: &Path, to: &Path) -> io::Result<(String, u64)> {
    if reflink_copy::reflink(from, to).is_err() {
        let _ = std::fs::remove_file(to);
        return copy_hashing(from, to);
    }
    let size = std::fs::metadata(to)?.len();
    Ok((super::hash::hash_file_contents(to, size)?, size))
}

/// Copies `from` to `to` in one pass, hashing the bytes on the way.
pub(super) fn copy_hashing(from: &Path, to: &Path) -> io::Result<(String, u64)> {
    let mut input = imba_stages::safe::open_file(from)?;
    let mut output = std::fs::File::create(to)?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        output.write_all(&buffer[..n])?;
        size += n as u64;
    }
    output.flush()?;
    Ok((hasher.finalize().to_hex().to_string(), size))
}

fn used_at(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl RunCache {
    /// The cache under `root` (`.imba/cache`); nothing is created until something is stored.
    pub fn new(root: PathBuf) -> Self {
        RunCache { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, hash: &str) -> PathBuf {
        let (a, b) = split(hash);
        self.root.join("blobs").join(a).join(b)
    }

    pub fn tree_path(&self, hash: &str) -> PathBuf {
        let (a, b) = split(hash);
        self.root.join("trees").join(a).join(format!("{b}.json"))
    }

    pub fn entry_path(&self, fingerprint: &str) -> PathBuf {
        let (a, b) = split(fingerprint);
        self.root.join("runs").join(a).join(format!("{b}.json"))
    }

    /// Keeps a copy of the staged output at `staged` (a file, or a folder when `dir`).
    pub fn store(&self, staged: &Path, dir: bool) -> io::Result<Stored> {
        if !dir {
            let (blake3, size) = self.store_file(staged)?;
            return Ok(Stored {
                blake3,
                size,
                files: None,
                executable: if is_executable(staged) {
                    vec![String::new()]
                } else {
                    Vec::new()
                },
            });
        }
        let mut files = Vec::new();
        let mut executable = Vec::new();
        // Links are followed, as the stat cache follows them when it hashes a folder: a
        // link is kept as the file it points to, and the folder's hash stays the same.
        for entry in walkdir::WalkDir::new(staged)
            .follow_links(true)
            .sort_by_file_name()
        {
            let entry = entry.map_err(io::Error::other)?;
            if entry.file_type().is_dir() {
                continue;
            }
            let relative = entry
                .path()
                .strip_prefix(staged)
                .unwrap_or(entry.path())
                .to_string_lossy()
                .replace('\\', "/");
            let (blake3, size) = self.store_file(entry.path())?;
            if is_executable(entry.path()) {
                executable.push(relative.clone());
            }
            files.push(MetaFile {
                path: relative,
                size,
                blake3,
            });
        }
        let blake3 = content_hash(&files);
        let size = files.iter().map(|f| f.size).sum();
        let count = files.len() as u64;
        let tree = self.tree_path(&blake3);
        if !tree.is_file() {
            let text = serde_json::to_vec(&files).map_err(io::Error::other)?;
            super::fs::write_atomic(&tree, &text)?;
        }
        Ok(Stored {
            blake3,
            size,
            files: Some(count),
            executable,
        })
    }

    /// Copies one file in as a blob (unless one with its hash is there); gives its hash, size.
    fn store_file(&self, path: &Path) -> io::Result<(String, u64)> {
        let blobs = self.root.join("blobs");
        std::fs::create_dir_all(&blobs)?;
        let tmp = temporary(&blobs, "blob");
        let copied = copy_and_hash(path, &tmp);
        let (hash, size) = match copied {
            Ok(done) => done,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let target = self.blob_path(&hash);
        if target.is_file() {
            let _ = std::fs::remove_file(&tmp);
            return Ok((hash, size));
        }
        let placed = (|| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&tmp, &target)
        })();
        if placed.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        placed.map(|()| (hash, size))
    }

    /// A fresh temporary path among the blobs, for a blob on its way in ([`RunCache::adopt`]).
    pub fn incoming(&self) -> io::Result<PathBuf> {
        let blobs = self.root.join("blobs");
        std::fs::create_dir_all(&blobs)?;
        Ok(temporary(&blobs, "incoming"))
    }

    /// Makes the file `tmp`, whose BLAKE3 the caller checked to be `hash`, the blob `hash`.
    pub fn adopt(&self, tmp: &Path, hash: &str) -> io::Result<()> {
        let target = self.blob_path(hash);
        let placed = (|| {
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o444))?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(tmp, &target)
        })();
        if placed.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        placed
    }

    /// Writes the entry of a fingerprint (after its blobs), replacing one that was there.
    pub fn put_entry(&self, entry: &Entry) -> io::Result<()> {
        let mut text = serde_json::to_vec_pretty(entry).map_err(io::Error::other)?;
        text.push(b'\n');
        super::fs::write_atomic(&self.entry_path(&entry.fingerprint), &text)
    }

    /// The entry of `fingerprint`, when this cache has one this build can use.
    pub fn entry(&self, fingerprint: &str) -> Option<Entry> {
        let bytes = std::fs::read(self.entry_path(fingerprint)).ok()?;
        let entry: Entry = serde_json::from_slice(&bytes).ok()?;
        (entry.format == ENTRY_FORMAT
            && entry.imba == release_line()
            && entry.fingerprint == fingerprint
            && entry.is_valid())
        .then_some(entry)
    }

    /// Marks the entry of `fingerprint` as used now.
    pub fn touch(&self, fingerprint: &str) {
        if let Ok(file) = std::fs::File::options()
            .append(true)
            .open(self.entry_path(fingerprint))
        {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    /// Keeps one file as a blob; its BLAKE3.
    pub fn store_blob(&self, path: &Path) -> io::Result<String> {
        self.store_file(path).map(|(hash, _)| hash)
    }

    /// The bytes of a blob, checked against its name.
    pub fn read_blob(&self, hash: &str) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.blob_path(hash)).ok()?;
        (blake3::hash(&bytes).to_hex().as_str() == hash).then_some(bytes)
    }

    /// Whether every blob (and manifest) of `output` is here, without reading them.
    pub fn holds(&self, output: &CachedOutput) -> bool {
        if output
            .meta
            .as_ref()
            .is_some_and(|m| !self.blob_path(m).is_file())
        {
            return false;
        }
        match output.files {
            None => self.blob_path(&output.blake3).is_file(),
            Some(_) => self
                .manifest(&output.blake3)
                .is_ok_and(|files| files.iter().all(|f| self.blob_path(&f.blake3).is_file())),
        }
    }

    /// The files of a cached folder, checked against its hash.
    pub fn manifest(&self, hash: &str) -> Result<Vec<MetaFile>, RestoreError> {
        let path = self.tree_path(hash);
        let bytes = std::fs::read(&path).map_err(|_| RestoreError::Missing {
            what: "folder manifest",
            hash: hash.to_owned(),
        })?;
        let files: Vec<MetaFile> =
            serde_json::from_slice(&bytes).map_err(|e| RestoreError::Corrupt {
                what: "folder manifest",
                output: path.display().to_string(),
                expected: hash.to_owned(),
                actual: format!("unreadable JSON ({e})"),
            })?;
        let actual = content_hash(&files);
        if actual != hash || !files.iter().all(|f| is_hash(&f.blake3)) {
            return Err(RestoreError::Corrupt {
                what: "folder manifest",
                output: path.display().to_string(),
                expected: hash.to_owned(),
                actual,
            });
        }
        Ok(files)
    }

    /// Writes the content of `output` at `to` (a file, or a folder that `to` becomes), each
    /// file checked against its BLAKE3 after the copy. `shown` names the output in errors.
    pub fn restore(
        &self,
        output: &CachedOutput,
        to: &Path,
        shown: &str,
    ) -> Result<(), RestoreError> {
        let executable = |relative: &str, path: &Path| -> Result<(), RestoreError> {
            if output.executable.iter().any(|e| e == relative) {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(
                    |source| RestoreError::Io {
                        output: shown.to_owned(),
                        source,
                    },
                )?;
            }
            Ok(())
        };
        match output.files {
            None => {
                self.restore_file(&output.blake3, to, shown)?;
                executable("", to)
            }
            Some(_) => {
                let files = self.manifest(&output.blake3)?;
                let io = |source| RestoreError::Io {
                    output: shown.to_owned(),
                    source,
                };
                std::fs::create_dir_all(to).map_err(io)?;
                for file in &files {
                    let relative = Path::new(&file.path);
                    if relative
                        .components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                    {
                        return Err(RestoreError::Corrupt {
                            what: "folder manifest",
                            output: shown.to_owned(),
                            expected: output.blake3.clone(),
                            actual: format!("a path `{}` outside the folder", file.path),
                        });
                    }
                    let target = to.join(relative);
                    if let Some(parent) = target.parent() {
                        std::fs::create_dir_all(parent).map_err(io)?;
                    }
                    self.restore_file(
                        &file.blake3,
                        &target,
                        &format!("{}/{}", shown.trim_end_matches('/'), file.path),
                    )?;
                    executable(&file.path, &target)?;
                }
                Ok(())
            }
        }
    }

    fn restore_file(&self, hash: &str, to: &Path, shown: &str) -> Result<(), RestoreError> {
        let blob = self.blob_path(hash);
        if !is_hash(hash) || !blob.is_file() {
            return Err(RestoreError::Missing {
                what: "blob",
                hash: hash.to_owned(),
            });
        }
        let io = |source| RestoreError::Io {
            output: shown.to_owned(),
            source,
        };
        let (actual, _) = copy_and_hash(&blob, to).map_err(io)?;
        // The copy of a read-only blob is an ordinary output: writable by its owner.
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644)).map_err(io)?;
        if actual != hash {
            // Neither the copy nor the blob is of any use: the blob goes too, so that the
            // computed output takes its place.
            let _ = std::fs::remove_file(to);
            let _ = std::fs::remove_file(&blob);
            return Err(RestoreError::Corrupt {
                what: "blob",
                output: shown.to_owned(),
                expected: hash.to_owned(),
                actual,
            });
        }
        Ok(())
    }

    /// Every entry this cache holds (readable ones), with its last use.
    pub fn entries(&self) -> Vec<(Entry, Option<SystemTime>)> {
        let mut entries = Vec::new();
        for file in walk_files(&self.root.join("runs")) {
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
            if let Ok(entry) = serde_json::from_slice::<Entry>(&bytes) {
                entries.push((entry, used_at(&file)));
            }
        }
        entries.sort_by(|a, b| a.0.fingerprint.cmp(&b.0.fingerprint));
        entries
    }

    /// How big the cache is, and how old its least recently used entry.
    pub fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        for file in walk_files(&self.root.join("runs")) {
            usage.entries += 1;
            if let Some(at) = used_at(&file) {
                usage.oldest_use = Some(usage.oldest_use.map_or(at, |o| o.min(at)));
                usage.newest_use = Some(usage.newest_use.map_or(at, |o| o.max(at)));
            }
        }
        for file in walk_files(&self.root.join("blobs")) {
            usage.blobs += 1;
            usage.bytes += std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        }
        usage.trees = walk_files(&self.root.join("trees")).len() as u64;
        usage
    }

    /// Removes every entry `keep` refuses, then every blob and manifest no remaining entry
    /// refers to (and temporaries left by a killed process). With `dry_run`, only counts them.
    pub fn collect(
        &self,
        keep: impl Fn(&Entry, Option<SystemTime>) -> bool,
        dry_run: bool,
    ) -> Removed {
        let remove = |file: &Path| dry_run || std::fs::remove_file(file).is_ok();
        let mut removed = Removed::default();
        let mut blobs = BTreeSet::new();
        let mut trees = BTreeSet::new();
        for file in walk_files(&self.root.join("runs")) {
            let entry = std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Entry>(&b).ok());
            match entry {
                Some(entry) if keep(&entry, used_at(&file)) => {
                    // A manifest that cannot be read keeps nothing of its own.
                    let needs =
                        entry.needs(|hash| Ok::<_, ()>(self.manifest(hash).unwrap_or_default()));
                    let needs = needs.unwrap_or_default();
                    blobs.extend(needs.blobs.into_iter().map(|(hash, _)| hash));
                    trees.extend(needs.trees);
                }
                _ => {
                    if remove(&file) {
                        removed.entries += 1;
                    }
                }
            }
        }
        let name_of = |file: &Path, suffix: &str| -> Option<String> {
            let dir = file.parent()?.file_name()?.to_string_lossy().into_owned();
            let name = file.file_name()?.to_string_lossy().into_owned();
            let name = name.strip_suffix(suffix)?;
            Some(format!("{dir}{name}")).filter(|h| is_hash(h))
        };
        for file in walk_files(&self.root.join("blobs")) {
            let referenced = name_of(&file, "").is_some_and(|h| blobs.contains(&h));
            if !referenced {
                let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
                if remove(&file) {
                    removed.blobs += 1;
                    removed.bytes += size;
                }
            }
        }
        for file in walk_files(&self.root.join("trees")) {
            let referenced = name_of(&file, ".json").is_some_and(|h| trees.contains(&h));
            if !referenced && remove(&file) {
                removed.trees += 1;
            }
        }
        removed
    }

    /// Removes the least recently used entries (and what only they referred to) until the
    /// blobs take at most `max_bytes`.
    pub fn evict(&self, max_bytes: u64) -> Removed {
        let usage = self.usage();
        if usage.bytes <= max_bytes {
            return Removed::default();
        }
        // Newest first; keep entries while their blobs (counted once) fit.
        let mut entries = self.entries();
        entries.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.fingerprint.cmp(&b.0.fingerprint))
        });
        let mut counted = BTreeSet::new();
        let mut total = 0u64;
        let mut kept = BTreeSet::new();
        for (entry, _) in &entries {
            let needs = entry
                .needs(|hash| Ok::<_, ()>(self.manifest(hash).unwrap_or_default()))
                .unwrap_or_default();
            let mut size = 0;
            let mut new = Vec::new();
            for (hash, bytes) in needs.blobs {
                if !counted.contains(&hash) {
                    size += bytes;
                    new.push(hash);
                }
            }
            if total + size > max_bytes {
                break;
            }
            total += size;
            counted.extend(new);
            kept.insert(entry.fingerprint.clone());
        }
        self.collect(|entry, _| kept.contains(&entry.fingerprint), false)
    }
}

/// The files under `dir`, sorted; none when it is not there.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(stored: &Stored) -> CachedOutput {
        CachedOutput {
            blake3: stored.blake3.clone(),
            size: stored.size,
            files: stored.files,
            committed: ContentHash {
                hash: stored.blake3.clone(),
                size: stored.size,
                files: stored.files,
                etag: None,
            },
            meta: None,
            executable: stored.executable.clone(),
        }
    }

    fn entry(fingerprint: &str, outputs: &[(&str, &Stored)]) -> Entry {
        Entry {
            format: ENTRY_FORMAT,
            imba: release_line(),
            fingerprint: fingerprint.to_owned(),
            stage: "s".to_owned(),
            created_at: "2026-12-03T00:00:00Z".to_owned(),
            duration_ms: 5,
            outputs: outputs
                .iter()
                .map(|(k, s)| (k.to_string(), output(s)))
                .collect(),
            reported_checks: Vec::new(),
            checks: Vec::new(),
            report: Json::Null,
        }
    }

    #[test]
    fn a_file_and_a_folder_come_back_byte_for_byte_and_writable() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RunCache::new(dir.path().join("cache"));
        let file = dir.path().join("f.csv");
        std::fs::write(&file, "a,b\n1,2\n").unwrap();
        let folder = dir.path().join("d");
        std::fs::create_dir_all(folder.join("sub")).unwrap();
        std::fs::write(folder.join("x.txt"), "x").unwrap();
        std::fs::write(folder.join("sub/y.txt"), "yy").unwrap();
        let f = cache.store(&file, false).unwrap();
        assert_eq!(f.blake3, blake3::hash(b"a,b\n1,2\n").to_hex().to_string());
        let d = cache.store(&folder, true).unwrap();
        assert_eq!((d.size, d.files), (3, Some(2)));
        // The folder's hash is the stat cache's hash of the same folder.
        let stat = crate::store::StatCache::in_memory();
        assert_eq!(stat.hash_path(&folder).unwrap().unwrap().hash, d.blake3);
        // Stored twice, kept once.
        cache.store(&file, false).unwrap();
        assert_eq!(cache.usage().blobs, 3);

        let back = dir.path().join("back");
        cache
            .restore(&output(&f), &back.join("f.csv"), "f")
            .unwrap_err();
        std::fs::create_dir_all(&back).unwrap();
        cache
            .restore(&output(&f), &back.join("f.csv"), "f")
            .unwrap();
        cache.restore(&output(&d), &back.join("d"), "d").unwrap();
        assert_eq!(std::fs::read(back.join("f.csv")).unwrap(), b"a,b\n1,2\n");
        assert_eq!(std::fs::read(back.join("d/sub/y.txt")).unwrap(), b"yy");
        let mode = std::fs::metadata(back.join("f.csv"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o200, 0o200, "a restored output is writable");
        // Editing the restored copy leaves the blob alone.
        std::fs::write(back.join("f.csv"), "edited").unwrap();
        assert_eq!(
            std::fs::read(cache.blob_path(&f.blake3)).unwrap(),
            b"a,b\n1,2\n"
        );
    }

    #[test]
    fn links_executables_and_tampered_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RunCache::new(dir.path().join("cache"));
        let folder = dir.path().join("d");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(folder.join("tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(folder.join("model.rds"), "model").unwrap();
        std::os::unix::fs::symlink("model.rds", folder.join("current")).unwrap();
        let stored = cache.store(&folder, true).unwrap();
        // The folder hashes as the stat cache hashes it: the link as what it points to.
        let stat = crate::store::StatCache::in_memory();
        assert_eq!(
            stat.hash_path(&folder).unwrap().unwrap().hash,
            stored.blake3
        );
        assert_eq!(stored.executable, ["tool"]);
        let back = dir.path().join("back");
        cache.restore(&output(&stored), &back, "d").unwrap();
        assert_eq!(std::fs::read(back.join("current")).unwrap(), b"model");
        let mode = |p: &str| {
            std::fs::metadata(back.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((mode("tool"), mode("model.rds")), (0o755, 0o644));

        // An entry naming anything but a hash (a tampered remote) is never used, and no path
        // built from such a name leaves the cache.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let fp = "cd".repeat(32);
        let mut bad = entry(&fp, &[("out", &stored)]);
        if let Some(o) = bad.outputs.get_mut("out") {
            o.blake3 = format!("ab/{}", victim.display());
            o.files = None;
        }
        assert!(!bad.is_valid());
        cache.put_entry(&bad).unwrap();
        assert_eq!(cache.entry(&fp), None);
        let out = &bad.outputs["out"];
        assert!(!cache.blob_path(&out.blake3).starts_with(&victim));
        cache
            .restore(out, &dir.path().join("x"), "out")
            .unwrap_err();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    }

    #[test]
    fn a_corrupt_blob_is_named_and_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RunCache::new(dir.path().join("cache"));
        let file = dir.path().join("f.csv");
        std::fs::write(&file, "good").unwrap();
        let f = cache.store(&file, false).unwrap();
        let blob = cache.blob_path(&f.blake3);
        std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&blob, "evil").unwrap();
        let to = dir.path().join("out.csv");
        let error = cache.restore(&output(&f), &to, "out.csv").unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "the cached blob of `out.csv` is corrupt: expected BLAKE3 {}, found {}",
                f.blake3,
                blake3::hash(b"evil").to_hex()
            )
        );
        assert!(!to.exists(), "a corrupt copy is removed");
    }

    #[test]
    fn entries_of_another_release_line_or_format_never_match() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RunCache::new(dir.path().join("cache"));
        let fp = "ab".repeat(32);
        let mut e = entry(&fp, &[]);
        cache.put_entry(&e).unwrap();
        assert_eq!(cache.entry(&fp), Some(e.clone()));
        e.imba = "99".to_owned();
        cache.put_entry(&e).unwrap();
        assert_eq!(cache.entry(&fp), None);
        e.imba = release_line();
        e.format = ENTRY_FORMAT + 1;
        cache.put_entry(&e).unwrap();
        assert_eq!(cache.entry(&fp), None);
    }

    #[test]
    fn collect_keeps_what_kept_entries_refer_to_and_evict_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RunCache::new(dir.path().join("cache"));
        let mut stored = Vec::new();
        for (i, text) in ["one", "two two", "three three three"].iter().enumerate() {
            let file = dir.path().join(format!("{i}"));
            std::fs::write(&file, text).unwrap();
            stored.push(cache.store(&file, false).unwrap());
        }
        let fps: Vec<String> = ["a", "b", "c"].iter().map(|c| c.repeat(64)).collect();
        for (i, fp) in fps.iter().enumerate() {
            cache.put_entry(&entry(fp, &[("out", &stored[i])])).unwrap();
            // Oldest use first: a, then b, then c.
            let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + i as u64);
            std::fs::File::options()
                .append(true)
                .open(cache.entry_path(fp))
                .unwrap()
                .set_modified(at)
                .unwrap();
        }
        assert_eq!(cache.usage().bytes, 3 + 7 + 17);
        // Room for c (17 bytes) and b (7), not a.
        let removed = cache.evict(24);
        assert_eq!((removed.entries, removed.blobs, removed.bytes), (1, 1, 3));
        assert!(cache.entry(&fps[0]).is_none() && cache.entry(&fps[1]).is_some());
        let removed = cache.collect(|e, _| e.fingerprint == fps[2], true);
        assert_eq!((removed.entries, removed.blobs), (1, 1));
        assert_eq!(cache.usage().bytes, 24, "a dry run removes nothing");
        let removed = cache.collect(|e, _| e.fingerprint == fps[2], false);
        assert_eq!((removed.entries, removed.blobs), (1, 1));
        assert_eq!(cache.usage().bytes, 17);
    }
}
