//! The run cache outside a run: `imba gc` (keep what the lock files still refer to) and
//! `imba push` (send what they refer to to the remote a team shares).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::state::lock;
use crate::state::StateDir;
use crate::store::cache::{Removed, RunCache};
use crate::store::Store;

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
    let _held = hold(&state, &warn)?;
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
    let store = crate::plan::stores(pipeline);
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

/// The workdir's run lock, waiting (and saying so) while a run holds it: what the run cache
/// and quarantine are changed under, so that nothing a run is writing goes.
fn hold(state: &StateDir, warn: &impl Fn(String)) -> Result<crate::state::RunLock, String> {
    state
        .lock(true, |pid| {
            let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            warn(format!(
                "waiting for another imba run{who} of this workdir to finish…"
            ))
        })
        .map_err(|e| format!("cannot lock {}: {e}", state.root.display()))?
        .ok_or_else(|| format!("cannot lock {}", state.root.display()))
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
    let store = crate::plan::stores(pipeline);
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
    let _held = hold(&state, &warn)?;
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
        remove_if_older(&run, cutoff, dry_run, &mut released)?;
    }
    Ok(released)
}

/// Why `imba accept` refused.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The run, the stage or its quarantine is not what the person named, or the stage changed
    /// since: theirs to look at again.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// Commits the outputs that checks kept in quarantine in run `run` (an id or a unique prefix)
/// for stage `stage`, after a person looked at them, with their `reason` in the run record.
/// Only while the stage is as it was then (the same fingerprint: definition and inputs);
/// the outputs go through the store's commit (atomic renames, S3 commits, versions) and the
/// lock file through the journal, as a run's do. Gives the committed outputs.
pub fn accept(
    dag: &crate::graph::Dag,
    run: &str,
    stage: &str,
    reason: &str,
    warn: impl Fn(String),
) -> Result<std::collections::BTreeMap<String, crate::store::ContentHash>, AcceptError> {
    use crate::store::{Staged, Store};
    let refused = AcceptError::Refused;
    let failed = |e: String| AcceptError::Failed(e);
    let pipeline = dag.pipeline();
    let workdir = &pipeline.workdir;
    let state = StateDir::new(workdir);
    let _held = hold(&state, &warn).map_err(failed)?;
    let shown = pipeline.file.display().to_string();
    let mut records: Vec<crate::state::record::RunRecord> =
        crate::state::record::list(&state.runs())
            .into_iter()
            .filter(|r| r.pipeline == shown && r.id.starts_with(run))
            .collect();
    let mut record = match records.len() {
        1 => records.remove(0),
        0 => {
            return Err(refused(format!(
                "no run of this pipeline has an id starting with `{run}`"
            )))
        }
        n => {
            return Err(refused(format!(
                "`{run}` matches {n} runs; give more of the id"
            )))
        }
    };
    let position = record
        .stages
        .iter()
        .position(|s| s.name == stage)
        .ok_or_else(|| refused(format!("run {} has no stage `{stage}`", record.id)))?;
    let folder = record.stages[position]
        .quarantine
        .clone()
        .map(PathBuf::from)
        .filter(|f| f.is_dir())
        .ok_or_else(|| {
            refused(format!(
                "stage `{stage}` of run {} holds nothing in quarantine (`imba quarantine` lists what is held)",
                record.id
            ))
        })?;
    let index = dag
        .order()
        .iter()
        .copied()
        .find(|&i| dag.stage(i).name == stage)
        .ok_or_else(|| refused(format!("the pipeline has no stage `{stage}` any more")))?;
    let definition = dag.stage(index);
    let store = crate::plan::stores(pipeline);
    let now =
        crate::plan::snapshot(definition, workdir, &store).map_err(|e| failed(e.to_string()))?;
    if record.stages[position].fingerprint.as_deref() != Some(now.fingerprint.as_str()) {
        return Err(refused(format!(
            "stage `{stage}` changed since run {} (its definition or its inputs): what is in quarantine is not what it would make now; `imba run` computes it again, and its checks decide",
            record.id
        )));
    }
    let paths: Vec<PathBuf> = definition
        .outputs
        .iter()
        .enumerate()
        .map(|(i, port)| super::gate::quarantine_path(port, i, workdir, &folder))
        .collect();
    if let Some((port, _)) = definition
        .outputs
        .iter()
        .zip(&paths)
        .find(|(_, p)| p.symlink_metadata().is_err())
    {
        return Err(refused(format!(
            "the quarantine of stage `{stage}` has no `{}`: it cannot be committed whole",
            port.text
        )));
    }
    let outputs: std::collections::BTreeMap<String, crate::store::ContentHash> =
        match (&definition.versioning, definition.outputs.as_slice()) {
            (Some(versioning), [port]) => {
                let meta = crate::store::versions::MetaInput {
                    pipeline: shown.clone(),
                    stage: stage.to_owned(),
                    fingerprint: now.fingerprint.clone(),
                    inputs: serde_json::to_value(&now.entry.inputs)
                        .unwrap_or(serde_json::Value::Null),
                    params: now.entry.params.clone(),
                    report: record.stages[position]
                        .report
                        .as_ref()
                        .and_then(|r| r.get("summary").cloned())
                        .unwrap_or(serde_json::Value::Null),
                    workdir: workdir.clone(),
                    vars: serde_json::Value::Object(record.vars.clone()),
                    restored: None,
                };
                let staged = Staged {
                    from: &paths[0],
                    to: &port.declared,
                    shown: &port.text,
                };
                let version = store
                    .commit_version(staged, versioning, meta, &record.id)
                    .map_err(|e| failed(e.to_string()))?;
                std::collections::BTreeMap::from([(
                    port.declared.location.display(workdir),
                    version.hash,
                )])
            }
            _ => {
                let staged: Vec<Staged> = definition
                    .outputs
                    .iter()
                    .zip(&paths)
                    .map(|(port, from)| Staged {
                        from,
                        to: &port.declared,
                        shown: &port.text,
                    })
                    .collect();
                let hashes = store
                    .commit(&staged, &record.id)
                    .map_err(|e| failed(e.to_string()))?;
                definition
                    .outputs
                    .iter()
                    .map(|port| port.declared.location.display(workdir))
                    .zip(hashes)
                    .collect()
            }
        };
    // The lock, through the journal as a run writes it.
    let lock_path = lock::lock_path(&pipeline.file);
    let mut locked = lock::load_for_run(&lock_path, &state, &warn).map_err(refused)?;
    let mut journal = lock::Journal::open(&lock::journal_path(&state.root, &lock_path))
        .map_err(|e| failed(format!("cannot open the run journal: {e}")))?;
    let mut entry = now.entry;
    entry.outputs = outputs.clone();
    journal
        .append(stage, &entry)
        .map_err(|e| failed(format!("cannot write the run journal: {e}")))?;
    locked.stages.insert(stage.to_owned(), entry);
    journal.checkpoint(&lock_path, &locked).map_err(|e| {
        failed(format!(
            "cannot write the lock file {} ({e}); the journal keeps the commit",
            lock_path.display()
        ))
    })?;
    let _ = store.save();
    let _ = std::fs::remove_dir_all(&folder);
    let stage_record = &mut record.stages[position];
    stage_record.accepted = Some(crate::state::record::Accepted::now(reason));
    stage_record.outputs = outputs.clone();
    stage_record.quarantine = None;
    crate::state::record::save(&state.runs(), &record)
        .map_err(|e| failed(format!("cannot update the run record: {e}")))?;
    Ok(outputs)
}

