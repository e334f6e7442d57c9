//! The remote run cache a team shares: the layout of `.imba/cache/` (`blobs/`, `trees/`,
//! `runs/`) under an S3 prefix or a shared folder, plus `leases/`, through the [`Store`] that
//! holds the data (the same S3 settings and credentials).
//!
//! Only what is missing moves, in parallel; every blob that comes down is hashed as it is
//! written and never used when it does not match its name. A lease (`leases/ab/cdef….json`,
//! created with `If-None-Match: *`) says that a machine is computing a fingerprint, so that
//! another one waits for its result instead of computing it too.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::cache::{release_line, Entry, RunCache, ENTRY_FORMAT};
use super::versions::MetaFile;
use super::{Store, StoreError};
use crate::model::Location;

/// Transfers at once.
const PARALLEL: usize = 8;

/// A remote run cache at `root`, reached through `store`.
pub struct Remote<'a> {
    store: &'a dyn Store,
    root: Location,
    cache: &'a RunCache,
}

/// Why a remote entry could not be brought here.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The remote could not be reached, or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An object is not what its name says: never used.
    #[error("the remote object {url} is corrupt: expected BLAKE3 {expected}, found {actual}")]
    Corrupt {
        url: String,
        expected: String,
        actual: String,
    },
    /// The entry names a blob the remote does not have.
    #[error("the remote run cache has no {url}")]
    Missing { url: String },
    #[error("cannot write to the run cache: {0}")]
    Local(std::io::Error),
}

/// What a transfer moved.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Moved {
    pub entries: u64,
    pub blobs: u64,
    pub bytes: u64,
    /// Blobs that were there already.
    pub present: u64,
}

impl Moved {
    pub fn add(&mut self, other: &Moved) {
        self.entries += other.entries;
        self.blobs += other.blobs;
        self.bytes += other.bytes;
        self.present += other.present;
    }
}

/// Told of each blob moved (its bytes), for a progress bar.
pub type Progress<'p> = &'p (dyn Fn(u64) + Sync);

/// Who holds a lease, and until when.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// `user@host pid N`.
    pub holder: String,
    /// The run computing it.
    pub run: String,
    /// When it was taken (RFC 3339).
    pub since: String,
    /// Seconds since the epoch after which, not renewed, it is free.
    pub expires: u64,
}

impl Lease {
    pub fn new(run: &str, ttl: Duration) -> Lease {
        Lease {
            holder: holder(),
            run: run.to_owned(),
            since: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            expires: epoch() + ttl.as_secs(),
        }
    }

    pub fn expired(&self) -> bool {
        epoch() > self.expires
    }

    /// The same lease, expiring `ttl` from now.
    pub fn renewed(&self, ttl: Duration) -> Lease {
        Lease {
            expires: epoch() + ttl.as_secs(),
            ..self.clone()
        }
    }
}

fn epoch() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `user@host pid N`, for a person reading who holds a lease.
fn holder() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "someone".to_owned());
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer it is given.
    let host = if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0 {
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        String::from_utf8_lossy(&name[..end]).into_owned()
    } else {
        "localhost".to_owned()
    };
    format!("{user}@{host} pid {}", std::process::id())
}

/// What taking a lease found.
#[derive(Debug)]
pub enum Taken {
    /// This run holds it now.
    Mine,
    /// This run holds it now, taken over from a holder whose lease expired (killed, or cut
    /// off from the remote).
    TookOver(Lease),
    /// Another run holds it, and it is live.
    Held(Lease),
}

use super::cache::{is_hash, split};

impl<'a> Remote<'a> {
    pub fn new(store: &'a dyn Store, root: Location, cache: &'a RunCache) -> Self {
        Remote { store, root, cache }
    }

    /// The location of `relative` under the remote's root.
    fn at(&self, relative: &str) -> Location {
        match &self.root {
            Location::Local(path) => Location::Local(path.join(relative)),
            Location::S3 { bucket, key } => Location::S3 {
                bucket: bucket.clone(),
                key: format!("{}/{relative}", key.trim_end_matches('/')),
            },
        }
    }

    /// How a location of the remote is shown: `s3://bucket/key`, or the path.
    pub fn url(&self, at: &Location) -> String {
        match at {
            Location::Local(path) => path.display().to_string(),
            Location::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
        }
    }

