//! The lock file (`monthly.lock` beside `monthly.yaml`): what each stage last ran with and wrote.
//!
//! Like dvc.lock it is meant to be committed: JSON with sorted keys and one value per line, paths
//! relative to the pipeline's workdir. An entry is written only after the stage's outputs were
//! committed, so it never claims outputs that are not there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

pub use crate::store::hash::fingerprint;
use crate::store::hash::ContentHash;

/// The lock format this build reads and writes.
pub const LOCK_FORMAT: u32 = 2;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub version: u32,
    pub stages: BTreeMap<String, LockedStage>,
}

/// What a stage ran with and what it wrote, the last time it succeeded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LockedStage {
    /// BLAKE3 over the canonical encoding of everything below but `outputs`.
    pub fingerprint: String,
    /// `cmd`, or the built-in's name.
    pub kind: String,
    /// A built-in's implementation version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implementation: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Where a built-in ran, when not on the local engine (`spark`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    #[serde(default)]
    pub params: Json,
    /// The stage's `checks:`, when it has any: a check decides whether outputs are committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<Json>,
    pub inputs: BTreeMap<String, ContentHash>,
    pub outputs: BTreeMap<String, ContentHash>,
    /// The pipeline's vars the stage read, to name a changed one in a reason. Not part of the
    /// fingerprint.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, Json>,
    /// The stage's `metrics:` measured on the committed outputs, by name. Not part of the
    /// fingerprint: a new metric does not make a stage stale.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, Measured>,
}

/// One metric as measured at a commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// The metric's definition then (what it measured, on which output): a value measured by
    /// another definition is measured again.
    pub of: Json,
    /// A number, or null when undefined there.
    pub value: Json,
    /// When it was measured (the commit), in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
}

/// The lock file of the pipeline at `pipeline`: same directory and stem, `.lock` extension.
pub fn lock_path(pipeline: &Path) -> PathBuf {
    pipeline.with_extension("lock")
}

/// What reading the lock file found.
#[derive(Debug)]
pub enum Loaded {
    Found(LockFile),
    Missing,
    /// Not a file imba can read or replace (a FIFO, a socket, a device): an error.
    Unreadable(String),
    /// Unreadable or not a lock file: treated as empty, with this warning.
    Corrupt(String),
    /// Written by a newer imba.
    TooNew(u32),
}

pub fn load(path: &Path) -> Loaded {
    let bytes = match read_regular(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => {
            return match imba_stages::safe::NotAFile::of(&e) {
                Some(not) => Loaded::Unreadable(format!(
                    "lock file `{}` is {}, not a regular file: remove it",
                    path.display(),
                    not.kind
                )),
                None => Loaded::Corrupt(format!("cannot read lock file `{}`: {e}", path.display())),
            }
        }
    };
    let value: Json = match serde_json::from_slice(&bytes) {
        Ok(value) => value,
        Err(e) => {
            return Loaded::Corrupt(format!(
                "lock file `{}` is not valid JSON ({e})",
                path.display()
            ))
        }
    };
    match value.get("version").and_then(Json::as_u64) {
        Some(v) if v > LOCK_FORMAT as u64 => return Loaded::TooNew(v as u32),
        Some(_) => {}
        None => {
            return Loaded::Corrupt(format!(
                "lock file `{}` has no format version",
                path.display()
            ))
        }
    }
    match serde_json::from_value(value) {
        Ok(lock) => Loaded::Found(lock),
        Err(e) => Loaded::Corrupt(format!(
            "lock file `{}` is not an imba lock file ({e})",
            path.display()
        )),
    }
}

/// The bytes of `path` when it is a regular file; a FIFO (which would block the read until
/// something writes to it) or a device is an error carrying [`imba_stages::safe::NotAFile`].
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    imba_stages::safe::open_file(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Writes the lock file atomically.
pub fn save(path: &Path, lock: &LockFile) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(lock).map_err(std::io::Error::other)?;
    text.push('\n');
    crate::store::fs::write_atomic(path, text.as_bytes())
}

