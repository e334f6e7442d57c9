//! Where data lives: the [`Store`] trait and its two implementations, local files
//! ([`local::LocalStore`]) and S3 ([`s3::S3Store`]), with content hashes ([`hash`]), the
//! local-file primitives ([`fs`]) and versioned outputs ([`versions`]) beneath them.
//!
//! Everything above this layer reaches data through [`Store`]: identities for deciding, a
//! local copy for reading, an atomic commit for writing, the committed baseline of a `change`
//! check, versions, and small objects written once (the run cache's entries). Atomic commits
//! happen here and nowhere else, and nothing above matches on a location's scheme: [`Stores`]
//! routes each location to the store that holds it.

pub mod cache;
pub mod fs;
pub mod hash;
pub mod local;
pub mod remote;
pub mod s3;
pub mod versions;

use std::path::{Path, PathBuf};

use crate::model::{Declared, Location, Versioning};

pub use cache::RunCache;
pub use hash::{ContentHash, StatCache};
pub use local::LocalStore;
pub use s3::S3Store;

/// Why a store could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A local path could not be read (hashing, listing).
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An S3 request failed, was cancelled, or found a cached copy changed.
    #[error(transparent)]
    S3(#[from] s3::StorageError),
    /// Anything else, in words ready to show.
    #[error("{0}")]
    Other(String),
}

/// One staged output to commit: the finished file or folder, where it goes, and how the
/// pipeline names it (for messages).
#[derive(Clone, Copy, Debug)]
pub struct Staged<'a> {
    pub from: &'a Path,
    pub to: &'a Declared,
    pub shown: &'a str,
}

/// What a `change` check compares a new output with.
#[derive(Debug, PartialEq)]
pub enum Baseline {
    /// What imba committed there, as a local path.
    Found(PathBuf),
    /// Nothing was committed there yet.
    None,
    /// Something is there, but not what imba committed (changed by hand, or cut short): it is
    /// no baseline, or a corrupt output could never be repaired.
    Modified,
}

/// One object of a listing ([`Store::list`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Listed {
    /// Relative to the prefix listed, `/`-separated.
    pub path: String,
    pub size: u64,
    pub modified: Option<std::time::SystemTime>,
}

/// A version that `keep:` moved to `archive/` beside its versioned output.
#[derive(Clone, Debug, PartialEq)]
pub struct Archived {
    /// `NAME_vN`.
    pub name: String,
    /// When it was archived (its newest file or object).
    pub modified: Option<std::time::SystemTime>,
    pub bytes: u64,
}

/// How a versioned output was committed.
#[derive(Clone, Debug)]
pub struct Version {
    pub number: u32,
    /// The content equalled the latest version's, which stays the latest.
    pub reused: bool,
    /// The identity of the version's folder, as the lock records it.
    pub hash: ContentHash,
}

/// A place that holds data: identities, local copies, atomic commits, versions, and small
/// objects. Every method is blocking; call it from a blocking thread.
pub trait Store: Send + Sync {
    /// The identity of what is at `at` now (a BLAKE3 content hash locally, the ETag-based
    /// identity in S3), or `None` when nothing is there.
    fn identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError>;

