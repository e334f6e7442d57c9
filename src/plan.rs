//! Why each stage must run, or why it may be skipped: fingerprints compared with the lock file.
//!
//! A stage is up to date when its fingerprint (kind, implementation version, params, command,
//! declared outputs and the content hashes of its inputs) matches its lock entry and every output
//! is present with the recorded hash. Otherwise each difference becomes a [`Reason`], which
//! `status`, `run --dry-run`, the run records and `watch` all print the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::graph::dag::Dag;
use crate::model::{Declared, Stage, StageKind};
use crate::state::lock::{self, fingerprint, LockFile, LockedStage};
use crate::state::StateDir;
use crate::store::cache;
use crate::store::{ContentHash, RunCache, StatCache, Store, StoreError, Stores};

/// Why a stage runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    NeverRun,
    Forced,
    KindChanged {
        from: String,
        to: String,
    },
    ImplementationChanged {
        stage: String,
        from: u32,
        to: u32,
    },
    CommandChanged,
    EngineChanged {
        from: String,
        to: String,
    },
    ChecksChanged,
    ParamChanged {
        key: String,
        old: Json,
        new: Json,
    },
    /// A var the stage reads changed (a secret one never: the lock keeps it as `***`).
    VarChanged {
        name: String,
        old: Json,
        new: Json,
    },
    InputChanged {
        path: String,
    },
    InputAdded {
        path: String,
    },
    InputRemoved {
        path: String,
    },
    InputMissing {
        path: String,
    },
    OutputsChanged,
    OutputMissing {
        path: String,
    },
    OutputModified {
        path: String,
    },
    Upstream {
        stage: String,
    },
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
            Reason::EngineChanged { from, to } => write!(f, "engine changed: {from} → {to}"),
            Reason::ChecksChanged => write!(f, "checks changed"),
            Reason::ParamChanged { key, old, new } => {
                let (old, new) = differing(&show(old), &show(new));
                write!(f, "param {key} changed: {old} → {new}")
            }
            Reason::VarChanged { name, old, new } => {
                let (old, new) = differing(&show(old), &show(new));
                write!(f, "var {name} changed: {old} → {new}")
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

/// The longest a changed value is shown whole in a reason.
const SHOWN: usize = 60;

/// Two values as a reason shows them: whole when short; else the part where they differ, with
/// a little context on each side, so that a var changed inside a long SQL expression reads
/// `…month = '2024-12'…` → `…month = '2024-06'…`, never the whole text.
fn differing(old: &str, new: &str) -> (String, String) {
    if old.chars().count() <= SHOWN && new.chars().count() <= SHOWN {
        return (old.to_owned(), new.to_owned());
    }
    let (a, b): (Vec<char>, Vec<char>) = (old.chars().collect(), new.chars().collect());
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    const CONTEXT: usize = 12;
    let cut = |chars: &[char]| {
        let start = prefix.saturating_sub(CONTEXT);
        let end = (chars.len() - suffix + CONTEXT).min(chars.len());
        let mut middle: String = chars[start..end].iter().collect();
        if middle.chars().count() > SHOWN {
            middle = middle.chars().take(SHOWN).collect::<String>() + "…";
        }
        format!(
            "{}{middle}{}",
            if start > 0 { "…" } else { "" },
            if end < chars.len() { "…" } else { "" }
        )
    };
    (cut(&a), cut(&b))
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
        if let Some(inner) = crate::store::hash::NotAFileInDir::of(&self.source) {
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
    /// Inputs that are not there, as the lock shows them (they are not in `entry.inputs`).
    pub missing: BTreeSet<String>,
    /// A lock entry without outputs.
    pub entry: LockedStage,
}

/// A store error while deciding, as a [`HashError`] on the location as the lock shows it.
fn hash_error(path: String, error: StoreError) -> HashError {
    let source = match error {
        StoreError::Read { source, .. } => source,
        StoreError::S3(e) => std::io::Error::other(e.reason),
        StoreError::Other(message) => std::io::Error::other(message),
    };
    HashError { path, source }
}

/// Hashes an input as shown in the lock file (relative to `workdir`). An S3 object's hash is
/// its identity (ETag, size, version), a prefix's that of its listing.
pub fn hash_location(
    store: &dyn Store,
    declared: &Declared,
    workdir: &Path,
) -> Result<Option<ContentHash>, HashError> {
    store
        .identity(declared)
        .map_err(|e| hash_error(declared.location.display(workdir), e))
}

/// Every identity the plan of `selected` will look up, to fetch them all at once
/// ([`Store::prefetch`]): each location, and whether it is an output.
pub fn lookups<'a>(dag: &'a Dag, selected: &BTreeSet<usize>) -> Vec<(&'a Declared, bool)> {
    let mut lookups = Vec::new();
    for &index in selected {
        let stage = dag.stage(index);
        // A versioned output is looked up by its versions' listing, not as a whole.
        let outputs: &[crate::model::Port] = if stage.versioning.is_some() {
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
            lookups.push((&port.declared, output));
        }
    }
    lookups
}

/// The stage's fingerprint material, its inputs hashed as they are on disk now.
pub fn snapshot(stage: &Stage, workdir: &Path, store: &dyn Store) -> Result<Snapshot, HashError> {
    snapshot_with(stage, workdir, &|declared| {
        hash_location(store, declared, workdir)
    })
}

/// [`snapshot`] with each input's identity from `identity` (what it is now, or what a restore
/// from the run cache would make it).
pub fn snapshot_with(
    stage: &Stage,
    workdir: &Path,
    identity: &dyn Fn(&Declared) -> Result<Option<ContentHash>, HashError>,
) -> Result<Snapshot, HashError> {
    let mut inputs = BTreeMap::new();
    let mut missing = BTreeSet::new();
    for input in &stage.inputs {
        let key = input.declared.location.display(workdir);
        // A built-in reads each input as one table file: a directory there would fail deep in
        // its reader ("No such device"); say what is wrong before it runs.
        if let (StageKind::Builtin { .. }, Some(path), false) = (
            &stage.kind,
            input.declared.location.local_path(),
            input.declared.dir,
        ) {
            if path.is_dir() {
                return Err(HashError {
                    path: key,
                    source: imba_stages::safe::NotAFile::new("a directory").into_io(),
                });
            }
        }
        match identity(&input.declared)? {
            Some(hash) => {
                inputs.insert(key, hash);
            }
            None => {
                missing.insert(key);
            }
        }
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
        // A missing input stands as `missing`: such a stage cannot run, so this fingerprint is
        // shown (by status) but never committed.
        "inputs": inputs
            .iter()
            .map(|(k, v)| (k.clone(), Json::String(v.hash.clone())))
            .chain(missing.iter().map(|k| (k.clone(), Json::String("missing".to_owned()))))
            .collect::<serde_json::Map<_, _>>(),
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
        // Another engine is another implementation: switching runs the stage again.
        if stage.engine != crate::model::Engine::Local {
            map.insert("engine".into(), Json::String(stage.engine.as_str().into()));
        }
    }
    let fingerprint = fingerprint(&material);
    Ok(Snapshot {
        fingerprint: fingerprint.clone(),
        missing,
        entry: LockedStage {
            fingerprint,
            kind,
            implementation,
            cmd,
            engine: (stage.engine != crate::model::Engine::Local)
                .then(|| stage.engine.as_str().to_owned()),
            params,
            checks,
            inputs,
            vars: stage.vars.clone(),
            metrics: BTreeMap::new(),
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

/// When vars the stage reads changed since its lock entry, they are the reason: each changed
/// var that another changed var does not explain replaces the differences it makes (a command,
/// params, checks, declared paths), which would only repeat it at length.
fn explain_by_vars(stage: &Stage, locked: &LockedStage, reasons: &mut Vec<Reason>) {
    let changed: BTreeSet<&String> = stage
        .vars
        .iter()
        .filter(|(name, value)| locked.vars.get(*name).is_some_and(|old| old != *value))
        .map(|(name, _)| name)
        .collect();
    let roots: Vec<&String> = changed
        .iter()
        .copied()
        .filter(|name| {
            !stage
                .var_deps
                .get(*name)
                .is_some_and(|deps| deps.iter().any(|d| changed.contains(d)))
        })
        .collect();
    if roots.is_empty() {
        return;
    }
    // The keys the changed vars reach; only the differences in them are theirs.
    let fed: BTreeSet<&str> = changed
        .iter()
        .flat_map(|name| stage.var_fields.get(*name).into_iter().flatten())
        .map(String::as_str)
        .collect();
    let feeds = |keys: &[&str]| keys.iter().any(|k| fed.contains(k));
    let before = reasons.len();
    reasons.retain(|r| {
        let explained = match r {
            // A command renders its params and paths too.
            Reason::CommandChanged => feeds(&["cmd", "argv", "params", "inputs", "outputs"]),
            Reason::ParamChanged { .. } => feeds(&["params"]),
            Reason::ChecksChanged => feeds(&["checks"]),
            Reason::OutputsChanged => feeds(&["outputs"]),
            Reason::InputAdded { .. } | Reason::InputRemoved { .. } => feeds(&["inputs"]),
            _ => false,
        };
        !explained
    });
    if reasons.len() == before {
        // The vars changed only what is not fingerprinted (a hook): not a reason.
        return;
    }
    let at = reasons
        .iter()
        .position(|r| !matches!(r, Reason::InputMissing { .. }))
        .unwrap_or(reasons.len());
    for (i, name) in roots.into_iter().enumerate() {
        reasons.insert(
            at + i,
            Reason::VarChanged {
                name: name.clone(),
                old: locked.vars[name].clone(),
                new: stage.vars[name].clone(),
            },
        );
    }
}

/// The differences between a stage as it is now and its lock entry; empty when up to date.
pub fn reasons(
    stage: &Stage,
    now: &Snapshot,
    locked: Option<&LockedStage>,
    workdir: &Path,
    store: &dyn Store,
) -> Result<Vec<Reason>, HashError> {
    let mut reasons: Vec<Reason> = now
        .missing
        .iter()
        .map(|path| Reason::InputMissing { path: path.clone() })
        .collect();
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
    // (A lock written before engines were recorded has none: its fingerprint still decides.)
    if locked.engine != now.entry.engine && locked.fingerprint != now.fingerprint {
        let shown = |e: &Option<String>| e.clone().unwrap_or_else(|| "local".to_owned());
        reasons.push(Reason::EngineChanged {
            from: shown(&locked.engine),
            to: shown(&now.entry.engine),
        });
    }
    if locked.checks != now.entry.checks {
        reasons.push(Reason::ChecksChanged);
    }
    diff_params("", &locked.params, &now.entry.params, &mut reasons);
    // In path order, as the lock lists them, missing ones among the others.
    let declared: BTreeMap<&String, Option<&ContentHash>> = now
        .entry
        .inputs
        .iter()
        .map(|(path, hash)| (path, Some(hash)))
        .chain(now.missing.iter().map(|path| (path, None)))
        .collect();
    for (path, hash) in &declared {
        match (locked.inputs.get(*path), hash) {
            (None, _) => reasons.push(Reason::InputAdded {
                path: (*path).clone(),
            }),
            (Some(old), Some(hash)) if old.hash != hash.hash => {
                reasons.push(Reason::InputChanged {
                    path: (*path).clone(),
                })
            }
            _ => {}
        }
    }
    for path in locked.inputs.keys() {
        if !declared.contains_key(path) {
            reasons.push(Reason::InputRemoved { path: path.clone() });
        }
    }
    let declared: BTreeSet<&String> = now.entry.outputs.keys().collect();
    let recorded: BTreeSet<&String> = locked.outputs.keys().collect();
    if declared != recorded {
        reasons.push(Reason::OutputsChanged);
    }
    explain_by_vars(stage, locked, &mut reasons);
    if reasons.is_empty() && locked.fingerprint != now.fingerprint {
        // Same material, other fingerprint: the fingerprint scheme itself changed.
        reasons.push(Reason::CommandChanged);
    }
    for output in &stage.outputs {
        let path = output.declared.location.display(workdir);
        let Some(recorded) = locked.outputs.get(&path) else {
            continue;
        };
        let current = if stage.versioning.is_some() {
            // A versioned output is its latest version.
            store.version_identity(&output.declared)
        } else {
            store.committed_identity(&output.declared)
        }
        .map_err(|e| hash_error(path.clone(), e))?;
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

/// What the run cache can do for a stale stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FromCache {
    /// Its outputs already hold what the cache recorded for its fingerprint: nothing to do
    /// but record it (`up to date (cached)`).
    Held,
    /// The cache holds its outputs: they are restored instead of computed.
    Restore,
}

/// The run-cache entry of the stage's fingerprint as it is `now`, if the cache holds a usable
/// one (its declared outputs, every blob present), and whether the outputs already hold it.
pub fn from_cache(
    stage: &Stage,
    now: &Snapshot,
    cache: &RunCache,
    store: &dyn Store,
    workdir: &Path,
) -> Option<(cache::Entry, FromCache)> {
    // A stage without outputs is run for what it does (a deploy, a notification): never
    // from the cache.
    if !now.missing.is_empty() || stage.outputs.is_empty() {
        return None;
    }
    let entry = cache
        .entry(&now.fingerprint)
        .filter(|e| e.outputs.keys().eq(now.entry.outputs.keys()))?;
    let held = stage.outputs.iter().all(|port| {
        let key = port.declared.location.display(workdir);
        let Some(cached) = entry.outputs.get(&key) else {
            return false;
        };
        let current = if stage.versioning.is_some() {
            store.version_identity(&port.declared)
        } else {
            store.committed_identity(&port.declared)
        };
        matches!(current, Ok(Some(hash)) if hash.hash == cached.committed.hash)
    });
    if held {
        return Some((entry, FromCache::Held));
    }
    // Blobs collected since, or never fully written: it is computed.
    entry
        .outputs
        .values()
        .all(|o| cache.holds(o))
        .then_some((entry, FromCache::Restore))
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
    /// `--partition`, `--partitions`, `--latest`: only partitioned stages of these partitions
    /// (and what they need).
    pub partitions: Option<PartitionFilter>,
}

/// Which partitions a command is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionFilter {
    /// `--partition KEY`, repeatable.
    Keys(Vec<String>),
    /// `--partitions FROM..TO`, both ends included, in the set's order.
    Range(String, String),
    /// `--latest`: the last key of each set.
    Latest,
}

impl PartitionFilter {
    /// The (set, key) pairs it takes from the pipeline's sets; an error names a key no set has.
    pub fn keys(
        &self,
        sets: &[crate::model::PartitionSet],
    ) -> Result<BTreeSet<(String, String)>, String> {
        if sets.is_empty() {
            return Err("this pipeline has no `partitions:`; --partition, --partitions and --latest choose among a set's keys".to_owned());
        }
        let unknown = |key: &str| {
            let all: Vec<&str> = sets
                .iter()
                .flat_map(|s| s.keys.iter().map(String::as_str))
                .collect();
            let hint = crate::diagnostic::did_you_mean(key, all.iter().copied())
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            let known: Vec<String> = sets.iter().map(describe_set).collect();
            format!("no partition is `{key}`{hint}; {}", known.join("; "))
        };
        let mut chosen = BTreeSet::new();
        match self {
            PartitionFilter::Latest => {
                for set in sets {
                    if let Some(last) = set.keys.last() {
                        chosen.insert((set.name.clone(), last.clone()));
                    }
                }
            }
            PartitionFilter::Keys(keys) => {
                for key in keys {
                    let before = chosen.len();
                    for set in sets.iter().filter(|s| s.keys.contains(key)) {
                        chosen.insert((set.name.clone(), key.clone()));
                    }
                    if chosen.len() == before {
                        return Err(unknown(key));
                    }
                }
            }
            PartitionFilter::Range(from, to) => {
                for key in [from, to] {
                    if !sets.iter().any(|s| s.keys.contains(key)) {
                        return Err(unknown(key));
                    }
                }
                for set in sets {
                    let place = |key: &String| set.keys.iter().position(|k| k == key);
                    let (Some(a), Some(b)) = (place(from), place(to)) else {
                        continue;
                    };
                    if a > b {
                        return Err(format!(
                            "--partitions {from}..{to} goes backwards: in `{}`, {to} comes before {from}",
                            set.name
                        ));
                    }
                    for key in &set.keys[a..=b] {
                        chosen.insert((set.name.clone(), key.clone()));
                    }
                }
                if chosen.is_empty() {
                    return Err(format!(
                        "--partitions {from}..{to}: no set has both `{from}` and `{to}`"
                    ));
                }
            }
        }
        Ok(chosen)
    }
}

/// `` `month` has 3 partitions: 2017-01, 2017-02, 2017-03 `` (the first and last of a long set).
fn describe_set(set: &crate::model::PartitionSet) -> String {
    let keys = match set.keys.as_slice() {
        [] => "none".to_owned(),
        keys if keys.len() <= 6 => keys.join(", "),
        keys => format!("{} … {}", keys[0], keys[keys.len() - 1]),
    };
    let count = match set.keys.len() {
        1 => "1 partition".to_owned(),
        n => format!("{n} partitions"),
    };
    format!("`{}` has {count}: {keys}", set.name)
}

/// The stages selected, and those of them that are forced. Unknown names are an error.
pub fn select(
    dag: &Dag,
    selection: &Selection,
) -> Result<(BTreeSet<usize>, BTreeSet<usize>), String> {
    let all: BTreeSet<usize> = dag.order().iter().copied().collect();
    let chosen = match &selection.partitions {
        Some(filter) => Some(filter.keys(&dag.pipeline().partitions)?),
        None => None,
    };
    // A stage the partition filter keeps: a partitioned one of a chosen partition.
    let kept = |i: usize| match (&chosen, &dag.stage(i).partition) {
        (None, _) => true,
        (Some(chosen), Some(p)) => chosen.contains(&(p.set.clone(), p.key.clone())),
        (Some(_), None) => false,
    };
    if selection.stages.is_empty() && chosen.is_none() {
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
        let before = named.len();
        named.extend(matches.iter().copied().filter(|&i| kept(i)));
        if named.len() == before {
            return Err(
                if matches.iter().any(|&i| dag.stage(i).partition.is_some()) {
                    format!("stage `{name}` has none of the chosen partitions")
                } else {
                    format!(
                        "stage `{name}` is not partitioned: --partition, --partitions and --latest choose partitioned stages"
                    )
                },
            );
        }
    }
    if selection.stages.is_empty() {
        named.extend(all.iter().copied().filter(|&i| kept(i)));
        if named.is_empty() {
            return Err(
                "no stage is partitioned: a stage is, when its templates read a set's key (`{{ month }}`)"
                    .to_owned(),
            );
        }
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
    /// A stale stage the run cache can bring back (after its stale upstream stages are brought
    /// back) rather than compute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_cache: Option<FromCache>,
    #[serde(skip)]
    pub index: usize,
}

/// What would run, without running anything: `status` and `run --dry-run`. A stage downstream
/// of a stale one is stale too, since its inputs may change.
///
/// With a run cache, a stale stage whose fingerprint it holds is marked [`FromCache`]; so is a
/// stage downstream whose every stale upstream stage is, with its inputs as the restore will
/// leave them (a local output's identity is its content hash, so the restore is predicted
/// exactly; an S3 output's identity is only known once it is written, so its readers are not).
pub fn static_plan(
    dag: &Dag,
    lock: &LockFile,
    store: &dyn Store,
    cache: Option<&RunCache>,
    selected: &BTreeSet<usize>,
    forced: &BTreeSet<usize>,
) -> Result<Vec<StageStatus>, HashError> {
    let workdir = &dag.pipeline().workdir;
    store.prefetch(&lookups(dag, selected));
    let mut stale = BTreeSet::new();
    // Stale stages the cache brings back, and the identities their outputs will have.
    let mut restorable = BTreeSet::new();
    let mut predicted: BTreeMap<String, ContentHash> = BTreeMap::new();
    // Outputs of those stages whose identity after the restore is not known beforehand (S3,
    // versioned): a stage reading one is not predicted.
    let mut unknown: Vec<String> = Vec::new();
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
        let now = snapshot(stage, workdir, store)?;
        let own = self::reasons(stage, &now, lock.stages.get(&stage.name), workdir, store)?;
        // An input that an upstream stage is about to write is not "missing".
        let upstream_stale =
            !reasons.is_empty() && reasons.iter().any(|r| matches!(r, Reason::Upstream { .. }));
        reasons.extend(own.into_iter().filter(|r| {
            !(upstream_stale
                && matches!(r, Reason::InputMissing { .. } | Reason::InputChanged { .. }))
        }));
        let mut from = None;
        let upstream_restorable = dag
            .needs(index)
            .iter()
            .all(|(s, _)| !stale.contains(s) || restorable.contains(s));
        let reads_unknown = stage.inputs.iter().any(|input| {
            let key = input.declared.location.display(workdir);
            unknown
                .iter()
                .any(|u| key == *u || key.starts_with(&format!("{}/", u.trim_end_matches('/'))))
        });
        if let (Some(cache), false, true, false) = (
            cache,
            reasons.is_empty(),
            upstream_restorable,
            reads_unknown,
        ) {
            if !forced.contains(&index) {
                let now = if upstream_stale {
                    snapshot_with(stage, workdir, &|declared| {
                        let key = declared.location.display(workdir);
                        match predict(&predicted, cache, &key) {
                            Some(hash) => Ok(Some(hash)),
                            None => hash_location(store, declared, workdir),
                        }
                    })?
                } else {
                    now
                };
                if let Some((entry, how)) = from_cache(stage, &now, cache, store, workdir) {
                    from = Some(how);
                    restorable.insert(index);
                    for (key, output) in entry.outputs {
                        // Only a local file's identity is its content hash.
                        let local = stage.outputs.iter().any(|p| {
                            p.declared.location.display(workdir) == key
                                && !p.declared.location.is_remote()
                        });
                        if local && stage.versioning.is_none() {
                            predicted.insert(key, output.committed);
                        } else {
                            unknown.push(key);
                        }
                    }
                }
            }
        }
        if !reasons.is_empty() {
            stale.insert(index);
        }
        out.push(StageStatus {
            name: stage.name.clone(),
            stale: !reasons.is_empty(),
            reasons,
            from_cache: from,
            index,
        });
    }
    Ok(out)
}

/// The identity `key` will have once the restorable stages are restored: an output of theirs,
/// or a file inside a folder output (from the folder's manifest).
fn predict(
    predicted: &BTreeMap<String, ContentHash>,
    cache: &RunCache,
    key: &str,
) -> Option<ContentHash> {
    if let Some(hash) = predicted.get(key) {
        return Some(hash.clone());
    }
    let (folder, hash) = predicted.iter().find(|(folder, hash)| {
        hash.files.is_some() && key.starts_with(&format!("{}/", folder.trim_end_matches('/')))
    })?;
    let relative = &key[folder.trim_end_matches('/').len() + 1..];
    let files = cache.manifest(&hash.hash).ok()?;
    let file = files.into_iter().find(|f| f.path == relative)?;
    Some(ContentHash {
        hash: file.blake3,
        size: file.size,
        files: None,
        etag: None,
    })
}

/// Why a status could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The selection or the lock file is wrong: the user's to fix.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
}

/// What is stale among the selected stages, and why, without running anything: `imba status`,
/// `run --dry-run`, and `imba watch` before it starts a run.
pub fn status(
    dag: &Dag,
    selection: &Selection,
    warn: impl Fn(String),
) -> Result<Vec<StageStatus>, PlanError> {
    let pipeline = dag.pipeline();
    let state = StateDir::new(&pipeline.workdir);
    let lock = lock::load_for_run(&lock::lock_path(&pipeline.file), &state, warn)
        .map_err(PlanError::Config)?;
    let (selected, forced) = select(dag, selection).map_err(PlanError::Config)?;
    let store = stores(pipeline);
    let cache = RunCache::new(state.cache());
    let statuses = static_plan(dag, &lock, &store, Some(&cache), &selected, &forced)
        .map_err(|e| PlanError::Io(e.to_string()))?;
    // Remember what was hashed, so the next status (or run) does not read the same files again.
    let _ = store.save();
    Ok(statuses)
}

/// The stage's `metrics:` measured on its outputs (`outputs`, in output order: staged, or
/// committed ones), and a line for each that could not be measured (recorded as null).
pub fn measure(
    stage: &Stage,
    outputs: &[PathBuf],
) -> (BTreeMap<String, lock::Measured>, Vec<String>) {
    let mut measured = BTreeMap::new();
    let mut problems = Vec::new();
    for metric in &stage.metrics {
        let mut path = outputs[metric.output].clone();
        if let Some(file) = &metric.file {
            path = path.join(file);
        }
        let value = match imba_stages::checks::measure_value(&metric.measure, &path) {
            Ok(value) => json!(value),
            Err(e) => {
                problems.push(format!("metric `{}` cannot be measured: {e}", metric.name));
                Json::Null
            }
        };
        measured.insert(
            metric.name.clone(),
            lock::Measured {
                of: metric.definition(),
                value,
                at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_millis() as u64),
            },
        );
    }
    (measured, problems)
}

/// One metric of one stage, over its partitions (one point when it is not partitioned).
#[derive(Debug, Serialize)]
pub struct MetricSeries {
    /// The stage's name (without `@KEY`).
    pub stage: String,
    pub metric: String,
    /// The partition set, for a partitioned stage.
    pub set: Option<String>,
    pub points: Vec<MetricPoint>,
}

/// A metric's value for one partition (or the one value of an unpartitioned stage).
#[derive(Debug, Serialize)]
pub struct MetricPoint {
    pub partition: Option<String>,
    /// The stage instance measured (`clean@2017-05`).
    pub instance: String,
    /// `None`: never committed, or undefined there.
    pub value: Option<f64>,
    /// Whether the instance has committed outputs.
    pub committed: bool,
    /// The change from the previous partition with a value, in percent.
    pub change_pct: Option<f64>,
    /// When it was measured at commit (milliseconds since the Unix epoch); `None` when it was
    /// measured now, on outputs committed before the metric existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_at_ms: Option<u64>,
}

/// The `metrics:` of the stages named in `stages` (all when empty; a name without `@` means
/// every instance) over their partitions, as committed: the values recorded at commit, or,
/// for a metric defined since, measured now on the committed outputs.
pub fn metrics(
    dag: &Dag,
    stages: &[String],
    warn: impl Fn(String),
) -> Result<Vec<MetricSeries>, PlanError> {
    let pipeline = dag.pipeline();
    let state = StateDir::new(&pipeline.workdir);
    let lock = lock::load_for_run(&lock::lock_path(&pipeline.file), &state, &warn)
        .map_err(PlanError::Config)?;
    let base = |stage: &Stage| match &stage.partition {
        Some(p) => p.base(&stage.name).to_owned(),
        None => stage.name.clone(),
    };
    let mut unknown: Vec<&String> = stages.iter().collect();
    let mut chosen: Vec<&Stage> = Vec::new();
    for stage in &pipeline.stages {
        let name = base(stage);
        let wanted = stages.is_empty() || stages.iter().any(|s| *s == name || *s == stage.name);
        unknown.retain(|s| **s != name && **s != stage.name);
        if wanted && !stage.metrics.is_empty() {
            chosen.push(stage);
        }
    }
    if let Some(name) = unknown.first() {
        return Err(PlanError::Config(format!("no stage is named `{name}`")));
    }
    let store = stores(pipeline);
    let mut series: Vec<MetricSeries> = Vec::new();
    for stage in chosen {
        // Whether committed, the value, and when it was measured (at commit).
        let value_of = |metric: &crate::model::StageMetric| -> (bool, Option<f64>, Option<u64>) {
            let Some(entry) = lock.stages.get(&stage.name) else {
                return (false, None, None);
            };
            if let Some(measured) = entry.metrics.get(&metric.name) {
                if measured.of == metric.definition() {
                    return (true, measured.value.as_f64(), measured.at_ms);
                }
            }
            let port = &stage.outputs[metric.output];
            let path = if stage.versioning.is_some() {
                store.latest_version(&port.declared)
            } else {
                match port.declared.location.local_path() {
                    Some(path) => Some(path.to_path_buf()),
                    None => match store.local_copy(&port.declared) {
                        Ok(path) => Some(path),
                        Err(e) => {
                            warn(format!("metric `{}` of `{}`: {e}", metric.name, stage.name));
                            None
                        }
                    },
                }
            };
            let Some(mut path) = path else {
                return (true, None, None);
            };
            if let Some(file) = &metric.file {
                path = path.join(file);
            }
            match imba_stages::checks::measure_value(&metric.measure, &path) {
                Ok(value) => (true, value, None),
                Err(e) => {
                    warn(format!(
                        "metric `{}` of `{}` cannot be measured: {e}",
                        metric.name, stage.name
                    ));
                    (true, None, None)
                }
            }
        };
        for metric in &stage.metrics {
            let (committed, value, measured_at_ms) = value_of(metric);
            let point = MetricPoint {
                partition: stage.partition.as_ref().map(|p| p.key.clone()),
                instance: stage.name.clone(),
                value,
                committed,
                change_pct: None,
                measured_at_ms,
            };
            let stage_name = base(stage);
            let set = stage.partition.as_ref().map(|p| p.set.clone());
            match series
                .iter_mut()
                .find(|s| s.stage == stage_name && s.metric == metric.name && s.set == set)
            {
                Some(found) => found.points.push(point),
                None => series.push(MetricSeries {
                    stage: stage_name,
                    metric: metric.name.clone(),
                    set,
                    points: vec![point],
                }),
            }
        }
    }
    // Each point's change from the previous value. The points are in partition order already:
    // a partitioned stage's instances follow one another in its set's key order.
    for one in &mut series {
        let mut previous: Option<f64> = None;
        for point in &mut one.points {
            if let (Some(before), Some(now)) = (previous, point.value) {
                point.change_pct = (before != 0.0).then(|| (now - before) / before.abs() * 100.0);
            }
            if point.value.is_some() {
                previous = point.value;
            }
        }
    }
    let _ = store.save();
    Ok(series)
}

/// The stores a command outside a run reads and writes through.
pub fn stores(pipeline: &crate::model::Pipeline) -> Stores {
    let state = StateDir::new(&pipeline.workdir);
    let storage = crate::store::s3::Storage::new(pipeline.storage.clone(), state.cache());
    let cache = if state.root.is_dir() {
        StatCache::load(state.stat_cache())
    } else {
        StatCache::in_memory()
    };
    Stores::new(&pipeline.workdir, cache, storage)
}

/// `overrides` with what the `discover:` patterns of the pipeline at `path` match now: the
/// pipeline is read once to render the patterns, then each pattern's prefix is listed once
/// (local or S3). The pipeline, loaded with the result, has a partition per path found. A
/// prefix that cannot be listed is an error at its pattern.
pub fn discover(
    path: &Path,
    overrides: &crate::config::Overrides,
    registry: &imba_stages::Registry,
) -> Result<crate::config::Overrides, (crate::diagnostic::Sources, crate::config::LoadError)> {
    if !overrides.discovered.is_empty() {
        return Ok(overrides.clone());
    }
    // A `discover:` set is written in the file itself (overrides set vars, never sets): a file
    // without the word needs no first reading.
    // (Only a regular file is read here: a FIFO or a device is for the loader to refuse.)
    let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
    let mentions = !regular
        || std::fs::read(path)
            .map(|bytes| bytes.windows(b"discover".len()).any(|w| w == b"discover"))
            .unwrap_or(true);
    if !mentions {
        return Ok(overrides.clone());
    }
    let (sources, loaded) = crate::config::load_partial(path, overrides, registry);
    let pipeline = match &loaded {
        Ok(pipeline) => pipeline,
        Err((_, Some(partial))) => &partial.pipeline,
        // The load that follows reports the same error.
        Err((_, None)) => return Ok(overrides.clone()),
    };
    let sets: Vec<(&str, &crate::model::Discover)> = pipeline
        .partitions
        .iter()
        .filter_map(|set| Some((set.name.as_str(), set.discover.as_ref()?)))
        .collect();
    if sets.is_empty() {
        return Ok(overrides.clone());
    }
    let store = stores(pipeline);
    let mut found = overrides.clone();
    let mut errors = Vec::new();
    for (name, discover) in sets {
        let listed = crate::model::Declared::parse(&discover.prefix, &pipeline.workdir)
            .map_err(|e| e.to_string())
            .and_then(|prefix| store.list(&prefix.location).map_err(|e| e.to_string()));
        match listed {
            Ok(listed) => {
                let paths = listed
                    .into_iter()
                    .map(|l| format!("{}{}", discover.prefix, l.path))
                    .collect();
                found.discovered.insert(name.to_owned(), paths);
            }
            Err(e) => errors.push(
                crate::diagnostic::Diagnostic::error(format!(
                    "cannot list `{}` to find the partitions of `{name}`: {e}",
                    discover.prefix
                ))
                .at(discover.span, "this pattern"),
            ),
        }
    }
    if errors.is_empty() {
        Ok(found)
    } else {
        Err((sources, crate::config::LoadError::Invalid(errors)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_changed_value_is_shown_where_it_differs() {
        let sql = |month: &str| {
            format!(
                "SELECT user_id, count(*) AS n FROM orders WHERE month = '{month}' AND eval_set = 'prior' GROUP BY user_id ORDER BY user_id"
            )
        };
        let reason = Reason::ParamChanged {
            key: "groups[0].sql".to_owned(),
            old: Json::String(sql("2024-12")),
            new: Json::String(sql("2024-06")),
        };
        assert_eq!(
            reason.to_string(),
            "param groups[0].sql changed: …nth = '2024-12' AND eval_s… → …nth = '2024-06' AND eval_s…"
        );
        let short = Reason::ParamChanged {
            key: "k".to_owned(),
            old: serde_json::json!(1.5),
            new: serde_json::json!(0.5),
        };
        assert_eq!(short.to_string(), "param k changed: 1.5 → 0.5");
    }
}
