//! The run cache outside a run: `imba gc` (keep what the lock files still refer to) and
//! `imba push` (send what they refer to to the remote a team shares).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::state::lock;
use crate::state::StateDir;
use crate::store::cache::{Removed, RunCache};

/// What to keep in a collection.
#[derive(Clone, Debug, Default)]
pub struct Keep {
    /// Lock files whose stages' fingerprints stay.
    pub locks: Vec<PathBuf>,
    /// Entries used within this long stay too.
    pub used_within: Option<Duration>,
}

/// How long an unreferenced remote blob is kept anyway: another machine may be pushing it, its
/// entry not written yet.
pub const REMOTE_GRACE: Duration = Duration::from_secs(3600);

/// Removes from the run cache of `workdir` every entry that none of `keep.locks` refers to
/// (and that was not used within `keep.used_within`), then the blobs no entry refers to. Waits
/// for a run of the workdir to finish first, so that nothing a run is writing goes.
pub fn gc(
    workdir: &Path,
    keep: &Keep,
    dry_run: bool,
    warn: impl Fn(String),
) -> Result<Removed, String> {
    let (fingerprints, since) = kept(workdir, keep, &warn)?;
    let state = StateDir::new(workdir);
    let _held = state
        .lock(true, |pid| {
            let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            warn(format!(
                "waiting for another imba run{who} of this workdir to finish…"
            ))
        })
        .map_err(|e| format!("cannot lock {}: {e}", state.root.display()))?;
    let cache = RunCache::new(state.cache());
    Ok(cache.collect(
        |entry, used| {
            fingerprints.contains(&entry.fingerprint)
                || matches!((since, used), (Some(since), Some(used)) if used >= since)
        },
        dry_run,
    ))
}

/// [`gc`] on a remote run cache: entries pushed within `keep.used_within` stay too (a remote
/// entry's time is when it was last pushed), and unreferenced objects younger than
/// [`REMOTE_GRACE`] are left.
pub fn gc_remote(
    pipeline: &crate::model::Pipeline,
    remote: crate::model::Location,
    keep: &Keep,
    dry_run: bool,
    warn: impl Fn(String),
) -> Result<(String, Removed), String> {
    let (fingerprints, since) = kept(&pipeline.workdir, keep, &warn)?;
    let state = StateDir::new(&pipeline.workdir);
    let cache = RunCache::new(state.cache());
    let store = stores(pipeline, &state);
    let remote = crate::store::remote::Remote::new(&store, remote, &cache);
    let url = remote.root_url();
    let failed =
        |e: crate::store::StoreError| format!("cannot collect the remote run cache {url}: {e}");
    remote.probe().map_err(failed)?;
    let removed = remote
        .collect(
            |entry, used| {
                fingerprints.contains(&entry.fingerprint)
                    || matches!((since, used), (Some(since), Some(used)) if used >= since)
            },
            REMOTE_GRACE,
            dry_run,
        )
        .map_err(failed)?;
    Ok((url, removed))
}

/// The fingerprints the lock files refer to, and the time after which a use keeps an entry.
fn kept(
    workdir: &Path,
    keep: &Keep,
    warn: &impl Fn(String),
) -> Result<(BTreeSet<String>, Option<SystemTime>), String> {
    let state = StateDir::new(workdir);
    let mut fingerprints = BTreeSet::new();
    for path in &keep.locks {
        let locked = lock::load_for_run(path, &state, warn)?;
        fingerprints.extend(locked.stages.into_values().map(|s| s.fingerprint));
    }
    let since = keep
        .used_within
        .and_then(|d| SystemTime::now().checked_sub(d));
    Ok((fingerprints, since))
}

/// What `imba push` sent.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Pushed {
    pub moved: crate::store::remote::Moved,
    /// Stages of the lock file whose entry is not in the local cache (computed before the
    /// cache existed, or collected): named, nothing sent.
    pub not_cached: Vec<String>,
    pub remote: String,
}