    /// Like [`Store::identity`] for an output: a directory counts only as imba committed it
    /// (in S3, with its manifest).
    fn committed_identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        self.identity(at)
    }

    /// Looks up the identities a plan will need, ahead and at once where the store can; each
    /// `(location, as_output)`.
    fn prefetch(&self, _wanted: &[(&Declared, bool)]) {}

    /// A local path holding the content at `at`: the path itself, or a read-only cached copy.
    fn local_copy(&self, at: &Declared) -> Result<PathBuf, StoreError>;

    /// Checks that a copy from [`Store::local_copy`] still holds what it held when it was
    /// handed out (a stage must not change its inputs).
    fn verify_copy(&self, _at: &Declared, _copy: &Path) -> Result<(), StoreError> {
        Ok(())
    }

    /// Moves each staged output into place, each atomically, and returns their identities in
    /// order. A failure leaves what it could not commit as it was.
    fn commit(&self, outputs: &[Staged], run: &str) -> Result<Vec<ContentHash>, StoreError>;

    /// The committed content at `at` that a `change` check compares with; `recorded` is the
    /// hash the lock file holds for it.
    fn baseline(&self, at: &Declared, recorded: Option<&str>) -> Baseline;

    /// Commits the staged folder as a version under `at`: the latest again when the content is
    /// the same, else a new one.
    fn commit_version(
        &self,
        staged: Staged,
        versioning: &Versioning,
        meta: versions::MetaInput,
        run: &str,
    ) -> Result<Version, StoreError>;

    /// The identity of a versioned output as the lock records it: its latest version's.
    fn version_identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError>;

    /// The latest version of a versioned output, as a local path (a `change` check's baseline).
    fn latest_version(&self, at: &Declared) -> Option<PathBuf>;

    /// The bytes of a small object, `None` when absent.
    fn get(&self, at: &Location) -> Result<Option<Vec<u8>>, StoreError>;

    /// Writes a small object whole, replacing what was there atomically.
    fn put(&self, at: &Location, bytes: &[u8]) -> Result<(), StoreError>;

    /// Writes a small object only if nothing is there: `true` when this call created it. Of two
    /// callers creating the same object at once, exactly one gets `true`.
    fn create(&self, at: &Location, bytes: &[u8]) -> Result<bool, StoreError>;

    /// Copies the local file `from` to the object `at` whole (a blob of a remote run cache).
    /// The default reads it into memory and [`Store::put`]s it.
    fn send(&self, from: &Path, at: &Location) -> Result<(), StoreError> {
        let bytes = std::fs::read(from).map_err(|source| StoreError::Read {
            path: from.to_path_buf(),
            source,
        })?;
        self.put(at, &bytes)
    }

    /// Copies the object `at` into the local file `to`, giving the BLAKE3 and size of what was
    /// written; `None` when nothing is at `at`. The default [`Store::get`]s it whole.
    fn receive(&self, at: &Location, to: &Path) -> Result<Option<(String, u64)>, StoreError> {
        let Some(bytes) = self.get(at)? else {
            return Ok(None);
        };
        std::fs::write(to, &bytes)
            .map_err(|e| StoreError::Other(format!("cannot write {}: {e}", to.display())))?;
        Ok(Some((
            blake3::hash(&bytes).to_hex().to_string(),
            bytes.len() as u64,
        )))
    }

    /// Whether an object is at `at`. The default reads it.
    fn exists(&self, at: &Location) -> Result<bool, StoreError> {
        Ok(self.get(at)?.is_some())
    }

    /// Removes the object at `at`; nothing there is fine.
    fn delete(&self, at: &Location) -> Result<(), StoreError> {
        Err(StoreError::Other(format!(
            "this store cannot delete `{}`",
            at.sort_key()
        )))
    }

    /// Every object under the prefix `at`, at any depth, sorted by path (a remote run
    /// cache's housekeeping).
    fn list(&self, at: &Location) -> Result<Vec<Listed>, StoreError> {
        Err(StoreError::Other(format!(
            "this store cannot list `{}`",
            at.sort_key()
        )))
    }

    /// The versions of the versioned output `at` that `keep:` archived, oldest first.
    fn archived(&self, _at: &Declared) -> Result<Vec<Archived>, StoreError> {
        Ok(Vec::new())
    }

    /// Removes the archived version `name` of the versioned output `at` (never one in place).
    fn remove_archived(&self, at: &Declared, name: &str) -> Result<(), StoreError> {
        Err(StoreError::Other(format!(
            "this store cannot remove `{name}` of `{}`",
            at.location.sort_key()
        )))
    }

    /// Keeps what the store learnt for next time (the stat cache of local hashes).
    fn save(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An error naming the first staged output that is not there.
fn all_written(outputs: &[Staged]) -> Result<(), StoreError> {
    match outputs.iter().find(|s| s.from.symlink_metadata().is_err()) {
        Some(missing) => Err(StoreError::Other(format!(
            "stage did not write its output `{}`",
            missing.shown
        ))),
        None => Ok(()),
    }
}

/// Both stores behind one [`Store`]: each location goes to the store of its scheme.
pub struct Stores {
    pub local: LocalStore,
    pub s3: S3Store,
}

impl Stores {
    /// Local files under `workdir` (hashed through `cache`) and S3 through `storage`.
    pub fn new(workdir: &Path, cache: StatCache, storage: s3::Storage) -> Self {
        Stores {
            local: LocalStore::new(workdir, cache),
            s3: S3Store::new(storage),
        }
    }

    fn of(&self, at: &Location) -> &dyn Store {
        match at {
            Location::Local(_) => &self.local,
            Location::S3 { .. } => &self.s3,
        }
    }
}

impl Store for Stores {
    fn identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        self.of(&at.location).identity(at)
    }

    fn committed_identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        self.of(&at.location).committed_identity(at)
    }

    /// Only remote identities are worth looking up ahead; the S3 store skips the rest.
    fn prefetch(&self, wanted: &[(&Declared, bool)]) {
        self.s3.prefetch(wanted);
    }

    fn local_copy(&self, at: &Declared) -> Result<PathBuf, StoreError> {
        self.of(&at.location).local_copy(at)
    }

    fn verify_copy(&self, at: &Declared, copy: &Path) -> Result<(), StoreError> {
        self.of(&at.location).verify_copy(at, copy)
    }

    /// Remote outputs first: uploading is what fails most, and a failure there leaves every
    /// output, local or not, as it was. An output that was not written fails the commit before
    /// anything moves.
    fn commit(&self, outputs: &[Staged], run: &str) -> Result<Vec<ContentHash>, StoreError> {
        all_written(outputs)?;
        let mut hashes: Vec<Option<ContentHash>> = vec![None; outputs.len()];
        for remote in [true, false] {
            let (indices, part): (Vec<usize>, Vec<Staged>) = outputs
                .iter()
                .enumerate()
                .filter(|(_, s)| s.to.location.is_remote() == remote)
                .map(|(i, s)| (i, *s))
                .unzip();
            if part.is_empty() {
                continue;
            }
            // Every output was checked above: the S3 store need not look again.
            let committed = if remote {
                self.s3.upload(&part, run)?
            } else {
                self.local.commit(&part, run)?
            };
            for (i, hash) in indices.into_iter().zip(committed) {
                hashes[i] = Some(hash);
            }
        }
        Ok(hashes.into_iter().flatten().collect())
    }

    fn baseline(&self, at: &Declared, recorded: Option<&str>) -> Baseline {
        self.of(&at.location).baseline(at, recorded)
    }

    fn commit_version(
        &self,
        staged: Staged,
        versioning: &Versioning,
        meta: versions::MetaInput,
        run: &str,
    ) -> Result<Version, StoreError> {
        self.of(&staged.to.location)
            .commit_version(staged, versioning, meta, run)
    }

    fn version_identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        self.of(&at.location).version_identity(at)
    }

    fn latest_version(&self, at: &Declared) -> Option<PathBuf> {
        self.of(&at.location).latest_version(at)
    }

    fn get(&self, at: &Location) -> Result<Option<Vec<u8>>, StoreError> {
        self.of(at).get(at)
    }

    fn put(&self, at: &Location, bytes: &[u8]) -> Result<(), StoreError> {
        self.of(at).put(at, bytes)
    }

    fn create(&self, at: &Location, bytes: &[u8]) -> Result<bool, StoreError> {
        self.of(at).create(at, bytes)
    }

    fn send(&self, from: &Path, at: &Location) -> Result<(), StoreError> {
        self.of(at).send(from, at)
    }

    fn receive(&self, at: &Location, to: &Path) -> Result<Option<(String, u64)>, StoreError> {
        self.of(at).receive(at, to)
    }

    fn exists(&self, at: &Location) -> Result<bool, StoreError> {
        self.of(at).exists(at)
    }

    fn archived(&self, at: &Declared) -> Result<Vec<Archived>, StoreError> {
        self.of(&at.location).archived(at)
    }

    fn remove_archived(&self, at: &Declared, name: &str) -> Result<(), StoreError> {
        self.of(&at.location).remove_archived(at, name)
    }

    fn delete(&self, at: &Location) -> Result<(), StoreError> {
        self.of(at).delete(at)
    }

    fn list(&self, at: &Location) -> Result<Vec<Listed>, StoreError> {
        self.of(at).list(at)
    }

    fn save(&self) -> std::io::Result<()> {
        self.local.save()
    }
}