/// Loads the lock file for a run or a status, with the journal of an interrupted run replayed
/// onto it: a corrupt lock file is treated as empty (with a warning), one from a newer imba is an
/// error.
pub fn load_for_run(
    path: &Path,
    state: &super::StateDir,
    warn: impl Fn(String),
) -> Result<LockFile, String> {
    let mut lock = read_lock(path, warn)?;
    replay(&mut lock, &journal_path(&state.root, path));
    Ok(lock)
}

fn read_lock(path: &Path, warn: impl Fn(String)) -> Result<LockFile, String> {
    match load(path) {
        Loaded::Found(lock) => Ok(lock),
        Loaded::Missing => Ok(LockFile {
            version: LOCK_FORMAT,
            stages: BTreeMap::new(),
        }),
        Loaded::Corrupt(message) => {
            warn(format!("{message}; every stage is treated as stale, and the next run rewrites it"));
            Ok(LockFile {
                version: LOCK_FORMAT,
                stages: BTreeMap::new(),
            })
        }
        Loaded::Unreadable(message) => Err(message),
        Loaded::TooNew(version) => Err(format!(
            "lock file `{}` was written by a newer imba (format {version}; this imba reads format {})",
            path.display(),
            LOCK_FORMAT
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_do_not_depend_on_key_order() {
        let a: Json = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#).unwrap();
        let b: Json = serde_json::from_str(r#"{"a": {"x": "s", "y": [1, 2]}, "b": 1}"#).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        let c: Json = serde_json::from_str(r#"{"a": {"x": "s", "y": [2, 1]}, "b": 1}"#).unwrap();
        assert_ne!(fingerprint(&a), fingerprint(&c), "list order matters");
    }

    #[test]
    fn loading_tells_missing_corrupt_and_too_new_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        assert!(matches!(load(&path), Loaded::Missing));
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(load(&path), Loaded::Corrupt(_)));
        std::fs::write(&path, r#"{"version": 99, "stages": {}}"#).unwrap();
        assert!(matches!(load(&path), Loaded::TooNew(99)));
        std::fs::write(
            &path,
            r#"{"version": 1, "stages": {"a": {"fingerprint": 3}}}"#,
        )
        .unwrap();
        assert!(matches!(load(&path), Loaded::Corrupt(_)));
        let lock = LockFile {
            version: LOCK_FORMAT,
            stages: BTreeMap::new(),
        };
        save(&path, &lock).unwrap();
        assert!(matches!(load(&path), Loaded::Found(l) if l == lock));
    }

    #[test]
    fn a_fifo_lock_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        crate::store::hash::tests::mkfifo(&path);
        match load(&path) {
            Loaded::Unreadable(message) => assert_eq!(
                message,
                format!(
                    "lock file `{}` is a FIFO (named pipe), not a regular file: remove it",
                    path.display()
                )
            ),
            other => panic!("{other:?}"),
        }
        // Neither is a FIFO journal: replaying it finds nothing, opening it is an error.
        let journal = dir.path().join("j.jsonl");
        crate::store::hash::tests::mkfifo(&journal);
        assert_eq!(replay(&mut LockFile::default(), &journal), 0);
        let error = Journal::open(&journal).err().expect("a FIFO");
        assert_eq!(
            error.to_string(),
            format!(
                "`{}` is a FIFO (named pipe), not a regular file",
                journal.display()
            )
        );
    }

    #[test]
    fn lock_path_sits_beside_the_pipeline() {
        assert_eq!(
            lock_path(Path::new("pipelines/monthly.yaml")),
            PathBuf::from("pipelines/monthly.lock")
        );
    }
}

/// The journal of a run in progress: one line per stage committed since the lock file was last
/// written. Appending a line is cheap, so every commit is recorded at once, and the lock file is
/// rewritten only at the end of a run; after a crash (or `kill -9`) the next run or status
/// replays the journal, so no committed stage runs again.
pub struct Journal {
    file: std::fs::File,
    path: PathBuf,
    /// Lines not yet folded into the lock file.
    pending: bool,
}

#[derive(Serialize, Deserialize)]
struct JournalLine {
    stage: String,
    entry: LockedStage,
}

/// Where the journal of the lock file `lock` lives, under the state directory `state`.
pub fn journal_path(state: &Path, lock: &Path) -> PathBuf {
    let absolute = std::path::absolute(lock).unwrap_or_else(|_| lock.to_path_buf());
    let key = blake3::hash(absolute.to_string_lossy().as_bytes()).to_hex();
    state.join("journal").join(format!("{}.jsonl", &key[..16]))
}

impl Journal {
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Only a regular file: opening a FIFO to write would wait for a reader.
        let file = imba_stages::safe::open_with(
            std::fs::OpenOptions::new().create(true).append(true),
            path,
        )
        .map_err(|e| crate::state::named(e, path))?;
        let pending = file.metadata()?.len() > 0;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            pending,
        })
    }

    /// Records that `stage` committed with `entry`; on disk when this returns.
    pub fn append(&mut self, stage: &str, entry: &LockedStage) -> std::io::Result<()> {
        use std::io::Write;
        let mut line = serde_json::to_vec(&JournalLine {
            stage: stage.to_owned(),
            entry: entry.clone(),
        })
        .map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.pending = true;
        self.file.sync_data()
    }

    /// Writes `lock` and empties the journal (the lock now holds everything it recorded).
    /// Does nothing when the journal holds nothing new.
    pub fn checkpoint(&mut self, lock_path: &Path, lock: &LockFile) -> std::io::Result<()> {
        if !self.pending {
            return Ok(());
        }
        save(lock_path, lock)?;
        self.file.set_len(0)?;
        self.pending = false;
        self.file.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Applies the complete lines of the journal at `path` to `lock`; returns how many. A torn last
/// line (the process died while writing it) is ignored: its stage will simply run again.
pub fn replay(lock: &mut LockFile, path: &Path) -> usize {
    // A journal that is not a regular file is not read here; opening it to append says so.
    let Some(text) = read_regular(path)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
    else {
        return 0;
    };
    let mut applied = 0;
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        if let Ok(entry) = serde_json::from_str::<JournalLine>(line) {
            lock.stages.insert(entry.stage, entry.entry);
            applied += 1;
        }
    }
    applied
}

