//! The local file system as a [`Store`]: identities from the stat cache, commits by rename.

use std::path::{Path, PathBuf};

use super::hash::{ContentHash, StatCache};
use super::{versions, Baseline, Staged, Store, StoreError, Version};
use crate::model::{Declared, Location, Versioning};

/// Local files under (or, when declared so, outside) a workdir.
pub struct LocalStore {
    workdir: PathBuf,
    cache: StatCache,
}

impl LocalStore {
    /// `cache` remembers file hashes by size, times and inode, so an unchanged file is not read
    /// again; [`Store::save`] writes it back.
    pub fn new(workdir: &Path, cache: StatCache) -> Self {
        LocalStore {
            workdir: workdir.to_path_buf(),
            cache,
        }
    }
}

fn path_of(at: &Location) -> Result<&Path, StoreError> {
    at.local_path()
        .ok_or_else(|| StoreError::Other(format!("`{}` is not a local path", at.sort_key())))
}

fn confined(target: &Path, workdir: &Path, shown: &str) -> Result<(), StoreError> {
    crate::config::confine::check_target(target, workdir)
        .map_err(|e| StoreError::Other(format!("output `{shown}`: {e}")))
}

impl Store for LocalStore {
    fn identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        let path = path_of(&at.location)?;
        self.cache
            .hash_path(path)
            .map_err(|source| StoreError::Read {
                path: path.to_path_buf(),
                source,
            })
    }

    fn local_copy(&self, at: &Declared) -> Result<PathBuf, StoreError> {
        path_of(&at.location).map(Path::to_path_buf)
    }

    /// Every output is hashed and checked before the first is moved: a missing or unreadable
    /// one, or one whose target would leave the workdir, leaves every output as it was.
    fn commit(&self, outputs: &[Staged], _run: &str) -> Result<Vec<ContentHash>, StoreError> {
        let staging_cache = StatCache::in_memory();
        let mut hashes = Vec::with_capacity(outputs.len());
        for staged in outputs {
            let hash = staging_cache
                .hash_path(staged.from)
                .map_err(|e| {
                    StoreError::Other(format!("cannot hash the output `{}`: {e}", staged.shown))
                })?
                .ok_or_else(|| {
                    StoreError::Other(format!("stage did not write its output `{}`", staged.shown))
                })?;
            hashes.push(hash);
        }
        let mut targets = Vec::with_capacity(outputs.len());
        for staged in outputs {
            let target = path_of(&staged.to.location)?;
            confined(target, &self.workdir, staged.shown)?;
            targets.push(target);
        }
        for (staged, target) in outputs.iter().zip(&targets) {
            if staged.from == *target {
                // Written in place by its command: it is where it goes.
                continue;
            }
            tracing::trace!(from = %staged.from.display(), to = %target.display(), "commit");
            super::fs::replace(staged.from, target).map_err(|e| {
                StoreError::Other(format!(
                    "cannot move the output `{}` into place at {}: {e}",
                    staged.shown,
                    target.display()
                ))
            })?;
        }
        for ((staged, target), hash) in outputs.iter().zip(&targets).zip(&hashes) {
            if hash.files.is_none() {
                self.cache.record(target, &hash.hash);
            }
            // The files of a directory were hashed under their staging paths: remember them
            // under the paths they have now, so the next status does not read them again.
            for (relative, hash) in staging_cache.hashes_under(staged.from) {
                self.cache.record(&target.join(relative), &hash);
            }
        }
        Ok(hashes)
    }

    fn baseline(&self, at: &Declared, recorded: Option<&str>) -> Baseline {
        let Ok(path) = path_of(&at.location) else {
            return Baseline::None;
        };
        let now = self.cache.hash_path(path).ok().flatten().map(|h| h.hash);
        match (recorded, now) {
            (Some(recorded), Some(now)) if recorded != now => Baseline::Modified,
            (_, None) => Baseline::None,
            _ => Baseline::Found(path.to_path_buf()),
        }
    }

    fn commit_version(
        &self,
        staged: Staged,
        versioning: &Versioning,
        meta: versions::MetaInput,
        _run: &str,
    ) -> Result<Version, StoreError> {
        let root = path_of(&staged.to.location)?;
        confined(root, &self.workdir, staged.shown)?;
        let committed = versions::commit(staged.from, root, versioning, meta)
            .map_err(|e| StoreError::Other(format!("output `{}`: {e}", staged.shown)))?;
        let hash = self
            .cache
            .hash_path(&committed.dir)
            .map_err(|e| {
                StoreError::Other(format!("cannot hash {}: {e}", committed.dir.display()))
            })?
            .ok_or_else(|| {
                StoreError::Other(format!("version {} is gone", committed.dir.display()))
            })?;
        Ok(Version {
            number: committed.version,
            reused: committed.reused,
            hash,
        })
    }

    fn archived(&self, at: &Declared) -> Result<Vec<super::Archived>, StoreError> {
        let root = path_of(&at.location)?;
        let archive = versions::archive_dir(root);
        Ok(versions::list_in(&archive, &versions::base_name(root))
            .into_iter()
            .map(|(_, dir)| super::Archived {
                name: dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                modified: std::fs::metadata(&dir).and_then(|m| m.modified()).ok(),
                bytes: super::fs::size_of(&dir),
            })
            .collect())
    }

    fn remove_archived(&self, at: &Declared, name: &str) -> Result<(), StoreError> {
        let root = path_of(&at.location)?;
        if versions::parse_version(name, &versions::base_name(root)).is_none() {
            return Err(StoreError::Other(format!(
                "`{name}` is not a version of `{}`",
                root.display()
            )));
        }
        let dir = versions::archive_dir(root).join(name);
        std::fs::remove_dir_all(&dir)
            .map_err(|e| StoreError::Other(format!("cannot remove {}: {e}", dir.display())))
    }

    fn version_identity(&self, at: &Declared) -> Result<Option<ContentHash>, StoreError> {
        let root = path_of(&at.location)?;
        versions::current_hash(root, &self.cache).map_err(|source| StoreError::Read {
            path: root.to_path_buf(),
            source,
        })
    }

    fn latest_version(&self, at: &Declared) -> Option<PathBuf> {
        versions::latest(path_of(&at.location).ok()?).map(|(_, dir)| dir)
    }

    fn get(&self, at: &Location) -> Result<Option<Vec<u8>>, StoreError> {
        let path = path_of(at)?;
        let read = || -> std::io::Result<Vec<u8>> {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut imba_stages::safe::open_file(path)?, &mut bytes)?;
            Ok(bytes)
        };
        match read() {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn put(&self, at: &Location, bytes: &[u8]) -> Result<(), StoreError> {
        let path = path_of(at)?;
        super::fs::write_atomic(path, bytes).map_err(|e| written(path, e))
    }

    fn save(&self) -> std::io::Result<()> {
        self.cache.save()
    }

    fn create(&self, at: &Location, bytes: &[u8]) -> Result<bool, StoreError> {
        let path = path_of(at)?;
        super::fs::create_new(path, bytes).map_err(|e| written(path, e))
    }

    /// A copy beside the target, then a rename: a reader never sees half a file.
    fn send(&self, from: &Path, at: &Location) -> Result<(), StoreError> {
        let path = path_of(at)?;
        let parent = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| written(path, e))?;
        // Unique per process and call: two stages sending the same blob never share it.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = parent.join(format!(
            ".{}.imba-send-{}-{call}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let copied = reflink_copy::reflink_or_copy(from, &tmp)
            .map(|_| ())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(written(path, e));
        }
        Ok(())
    }

    fn receive(&self, at: &Location, to: &Path) -> Result<Option<(String, u64)>, StoreError> {
        let path = path_of(at)?;
        if !path.is_file() {
            return Ok(None);
        }
        super::cache::copy_hashing(path, to)
            .map(Some)
            .map_err(|source| StoreError::Read {
                path: path.to_path_buf(),
                source,
            })
    }

    fn exists(&self, at: &Location) -> Result<bool, StoreError> {
        Ok(path_of(at)?.is_file())
    }

    fn list(&self, at: &Location) -> Result<Vec<super::Listed>, StoreError> {
        let root = path_of(at)?;
        let mut listed = Vec::new();
        // Through symbolic links too: a month's folder may be a link to where it landed.
        for entry in walkdir::WalkDir::new(root)
            .follow_links(true)
            .sort_by_file_name()
        {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if e.io_error().map(|e| e.kind()) == Some(std::io::ErrorKind::NotFound) => {
                    continue
                }
                Err(e) => {
                    return Err(StoreError::Other(format!(
                        "cannot list {}: {e}",
                        root.display()
                    )))
                }
            };
            if !entry.file_type().is_file() {
                continue;
            }
            let meta = entry.metadata().ok();
            listed.push(super::Listed {
                path: entry
                    .path()
                    .strip_prefix(root)
                    .unwrap_or(entry.path())
                    .to_string_lossy()
                    .replace('\\', "/"),
                size: meta.as_ref().map_or(0, |m| m.len()),
                modified: meta.and_then(|m| m.modified().ok()),
            });
        }
        Ok(listed)
    }

    fn delete(&self, at: &Location) -> Result<(), StoreError> {
        let path = path_of(at)?;
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Other(format!(
                "cannot remove {}: {e}",
                path.display()
            ))),
        }
    }
}

fn written(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Other(format!("cannot write {}: {e}", path.display()))
}
