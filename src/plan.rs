//! Why each stage must run, or why it may be skipped: fingerprints compared with the lock file.
//!
//! A stage is up to date when its fingerprint (kind, implementation version, params, command,
//! declared outputs and the content hashes of its inputs) matches its lock entry and every output
//! is present with the recorded hash. Otherwise each difference becomes a [`Reason`], which
//! `status`, `run --dry-run`, the run records and `watch` all print the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::config::{Stage, StageKind};
use crate::dag::Dag;
use crate::hash::{ContentHash, StatCache};
use crate::location::Location;
use crate::lock::{fingerprint, LockFile, LockedStage};

/// Why a stage runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    NeverRun,
    Forced,
    KindChanged { from: String, to: String },
    ImplementationChanged { stage: String, from: u32, to: u32 },
    CommandChanged,
    ChecksChanged,
    ParamChanged { key: String, old: Json, new: Json },
    InputChanged { path: String },
    InputAdded { path: String },
    InputRemoved { path: String },
    InputMissing { path: String },
    OutputsChanged,
    OutputMissing { path: String },
    OutputModified { path: String },
    Upstream { stage: String },
}

fn show(value: &Json) -> String {
    match value {
        Json::Null => "(unset)".to_owned(),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NeverRun => write!(f, "never run"),
            Reason::Forced => write!(f, "forced"),
            Reason::KindChanged { from, to } => write!(f, "stage kind changed: {from} → {to}"),
            Reason::ImplementationChanged { stage, from, to } => {
                write!(f, "implementation of {stage} changed: {from} → {to}")
            }
            Reason::CommandChanged => write!(f, "command changed"),
            Reason::ChecksChanged => write!(f, "checks changed"),
            Reason::ParamChanged { key, old, new } => {
                write!(f, "param {key} changed: {} → {}", show(old), show(new))
            }
            Reason::InputChanged { path } => write!(f, "input {path} changed"),
            Reason::InputAdded { path } => write!(f, "input {path} added"),
            Reason::InputRemoved { path } => write!(f, "input {path} removed"),
            Reason::InputMissing { path } => write!(f, "input {path} is missing"),
            Reason::OutputsChanged => write!(f, "declared outputs changed"),
            Reason::OutputMissing { path } => write!(f, "output {path} is missing"),
            Reason::OutputModified { path } => write!(f, "output {path} was modified"),
            Reason::Upstream { stage } => write!(f, "upstream {stage} is stale"),
        }
    }
}

/// An I/O failure while hashing, with the path it happened on.
#[derive(Debug)]
pub struct HashError {
    pub path: String,
    pub source: std::io::Error,
}

impl fmt::Display for HashError {
    /// "cannot read `path`: why", or, for what imba does not read at all, "`path` is a FIFO …".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(not) = imba_stages::safe::NotAFile::of(&self.source) {
            return write!(f, "`{}` {not}", self.path);
        }
        if let Some(inner) = crate::hash::NotAFileInDir::of(&self.source) {
            return write!(
                f,
                "`{}/{}` {}",
                self.path,
                inner.relative.to_string_lossy(),
                inner.not
            );
        }
        write!(f, "cannot read `{}`: {}", self.path, self.source)
    }
}

impl std::error::Error for HashError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// What a stage's fingerprint covers, as it is now.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub fingerprint: String,
    /// A lock entry without outputs.
    pub entry: LockedStage,
}

/// Where content hashes come from: the stat cache for local files, HEAD and LIST for S3.
#[derive(Clone, Copy)]
pub struct Hashes<'a> {
    pub cache: &'a StatCache,
    pub storage: &'a crate::storage::Storage,
}

/// Hashes a location as shown in the lock file (relative to `workdir`). An S3 object's hash is
/// its identity (ETag, size, version), a prefix's that of its listing.
pub fn hash_location(
    hashes: Hashes,
    location: &Location,
    dir: bool,
    workdir: &Path,
) -> Result<Option<ContentHash>, HashError> {
    match location {
        Location::Local(path) => hashes.cache.hash_path(path).map_err(|source| HashError {
            path: location.display(workdir),
            source,
        }),
        Location::S3 { bucket, key } => hashes
            .storage
            .identity(bucket, key, dir)
            .map_err(|e| s3_error(location, workdir, e)),
    }
}

fn s3_error(location: &Location, workdir: &Path, e: crate::storage::StorageError) -> HashError {
    HashError {
        path: location.display(workdir),
        source: std::io::Error::other(e.reason),
    }
}