#[cfg(test)]
mod journal_tests {
    use super::*;

    fn entry(fingerprint: &str) -> LockedStage {
        LockedStage {
            fingerprint: fingerprint.into(),
            kind: "cmd".into(),
            implementation: None,
            cmd: Some(vec!["true".into()]),
            engine: None,
            params: Json::Null,
            checks: None,
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            vars: BTreeMap::new(),
            metrics: BTreeMap::new(),
        }
    }

    #[test]
    fn replay_applies_whole_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let mut journal = Journal::open(&path).unwrap();
        journal.append("a", &entry("1")).unwrap();
        journal.append("b", &entry("2")).unwrap();
        journal.append("a", &entry("3")).unwrap();
        // A torn line, as a kill in the middle of a write leaves it.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(r#"{"stage":"c","entry":{"fing"#);
        std::fs::write(&path, text).unwrap();
        let mut lock = LockFile::default();
        assert_eq!(replay(&mut lock, &path), 3);
        assert_eq!(
            lock.stages["a"].fingerprint, "3",
            "the last line for a stage wins"
        );
        assert!(!lock.stages.contains_key("c"));
    }

    #[test]
    fn checkpoint_writes_the_lock_and_empties_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let lock_path = dir.path().join("p.lock");
        let mut journal = Journal::open(&path).unwrap();
        journal.append("a", &entry("1")).unwrap();
        let mut lock = LockFile {
            version: LOCK_FORMAT,
            stages: BTreeMap::new(),
        };
        replay(&mut lock, &path);
        journal.checkpoint(&lock_path, &lock).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        assert!(matches!(load(&lock_path), Loaded::Found(l) if l.stages.contains_key("a")));
    }
}