/// Removes the archived versions (`archive/NAME_vN/`, moved there by `keep:`) of the versioned
/// outputs of `dag`, local or in S3, that are older than `older_than` (all of them without it),
/// under the workdir's run lock. A version in place is never removed. An S3 version's age is
/// that of its newest object (when it was archived).
pub fn collect_archive(
    dag: &crate::graph::Dag,
    older_than: Option<Duration>,
    dry_run: bool,
    warn: impl Fn(String),
) -> Result<Released, String> {
    let pipeline = dag.pipeline();
    let state = StateDir::new(&pipeline.workdir);
    let _held = hold(&state, &warn)?;
    let cutoff = older_than.and_then(|d| SystemTime::now().checked_sub(d));
    let store = crate::plan::stores(pipeline);
    let mut released = Released::default();
    for &index in dag.order() {
        let stage = dag.stage(index);
        let (Some(_), [port]) = (&stage.versioning, stage.outputs.as_slice()) else {
            continue;
        };
        let at = &port.declared;
        let shown = at.location.display(&pipeline.workdir);
        let archived = store
            .archived(at)
            .map_err(|e| format!("cannot list the archive of `{shown}`: {e}"))?;
        for version in archived {
            let old = match (cutoff, version.modified) {
                (None, _) => true,
                (Some(cutoff), Some(modified)) => modified < cutoff,
                (Some(_), None) => false,
            };
            if !old {
                continue;
            }
            if !dry_run {
                store
                    .remove_archived(at, &version.name)
                    .map_err(|e| format!("cannot remove `{}` of `{shown}`: {e}", version.name))?;
            }
            released.runs += 1;
            released.bytes += version.bytes;
        }
    }
    Ok(released)
}

/// Removes the folder `dir` when it was last changed before `cutoff` (always without one),
/// counting it into `released`; with `dry_run`, only counts.
fn remove_if_older(
    dir: &Path,
    cutoff: Option<SystemTime>,
    dry_run: bool,
    released: &mut Released,
) -> Result<(), String> {
    let modified = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
    let old = match (cutoff, modified) {
        (None, _) => true,
        (Some(cutoff), Some(modified)) => modified < cutoff,
        (Some(_), None) => false,
    };
    if !old {
        return Ok(());
    }
    let bytes = crate::store::fs::size_of(dir);
    if !dry_run {
        std::fs::remove_dir_all(dir)
            .map_err(|e| format!("cannot remove {}: {e}", dir.display()))?;
    }
    released.runs += 1;
    released.bytes += bytes;
    Ok(())
}