/// Every S3 identity the plan of `selected` will look up, to fetch them all at once
/// ([`crate::storage::Storage::prefetch`]).
pub fn s3_lookups(dag: &Dag, selected: &BTreeSet<usize>) -> Vec<crate::storage::Lookup> {
    let mut lookups = Vec::new();
    for &index in selected {
        let stage = dag.stage(index);
        // A versioned output is looked up by its versions' listing, not as a whole.
        let outputs: &[crate::config::Port] = if stage.versioning.is_some() {
            &[]
        } else {
            &stage.outputs
        };
        let ports = stage
            .inputs
            .iter()
            .map(|p| (p, false))
            .chain(outputs.iter().map(|p| (p, true)));
        for (port, output) in ports {
            if let Location::S3 { bucket, key } = &port.declared.location {
                let dir = port.declared.dir;
                lookups.push((bucket.clone(), key.clone(), dir, dir && output));
            }
        }
    }
    lookups
}

/// Like [`hash_location`] for an output: an S3 directory output counts only with its manifest.
fn hash_output(
    hashes: Hashes,
    location: &Location,
    dir: bool,
    workdir: &Path,
) -> Result<Option<ContentHash>, HashError> {
    match location {
        Location::S3 { bucket, key } if dir => hashes
            .storage
            .committed_dir(bucket, key)
            .map_err(|e| s3_error(location, workdir, e)),
        _ => hash_location(hashes, location, dir, workdir),
    }
}

/// The stage's fingerprint material, its inputs hashed as they are on disk now.
pub fn snapshot(stage: &Stage, workdir: &Path, hashes: Hashes) -> Result<Snapshot, HashError> {
    let mut inputs = BTreeMap::new();
    for input in &stage.inputs {
        let key = input.declared.location.display(workdir);
        // A built-in reads each input as one table file: a directory there would fail deep in
        // its reader ("No such device"); say what is wrong before it runs.
        if let (StageKind::Builtin { .. }, Location::Local(path), false) =
            (&stage.kind, &input.declared.location, input.declared.dir)
        {
            if path.is_dir() {
                return Err(HashError {
                    path: key,
                    source: imba_stages::safe::NotAFile::new("a directory").into_io(),
                });
            }
        }
        let hash = hash_location(
            hashes,
            &input.declared.location,
            input.declared.dir,
            workdir,
        )?
        .unwrap_or(ContentHash {
            hash: "missing".to_owned(),
            size: 0,
            files: None,
            etag: None,
        });
        inputs.insert(key, hash);
    }
    let (kind, implementation, cmd, params) = match &stage.kind {
        StageKind::Builtin {
            name,
            version,
            params,
        } => (name.clone(), Some(*version), None, params.clone()),
        StageKind::Shell {
            commands, params, ..
        } => (
            "cmd".to_owned(),
            None,
            Some(commands.clone()),
            params.clone(),
        ),
    };
    let declared_outputs: Vec<String> = stage
        .outputs
        .iter()
        .map(|o| o.declared.location.display(workdir))
        .collect();
    // Checks are hashed only when there are some, so that adding the feature changed no
    // existing fingerprint.
    let checks = (!stage.checks.is_empty())
        .then(|| Json::Array(stage.checks.iter().map(|c| c.to_json()).collect()));
    let mut material = json!({
        "kind": kind,
        "implementation": implementation,
        "cmd": cmd,
        "params": params,
        "inputs": inputs.iter().map(|(k, v)| (k.clone(), Json::String(v.hash.clone()))).collect::<serde_json::Map<_, _>>(),
        "outputs": declared_outputs,
    });
    if let (Some(checks), Json::Object(map)) = (&checks, &mut material) {
        map.insert("checks".into(), checks.clone());
    }
    // Like checks, hashed only when used. A variable passed through is hashed by its name:
    // its value may be a secret, and never lands in the lock.
    if let Json::Object(map) = &mut material {
        if matches!(stage.kind, StageKind::Shell { argv: true, .. }) {
            map.insert("argv".into(), Json::Bool(true));
        }
        if !stage.env.is_empty() {
            let env: serde_json::Map<String, Json> = stage
                .env
                .iter()
                .map(|(name, value)| (name.clone(), value.clone().map_or(Json::Null, Json::String)))
                .collect();
            map.insert("env".into(), Json::Object(env));
        }
    }
    let fingerprint = fingerprint(&material);
    Ok(Snapshot {
        fingerprint: fingerprint.clone(),
        entry: LockedStage {
            fingerprint,
            kind,
            implementation,
            cmd,
            params,
            checks,
            inputs,
            outputs: declared_outputs
                .into_iter()
                .map(|p| {
                    (
                        p,
                        ContentHash {
                            hash: String::new(),
                            size: 0,
                            files: None,
                            etag: None,
                        },
                    )
                })
                .collect(),
        },
    })
}