    pub fn root_url(&self) -> String {
        self.url(&self.root)
    }

    fn blob(&self, hash: &str) -> Location {
        let (a, b) = split(hash);
        self.at(&format!("blobs/{a}/{b}"))
    }

    fn tree(&self, hash: &str) -> Location {
        let (a, b) = split(hash);
        self.at(&format!("trees/{a}/{b}.json"))
    }

    fn entry_at(&self, fingerprint: &str) -> Location {
        let (a, b) = split(fingerprint);
        self.at(&format!("runs/{a}/{b}.json"))
    }

    fn lease_at(&self, fingerprint: &str) -> Location {
        let (a, b) = split(fingerprint);
        self.at(&format!("leases/{a}/{b}.json"))
    }

    /// Asks the remote once whether it can be used at all (reachable, credentials accepted,
    /// bucket there), so that a run finds out before its first stage, with one clear error.
    pub fn probe(&self) -> Result<(), StoreError> {
        // A key that is never written, nor a prefix of one: a HEAD of it answers "not found"
        // from a remote that works, and says what is wrong with one that does not.
        self.store.exists(&self.at("probe")).map(|_| ())
    }

    /// The remote entry of `fingerprint`, when there is one this build can use.
    pub fn entry(&self, fingerprint: &str) -> Result<Option<Entry>, StoreError> {
        let Some(bytes) = self.store.get(&self.entry_at(fingerprint))? else {
            return Ok(None);
        };
        let entry: Option<Entry> = serde_json::from_slice(&bytes).ok();
        Ok(entry.filter(|e| {
            e.format == ENTRY_FORMAT
                && e.imba == release_line()
                && e.fingerprint == fingerprint
                && e.is_valid()
        }))
    }

    /// Brings the blobs of `entry` that the local cache lacks, each checked, then the entry.
    pub fn fetch(&self, entry: &Entry, progress: Progress) -> Result<Moved, FetchError> {
        let missing: Vec<(String, u64)> = entry
            .needs(|hash| self.fetch_tree(hash))?
            .blobs
            .into_iter()
            .filter(|(hash, _)| !self.cache.blob_path(hash).is_file())
            .collect();
        let (blobs, bytes) =
            self.parallel(&missing, |(hash, _)| self.fetch_blob(hash), progress)?;
        self.cache.put_entry(entry).map_err(FetchError::Local)?;
        Ok(Moved {
            entries: 1,
            blobs,
            bytes,
            present: 0,
        })
    }

    /// A folder manifest, from the local cache or the remote (checked, then kept locally).
    fn fetch_tree(&self, hash: &str) -> Result<Vec<MetaFile>, FetchError> {
        if let Ok(files) = self.cache.manifest(hash) {
            return Ok(files);
        }
        let at = self.tree(hash);
        let url = self.url(&at);
        let bytes = self
            .store
            .get(&at)?
            .ok_or_else(|| FetchError::Missing { url: url.clone() })?;
        let files: Vec<MetaFile> =
            serde_json::from_slice(&bytes).map_err(|e| FetchError::Corrupt {
                url: url.clone(),
                expected: hash.to_owned(),
                actual: format!("unreadable JSON ({e})"),
            })?;
        let actual = super::versions::content_hash(&files);
        if actual != hash || !is_hash(hash) || !files.iter().all(|f| is_hash(&f.blake3)) {
            return Err(FetchError::Corrupt {
                url,
                expected: hash.to_owned(),
                actual,
            });
        }
        super::fs::write_atomic(&self.cache.tree_path(hash), &bytes).map_err(FetchError::Local)?;
        Ok(files)
    }