/// Sends to `remote` the run-cache entries (and their blobs) that the lock file of `pipeline`
/// refers to, or with `all` every entry of the local cache; only what the remote lacks moves.
pub fn push(
    pipeline: &crate::model::Pipeline,
    remote: crate::model::Location,
    all: bool,
    progress: crate::store::remote::Progress,
    warn: impl Fn(String),
) -> Result<Pushed, String> {
    let state = StateDir::new(&pipeline.workdir);
    let cache = RunCache::new(state.cache());
    let store = stores(pipeline, &state);
    let remote = crate::store::remote::Remote::new(&store, remote, &cache);
    let mut pushed = Pushed {
        remote: remote.root_url(),
        ..Pushed::default()
    };
    remote.probe().map_err(|e| {
        format!(
            "cannot push to the remote run cache {}: {e}",
            remote.root_url()
        )
    })?;
    let entries: Vec<crate::store::cache::Entry> = if all {
        cache.entries().into_iter().map(|(e, _)| e).collect()
    } else {
        let locked = lock::load_for_run(&lock::lock_path(&pipeline.file), &state, &warn)?;
        let mut entries = Vec::new();
        for (stage, locked) in locked.stages {
            match cache.entry(&locked.fingerprint) {
                Some(entry) => entries.push(entry),
                None => pushed.not_cached.push(stage),
            }
        }
        entries
    };
    for entry in &entries {
        let moved = remote.push(entry, progress).map_err(|e| {
            format!(
                "cannot push to the remote run cache {}: {e}",
                remote.root_url()
            )
        })?;
        pushed.moved.add(&moved);
    }
    Ok(pushed)
}

/// The stores a command outside a run reads and writes through.
fn stores(pipeline: &crate::model::Pipeline, state: &StateDir) -> crate::store::Stores {
    let storage = crate::store::s3::Storage::new(pipeline.storage.clone(), state.cache());
    let cache = if state.root.is_dir() {
        crate::store::StatCache::load(state.stat_cache())
    } else {
        crate::store::StatCache::in_memory()
    };
    crate::store::Stores::new(&pipeline.workdir, cache, storage)
}

/// What `imba gc --quarantine` removed: runs' quarantine folders, and their bytes.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Released {
    pub runs: u64,
    pub bytes: u64,
}

/// Removes the quarantine folders (`.imba/quarantine/RUN/`) of `workdir` older than
/// `older_than` (all of them without it), under the workdir's run lock.
pub fn collect_quarantine(
    workdir: &Path,
    older_than: Option<Duration>,
    dry_run: bool,
    warn: impl Fn(String),
) -> Result<Released, String> {
    let state = StateDir::new(workdir);
    let root = state.root.join("quarantine");
    if !root.is_dir() {
        return Ok(Released::default());
    }
    let _held = state
        .lock(true, |pid| {
            let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            warn(format!(
                "waiting for another imba run{who} of this workdir to finish…"
            ))
        })
        .map_err(|e| format!("cannot lock {}: {e}", state.root.display()))?;
    let cutoff = older_than.and_then(|d| SystemTime::now().checked_sub(d));
    let mut released = Released::default();
    let mut runs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| format!("cannot read {}: {e}", root.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    runs.sort();
    for run in runs {
        let modified = std::fs::metadata(&run).and_then(|m| m.modified()).ok();
        let old = match (cutoff, modified) {
            (None, _) => true,
            (Some(cutoff), Some(modified)) => modified < cutoff,
            (Some(_), None) => false,
        };
        if !old {
            continue;
        }
        let bytes: u64 = walkdir::WalkDir::new(&run)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        if !dry_run {
            std::fs::remove_dir_all(&run)
                .map_err(|e| format!("cannot remove {}: {e}", run.display()))?;
        }
        released.runs += 1;
        released.bytes += bytes;
    }
    Ok(released)
}