/// The differences between a stage as it is now and its lock entry; empty when up to date.
pub fn reasons(
    stage: &Stage,
    now: &Snapshot,
    locked: Option<&LockedStage>,
    workdir: &Path,
    hashes: Hashes,
) -> Result<Vec<Reason>, HashError> {
    let mut reasons = Vec::new();
    for (path, hash) in &now.entry.inputs {
        if hash.hash == "missing" {
            reasons.push(Reason::InputMissing { path: path.clone() });
        }
    }
    let Some(locked) = locked else {
        reasons.push(Reason::NeverRun);
        return Ok(reasons);
    };
    if locked.kind != now.entry.kind {
        reasons.push(Reason::KindChanged {
            from: locked.kind.clone(),
            to: now.entry.kind.clone(),
        });
    } else if let (Some(from), Some(to)) = (locked.implementation, now.entry.implementation) {
        if from != to {
            reasons.push(Reason::ImplementationChanged {
                stage: now.entry.kind.clone(),
                from,
                to,
            });
        }
    }
    if locked.cmd != now.entry.cmd {
        reasons.push(Reason::CommandChanged);
    }
    if locked.checks != now.entry.checks {
        reasons.push(Reason::ChecksChanged);
    }
    diff_params("", &locked.params, &now.entry.params, &mut reasons);
    for (path, hash) in &now.entry.inputs {
        match locked.inputs.get(path) {
            None => reasons.push(Reason::InputAdded { path: path.clone() }),
            Some(old) if old.hash != hash.hash && hash.hash != "missing" => {
                reasons.push(Reason::InputChanged { path: path.clone() })
            }
            _ => {}
        }
    }
    for path in locked.inputs.keys() {
        if !now.entry.inputs.contains_key(path) {
            reasons.push(Reason::InputRemoved { path: path.clone() });
        }
    }
    let declared: BTreeSet<&String> = now.entry.outputs.keys().collect();
    let recorded: BTreeSet<&String> = locked.outputs.keys().collect();
    if declared != recorded {
        reasons.push(Reason::OutputsChanged);
    }
    if reasons.is_empty() && locked.fingerprint != now.fingerprint {
        // Same material, other fingerprint: the fingerprint scheme itself changed.
        reasons.push(Reason::CommandChanged);
    }
    for output in &stage.outputs {
        let path = output.declared.location.display(workdir);
        let Some(recorded) = locked.outputs.get(&path) else {
            continue;
        };
        let current = match (&stage.versioning, &output.declared.location) {
            // A versioned output is its latest version.
            (Some(_), Location::Local(root)) => crate::versions::current_hash(root, hashes.cache)
                .map_err(|source| HashError {
                path: path.clone(),
                source,
            })?,
            (Some(_), Location::S3 { bucket, key }) => {
                crate::versions::current_s3_hash(hashes.storage, bucket, key).map_err(|e| {
                    HashError {
                        path: path.clone(),
                        source: std::io::Error::other(e),
                    }
                })?
            }
            _ => hash_output(
                hashes,
                &output.declared.location,
                output.declared.dir,
                workdir,
            )?,
        };
        match current {
            None => reasons.push(Reason::OutputMissing { path }),
            Some(hash) if hash.hash != recorded.hash => {
                reasons.push(Reason::OutputModified { path })
            }
            Some(_) => {}
        }
    }
    Ok(reasons)
}

fn diff_params(prefix: &str, old: &Json, new: &Json, reasons: &mut Vec<Reason>) {
    match (old, new) {
        (Json::Object(a), Json::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                diff_params(
                    &path,
                    a.get(key).unwrap_or(&Json::Null),
                    b.get(key).unwrap_or(&Json::Null),
                    reasons,
                );
            }
        }
        // Lists of maps (feature groups): item by item, the new or dropped ones as a whole.
        (Json::Array(a), Json::Array(b))
            if a.iter().chain(b).any(|v| v.is_object() || v.is_array()) =>
        {
            for i in 0..a.len().max(b.len()) {
                diff_params(
                    &format!("{}[{i}]", if prefix.is_empty() { "params" } else { prefix }),
                    a.get(i).unwrap_or(&Json::Null),
                    b.get(i).unwrap_or(&Json::Null),
                    reasons,
                );
            }
        }
        (a, b) if a != b => reasons.push(Reason::ParamChanged {
            key: if prefix.is_empty() {
                "params".to_owned()
            } else {
                prefix.to_owned()
            },
            old: a.clone(),
            new: b.clone(),
        }),
        _ => {}
    }
}