    /// Downloads one blob into the local cache, checked against its name; gives its size.
    fn fetch_blob(&self, hash: &str) -> Result<u64, FetchError> {
        let at = self.blob(hash);
        let tmp = self.cache.incoming().map_err(FetchError::Local)?;
        let received = self.store.receive(&at, &tmp);
        let (actual, size) = match received {
            Ok(Some(done)) => done,
            Ok(None) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(FetchError::Missing { url: self.url(&at) });
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        if actual != hash {
            let _ = std::fs::remove_file(&tmp);
            // Of no use to anyone: removed, so that the next push of that content replaces it.
            let _ = self.store.delete(&at);
            return Err(FetchError::Corrupt {
                url: self.url(&at),
                expected: hash.to_owned(),
                actual,
            });
        }
        self.cache.adopt(&tmp, hash).map_err(FetchError::Local)?;
        Ok(size)
    }

    /// Sends the blobs, folder manifests and entry of `entry` that the remote lacks.
    pub fn push(&self, entry: &Entry, progress: Progress) -> Result<Moved, StoreError> {
        let needs = entry.needs(|hash| {
            self.cache
                .manifest(hash)
                .map_err(|e| StoreError::Other(e.to_string()))
        })?;
        for hash in &needs.trees {
            let at = self.tree(hash);
            if !self.store.exists(&at)? {
                self.store.send(&self.cache.tree_path(hash), &at)?;
            }
        }
        let blobs = needs.blobs;
        let present = AtomicU64::new(0);
        let done = self.parallel(
            &blobs,
            |(hash, _)| {
                let at = self.blob(hash);
                if self.store.exists(&at)? {
                    present.fetch_add(1, Ordering::Relaxed);
                    return Ok(0);
                }
                let local = self.cache.blob_path(hash);
                if !local.is_file() {
                    return Err(StoreError::Other(format!(
                        "the local run cache has no blob {hash} of stage `{}`: it was collected; run the stage again to push it",
                        entry.stage
                    )));
                }
                self.store.send(&local, &at)?;
                Ok(std::fs::metadata(&local).map(|m| m.len()).unwrap_or(0))
            },
            progress,
        )?;
        // The entry last: a reader that finds it finds its blobs.
        let mut text =
            serde_json::to_vec_pretty(entry).map_err(|e| StoreError::Other(e.to_string()))?;
        text.push(b'\n');
        self.store.put(&self.entry_at(&entry.fingerprint), &text)?;
        let present = present.into_inner();
        Ok(Moved {
            entries: 1,
            blobs: done.0 - present,
            bytes: done.1,
            present,
        })
    }

    /// Runs `one` over `items`, `PARALLEL` at a time; the count of items and the sum of what
    /// they gave, or the first error.
    fn parallel<T: Sync, E: Send>(
        &self,
        items: &[T],
        one: impl Fn(&T) -> Result<u64, E> + Sync,
        progress: Progress,
    ) -> Result<(u64, u64), E> {
        let next = AtomicUsize::new(0);
        let bytes = AtomicU64::new(0);
        let failed: std::sync::Mutex<Option<E>> = std::sync::Mutex::new(None);
        let work = || loop {
            if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                return;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else {
                return;
            };
            match one(item) {
                Ok(n) => {
                    bytes.fetch_add(n, Ordering::Relaxed);
                    progress(n);
                }
                Err(e) => {
                    if let Ok(mut slot) = failed.lock() {
                        slot.get_or_insert(e);
                    }
                    return;
                }
            }
        };
        imba_stages::threads::each(PARALLEL.min(items.len()), |_| work());
        match failed.into_inner().ok().flatten() {
            Some(e) => Err(e),
            None => Ok((items.len() as u64, bytes.into_inner())),
        }
    }

    /// Removes from the remote every entry `keep` refuses, then every blob and folder manifest
    /// that no remaining entry refers to and that is older than `grace` (another machine may
    /// be pushing it, its entry not written yet). With `dry_run`, only counts. Leases are left
    /// alone: they expire.
    pub fn collect(
        &self,
        keep: impl Fn(&Entry, Option<SystemTime>) -> bool,
        grace: Duration,
        dry_run: bool,
    ) -> Result<super::cache::Removed, StoreError> {
        let mut removed = super::cache::Removed::default();
        let old = |modified: Option<SystemTime>| {
            modified
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_some_and(|age| age >= grace)
        };
        let remove = |at: &Location| -> Result<(), StoreError> {
            if !dry_run {
                self.store.delete(at)?;
            }
            Ok(())
        };
        let mut blobs = std::collections::BTreeSet::new();
        let mut trees = std::collections::BTreeSet::new();
        for listed in self.store.list(&self.at("runs"))? {
            let at = self.at(&format!("runs/{}", listed.path));
            let entry: Option<Entry> = self
                .store
                .get(&at)?
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            match entry {
                Some(entry) if keep(&entry, listed.modified) => {
                    // A manifest that cannot be read keeps nothing of its own; the fetch of
                    // its entry would fail anyway.
                    let needs = entry
                        .needs(|hash| Ok::<_, ()>(self.fetch_tree(hash).unwrap_or_default()))
                        .unwrap_or_default();
                    blobs.extend(needs.blobs.into_iter().map(|(hash, _)| hash));
                    trees.extend(needs.trees);
                }
                Some(_) => {
                    remove(&at)?;
                    removed.entries += 1;
                }
                None if old(listed.modified) => {
                    remove(&at)?;
                    removed.entries += 1;
                }
                None => {}
            }
        }
        for listed in self.store.list(&self.at("blobs"))? {
            let hash = listed.path.replace('/', "");
            if !blobs.contains(&hash) && old(listed.modified) {
                remove(&self.at(&format!("blobs/{}", listed.path)))?;
                removed.blobs += 1;
                removed.bytes += listed.size;
            }
        }
        for listed in self.store.list(&self.at("trees"))? {
            let hash = listed
                .path
                .replace('/', "")
                .trim_end_matches(".json")
                .to_owned();
            if !trees.contains(&hash) && old(listed.modified) {
                remove(&self.at(&format!("trees/{}", listed.path)))?;
                removed.trees += 1;
            }
        }
        Ok(removed)
    }

    /// Takes the lease on `fingerprint` for `lease.run`: created when there is none, taken
    /// over when the one there expired, else [`Taken::Held`] with who holds it.
    pub fn take_lease(&self, fingerprint: &str, lease: &Lease) -> Result<Taken, StoreError> {
        let at = self.lease_at(fingerprint);
        let bytes = serde_json::to_vec(lease).map_err(|e| StoreError::Other(e.to_string()))?;
        let mut expired = None;
        for _ in 0..3 {
            let created = self.store.create(&at, &bytes)?;
            // Read back: a server that does not apply `If-None-Match` atomically lets two
            // creates through, and the later one is what is there.
            let held: Option<Lease> = self
                .store
                .get(&at)?
                .and_then(|b| serde_json::from_slice(&b).ok());
            if created && held.as_ref().is_none_or(|h| h.run == lease.run) {
                return Ok(match expired {
                    Some(gone) => Taken::TookOver(gone),
                    None => Taken::Mine,
                });
            }
            match held {
                Some(held) if held.run == lease.run => return Ok(Taken::Mine),
                Some(held) if !held.expired() => return Ok(Taken::Held(held)),
                // Expired (its holder was killed), or unreadable: removed, then created again
                // by whichever run gets there first.
                gone => {
                    expired = gone.or(expired);
                    self.store.delete(&at)?
                }
            }
        }
        Err(StoreError::Other(format!(
            "cannot take the lease {}: it keeps changing",
            self.url(&at)
        )))
    }

    /// Who holds the lease on `fingerprint` now, if anyone does (expired or not).
    pub fn lease(&self, fingerprint: &str) -> Result<Option<Lease>, StoreError> {
        Ok(self
            .store
            .get(&self.lease_at(fingerprint))?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Extends a lease this run holds: `false` when it is no longer this run's (another run
    /// took it over after it expired), and then it is left alone.
    pub fn renew(&self, fingerprint: &str, lease: &Lease) -> Result<bool, StoreError> {
        if self.lease(fingerprint)?.is_some_and(|l| l.run != lease.run) {
            return Ok(false);
        }
        let bytes = serde_json::to_vec(lease).map_err(|e| StoreError::Other(e.to_string()))?;
        self.store.put(&self.lease_at(fingerprint), &bytes)?;
        Ok(true)
    }

    /// Gives up the lease run `run` holds on `fingerprint` (after its entry was pushed, or the
    /// computation failed); a lease another run holds now is left alone.
    pub fn release(&self, fingerprint: &str, run: &str) -> Result<(), StoreError> {
        match self.lease(fingerprint)? {
            Some(lease) if lease.run != run => Ok(()),
            _ => self.store.delete(&self.lease_at(fingerprint)),
        }
    }
}