/// Which stages a command is about.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// `--stage`: these (by name, or by the name before `@` for all expansions) and what they
    /// need. Empty: every stage.
    pub stages: Vec<String>,
    /// `--downstream`: also everything after the named stages.
    pub downstream: bool,
    /// `--force`: run the named stages (or all) even when up to date.
    pub force: bool,
}

/// The stages selected, and those of them that are forced. Unknown names are an error.
pub fn select(
    dag: &Dag,
    selection: &Selection,
) -> Result<(BTreeSet<usize>, BTreeSet<usize>), String> {
    let all: BTreeSet<usize> = dag.order().iter().copied().collect();
    if selection.stages.is_empty() {
        let forced = if selection.force {
            all.clone()
        } else {
            BTreeSet::new()
        };
        return Ok((all, forced));
    }
    let mut named = BTreeSet::new();
    for name in &selection.stages {
        let matches: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| {
                let stage = &dag.stage(i).name;
                stage == name || stage.split_once('@').is_some_and(|(base, _)| base == name)
            })
            .collect();
        if matches.is_empty() {
            let names: Vec<&str> = all.iter().map(|&i| dag.stage(i).name.as_str()).collect();
            let hint = crate::diagnostic::did_you_mean(name, names.iter().copied())
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            return Err(format!("no stage is named `{name}`{hint}"));
        }
        named.extend(matches);
    }
    let mut targets = named.clone();
    if selection.downstream {
        targets.extend(dag.descendants(&named));
    }
    let forced = if selection.force {
        targets.clone()
    } else {
        BTreeSet::new()
    };
    let mut selected = targets.clone();
    selected.extend(dag.ancestors(&targets));
    Ok((selected, forced))
}

/// The status of one stage in a static plan.
#[derive(Clone, Debug, Serialize)]
pub struct StageStatus {
    pub name: String,
    pub stale: bool,
    pub reasons: Vec<Reason>,
    #[serde(skip)]
    pub index: usize,
}

/// What would run, without running anything: `status` and `run --dry-run`. A stage downstream
/// of a stale one is stale too, since its inputs may change.
pub fn static_plan(
    dag: &Dag,
    lock: &LockFile,
    hashes: Hashes,
    selected: &BTreeSet<usize>,
    forced: &BTreeSet<usize>,
) -> Result<Vec<StageStatus>, HashError> {
    let workdir = &dag.pipeline().workdir;
    hashes.storage.prefetch(s3_lookups(dag, selected));
    let mut stale = BTreeSet::new();
    let mut out = Vec::new();
    for &index in dag.order() {
        if !selected.contains(&index) {
            continue;
        }
        let stage = dag.stage(index);
        let mut reasons: Vec<Reason> = dag
            .needs(index)
            .iter()
            .filter(|(s, _)| stale.contains(s))
            .map(|(s, _)| Reason::Upstream {
                stage: dag.stage(*s).name.clone(),
            })
            .collect();
        if forced.contains(&index) {
            reasons.push(Reason::Forced);
        }
        let now = snapshot(stage, workdir, hashes)?;
        let own = reasons_for(stage, &now, lock, workdir, hashes)?;
        // An input that an upstream stage is about to write is not "missing".
        let upstream_stale =
            !reasons.is_empty() && reasons.iter().any(|r| matches!(r, Reason::Upstream { .. }));
        reasons.extend(own.into_iter().filter(|r| {
            !(upstream_stale
                && matches!(r, Reason::InputMissing { .. } | Reason::InputChanged { .. }))
        }));
        if !reasons.is_empty() {
            stale.insert(index);
        }
        out.push(StageStatus {
            name: stage.name.clone(),
            stale: !reasons.is_empty(),
            reasons,
            index,
        });
    }
    Ok(out)
}

fn reasons_for(
    stage: &Stage,
    now: &Snapshot,
    lock: &LockFile,
    workdir: &Path,
    hashes: Hashes,
) -> Result<Vec<Reason>, HashError> {
    reasons(stage, now, lock.stages.get(&stage.name), workdir, hashes)
}
