//! Versioned outputs (`version: auto`): each run whose content differs from the latest version
//! becomes a new, immutable folder `NAME_vN/` under the output, with its `_meta.json`; the
//! pointer `NAME/LATEST` moves once the version is complete.
//!
//! A version is published by renaming its finished staging folder to `NAME_vN`, which fails when
//! another run took that number first, and is then tried with the next: two runs never share a
//! number, and a version is never seen half-written. An existing version is never written again.
//! With `keep: K`, versions older than the latest K move to `archive/NAME_vN/` beside the output;
//! nothing is deleted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::model::Versioning;
use crate::store::hash::{hash_file_contents, ContentHash, StatCache};

/// The file in each version holding what it is.
pub const META: &str = "_meta.json";
/// The file naming the latest version.
pub const LATEST: &str = "LATEST";

/// One file of a version, as its metadata records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetaFile {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// What `_meta.json` says of a version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub version: u32,
    pub name: String,
    pub created_at: String,
    pub pipeline: String,
    pub stage: String,
    pub fingerprint: String,
    /// The hash of the version's files (without this metadata): equal content, equal hash.
    pub content_hash: String,
    pub files: Vec<MetaFile>,
    /// The stage's inputs with their hashes, when the version was made.
    pub inputs: Json,
    /// The definitions (the stage's params), and their hash over a canonical encoding.
    pub params: Json,
    #[serde(default)]
    pub definitions_hash: String,
    /// What the stage reported (a feature stage: its features and their descriptions).
    #[serde(default)]
    pub report: Json,
    /// The pipeline's vars when it was made (which month, which `out`; a secret-looking
    /// name's value masked).
    #[serde(default, skip_serializing_if = "Json::is_null")]
    pub vars: Json,
    /// Per table file: rows, and per column its dtype, nulls, mean, min and max.
    #[serde(default)]
    pub tables: Json,
    pub imba_version: String,
    #[serde(default)]
    pub git_commit: Option<String>,
}

/// How a versioned output was committed.
#[derive(Clone, Debug)]
pub struct Committed {
    pub version: u32,
    /// The content equalled the latest version's, which stays the latest.
    pub reused: bool,
    pub dir: PathBuf,
}

/// `features` for an output `out/features/`.
pub fn base_name(root: &Path) -> String {
    root.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "output".to_owned())
}

/// The N of `{base}_vN` (N ≥ 1).
pub fn parse_version(name: &str, base: &str) -> Option<u32> {
    name.strip_prefix(base)?
        .strip_prefix("_v")?
        .parse()
        .ok()
        .filter(|v| *v > 0)
}

/// The versions in place under `root`, oldest first.
pub fn list(root: &Path) -> Vec<(u32, PathBuf)> {
    list_in(root, &base_name(root))
}

/// The `BASE_vN` folders in `dir`, oldest first.
pub fn list_in(dir: &Path, base: &str) -> Vec<(u32, PathBuf)> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    parse_version(&name, base).map(|v| (v, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
}

/// Where older versions go: `archive/` beside the output.
pub fn archive_dir(root: &Path) -> PathBuf {
    root.parent().unwrap_or(root).join("archive")
}

/// The latest version, as `LATEST` names it.
pub fn latest(root: &Path) -> Option<(u32, PathBuf)> {
    let name = std::fs::read_to_string(root.join(LATEST)).ok()?;
    let name = name.trim();
    let version = parse_version(name, &base_name(root))?;
    let dir = root.join(name);
    dir.is_dir().then_some((version, dir))
}

pub fn read_meta(dir: &Path) -> Result<Meta, String> {
    let path = dir.join(META);
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} is not valid: {e}", path.display()))
}

/// The files of a folder, relative, with sizes and BLAKE3, `_meta.json` left out.
pub(super) fn files_of(dir: &Path) -> std::io::Result<Vec<MetaFile>> {
    files_in(dir, Some(META))
}

/// The files under `dir` (but `skip`), sorted, each with its relative path, size and BLAKE3:
/// what a version's metadata and an S3 prefix's manifest list.
pub(crate) fn files_in(dir: &Path, skip: Option<&str>) -> std::io::Result<Vec<MetaFile>> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.map_err(std::io::Error::other)?;
        if !entry.file_type().is_file() {
            continue;
        }
        let relative = entry
            .path()
            .strip_prefix(dir)
            .unwrap_or(entry.path())
            .to_string_lossy()
            .replace('\\', "/");
        if Some(relative.as_str()) == skip {
            continue;
        }
        let size = entry.metadata().map_err(std::io::Error::other)?.len();
        files.push(MetaFile {
            path: relative,
            size,
            blake3: hash_file_contents(entry.path(), size)?,
        });
    }
    Ok(files)
}

pub(super) fn content_hash(files: &[MetaFile]) -> String {
    let mut hasher = blake3::Hasher::new();
    for file in files {
        hasher.update(file.path.as_bytes());
        hasher.update(b"\0");
        hasher.update(file.size.to_string().as_bytes());
        hasher.update(b"\0");
        hasher.update(file.blake3.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().to_hex().to_string()
}

/// Checks that a version's files are still what its metadata says.
pub fn verify(dir: &Path) -> Result<Meta, String> {
    let meta = read_meta(dir)?;
    let files = files_of(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    if files != meta.files {
        let changed = meta
            .files
            .iter()
            .find(|f| !files.contains(f))
            .map(|f| f.path.clone())
            .or_else(|| {
                files
                    .iter()
                    .find(|f| !meta.files.contains(f))
                    .map(|f| f.path.clone())
            })
            .unwrap_or_default();
        return Err(format!(
            "version {} was modified after it was written (`{changed}` differs from its {META}); versions are immutable: restore it, or move it away so that a new version is made",
            dir.display()
        ));
    }
    Ok(meta)
}

/// What the metadata of a new version holds besides its files and number.
pub struct MetaInput {
    pub pipeline: String,
    pub stage: String,
    pub fingerprint: String,
    pub inputs: Json,
    pub params: Json,
    pub report: Json,
    pub workdir: PathBuf,
    /// The pipeline's vars, as the run record keeps them.
    pub vars: Json,
    /// The metadata this content had when it was computed (a restore from the run cache): a
    /// new version of the same content keeps it, under its own number, so that a version
    /// restored into an empty output is byte for byte the one computed.
    pub restored: Option<Meta>,
}

/// Commits the finished folder `staged` as a version under `root`: the latest version again when
/// its content is the same, else a new one.
pub fn commit(
    staged: &Path,
    root: &Path,
    versioning: &Versioning,
    input: MetaInput,
) -> Result<Committed, String> {
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let files = files_of(staged).map_err(|e| io("cannot read the staged output", e))?;
    let content = content_hash(&files);
    if let Some((version, dir)) = latest(root) {
        let meta = verify(&dir)?;
        if meta.content_hash == content {
            return Ok(Committed {
                version,
                reused: true,
                dir,
            });
        }
    }
    std::fs::create_dir_all(root)
        .map_err(|e| io(&format!("cannot create {}", root.display()), e))?;
    // One commit at a time per output, across processes: numbering, LATEST and retention move
    // together. (Publishing by an exclusive rename keeps numbers unique even without it.)
    let _held = Held::lock(root).map_err(|e| io(&format!("cannot lock {}", root.display()), e))?;
    let base = base_name(root);
    // The same content as a version in place is that version, never a duplicate: LATEST moves
    // back to it (a param changed and changed back, a restore from the run cache), or on to it
    // (a run killed after publishing its version but before moving LATEST). Archived versions
    // are retired and do not count.
    let same = list(root).into_iter().rev().find(|(_, dir)| {
        read_meta(dir).is_ok_and(|m| m.content_hash == content) && verify(dir).is_ok()
    });
    if let Some((version, dir)) = same {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        crate::store::fs::write_atomic(
            &root.join(LATEST),
            format!("{}\n", name.unwrap_or_default()).as_bytes(),
        )
        .map_err(|e| io("cannot move LATEST", e))?;
        if let Some(keep) = versioning.keep {
            retire(root, keep).map_err(|e| io("cannot archive old versions", e))?;
        }
        return Ok(Committed {
            version,
            reused: false,
            dir,
        });
    }
    let tables = describe_tables(staged, &files);
    let git_commit = git_commit(&input.workdir);
    // What is renamed into place: the staged folder, or its copy beside the versions when the
    // output is on another file system than the staging (a rename cannot cross them).
    let mut source = staged.to_path_buf();
    let mut copied: Option<PathBuf> = None;
    loop {
        let archived = list_in(&archive_dir(root), &base)
            .last()
            .map_or(0, |(v, _)| *v);
        let next = list(root).last().map_or(0, |(v, _)| *v).max(archived) + 1;
        let meta = new_meta(&input, next, &base, &content, &files, &tables, &git_commit);
        if let Err(e) = write_meta(&source, &meta) {
            if let Some(copy) = &copied {
                crate::store::fs::remove_any(copy);
            }
            return Err(e);
        }
        let target = root.join(&meta.name);
        match std::fs::rename(&source, &target) {
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) && copied.is_none() => {
                // A hidden name that no listing of versions picks up, on the output's file
                // system; published by the same exclusive rename as above.
                let local = root.join(format!(".{base}.imba-new-{}", std::process::id()));
                crate::store::fs::remove_any(&local);
                if let Err(e) = crate::store::fs::copy_recursive(&source, &local) {
                    crate::store::fs::remove_any(&local);
                    return Err(io(
                        &format!("cannot copy the new version to {}", root.display()),
                        e,
                    ));
                }
                source = local.clone();
                copied = Some(local);
                continue;
            }
            Ok(()) => {
                crate::store::fs::write_atomic(
                    &root.join(LATEST),
                    format!("{}\n", meta.name).as_bytes(),
                )
                .map_err(|e| io("cannot move LATEST", e))?;
                if let Some(keep) = versioning.keep {
                    retire(root, keep).map_err(|e| io("cannot archive old versions", e))?;
                }
                return Ok(Committed {
                    version: next,
                    reused: false,
                    dir: target,
                });
            }
            // Another run published this number first: take the next.
            Err(e) if target.exists() => {
                tracing::debug!(version = next, error = %e, "version taken, trying the next");
                continue;
            }
            Err(e) => {
                if let Some(copy) = &copied {
                    crate::store::fs::remove_any(copy);
                }
                return Err(io(&format!("cannot publish {}", target.display()), e));
            }
        }
    }
}

pub(super) fn new_meta(
    input: &MetaInput,
    version: u32,
    base: &str,
    content: &str,
    files: &[MetaFile],
    tables: &Json,
    git_commit: &Option<String>,
) -> Meta {
    if let Some(then) = input
        .restored
        .as_ref()
        .filter(|m| m.content_hash == content && m.files == files)
    {
        return Meta {
            version,
            name: format!("{base}_v{version}"),
            ..then.clone()
        };
    }
    Meta {
        version,
        name: format!("{base}_v{version}"),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        pipeline: input.pipeline.clone(),
        stage: input.stage.clone(),
        fingerprint: input.fingerprint.clone(),
        content_hash: content.to_owned(),
        files: files.to_vec(),
        inputs: input.inputs.clone(),
        params: input.params.clone(),
        definitions_hash: crate::store::hash::fingerprint(&input.params),
        report: input.report.clone(),
        vars: input.vars.clone(),
        tables: tables.clone(),
        imba_version: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: git_commit.clone(),
    }
}

pub(super) fn write_meta(staged: &Path, meta: &Meta) -> Result<(), String> {
    let mut text = serde_json::to_vec_pretty(meta).map_err(|e| e.to_string())?;
    text.push(b'\n');
    std::fs::write(staged.join(META), &text)
        .map_err(|e| format!("cannot write the version's metadata: {e}"))
}

/// An exclusive `flock` on the output directory itself (no lock file among the versions),
/// released when dropped or when the process dies.
struct Held {
    _file: std::fs::File,
}

impl Held {
    fn lock(dir: &Path) -> std::io::Result<Held> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(dir)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Held { _file: file })
    }
}

/// Moves every version but the latest `keep` to `archive/`: the one LATEST names, and the
/// newest `keep - 1` of the others.
fn retire(root: &Path, keep: u32) -> std::io::Result<()> {
    let pointed = latest(root).map(|(v, _)| v);
    let versions: Vec<(u32, PathBuf)> = list(root)
        .into_iter()
        .filter(|(v, _)| Some(*v) != pointed)
        .collect();
    let others = keep.max(1) as usize - usize::from(pointed.is_some());
    let excess = versions.len().saturating_sub(others);
    if excess == 0 {
        return Ok(());
    }
    let archive = archive_dir(root);
    std::fs::create_dir_all(&archive)?;
    for (_, dir) in &versions[..excess] {
        if let Some(name) = dir.file_name() {
            std::fs::rename(dir, archive.join(name))?;
        }
    }
    Ok(())
}

/// Every version of an output, in place or archived, oldest first, with its metadata.
pub fn all_versions(root: &Path) -> Vec<(u32, PathBuf, bool)> {
    let base = base_name(root);
    let mut all: Vec<(u32, PathBuf, bool)> = list(root)
        .into_iter()
        .map(|(v, p)| (v, p, false))
        .chain(
            list_in(&archive_dir(root), &base)
                .into_iter()
                .map(|(v, p)| (v, p, true)),
        )
        .collect();
    all.sort_by_key(|(v, _, _)| *v);
    all
}

/// A version named as `3`, `v3` or `features_v3`.
pub fn find_version(root: &Path, name: &str) -> Result<(u32, PathBuf), String> {
    let base = base_name(root);
    let number = name
        .strip_prefix(&format!("{base}_v"))
        .or_else(|| name.strip_prefix('v'))
        .unwrap_or(name)
        .parse::<u32>()
        .map_err(|_| {
            format!("`{name}` is not a version: expected e.g. `3`, `v3` or `{base}_v3`")
        })?;
    let all = all_versions(root);
    all.iter()
        .find(|(v, _, _)| *v == number)
        .map(|(v, p, _)| (*v, p.clone()))
        .ok_or_else(|| {
            let known: Vec<String> = all.iter().map(|(v, _, _)| format!("v{v}")).collect();
            format!(
                "there is no version {number} of {}; there are: {}",
                root.display(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )
        })
}

/// The hash of a versioned output as status compares it: its latest version's folder.
pub fn current_hash(root: &Path, cache: &StatCache) -> std::io::Result<Option<ContentHash>> {
    match latest(root) {
        Some((_, dir)) => cache.hash_path(&dir),
        None => Ok(None),
    }
}

/// Rows and per-column statistics of each table file of a version.
pub(super) fn describe_tables(dir: &Path, files: &[MetaFile]) -> Json {
    let mut tables = serde_json::Map::new();
    for file in files {
        let lower = file.path.to_ascii_lowercase();
        if lower.ends_with(".parquet") || lower.ends_with(".csv") {
            if let Ok(summary) = imba_stages::io::table::describe(&dir.join(&file.path)) {
                tables.insert(file.path.clone(), summary);
            }
        }
    }
    Json::Object(tables)
}

/// The commit checked out in the git repository holding `dir`, if any (read from `.git`, no
/// `git` needed).
pub(super) fn git_commit(dir: &Path) -> Option<String> {
    let mut at = Some(dir);
    while let Some(here) = at {
        let git = here.join(".git");
        if git.is_dir() {
            let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
            let head = head.trim();
            return match head.strip_prefix("ref: ") {
                None => Some(head.to_owned()),
                Some(reference) => std::fs::read_to_string(git.join(reference))
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .or_else(|| packed_ref(&git, reference)),
            };
        }
        at = here.parent();
    }
    None
}

fn packed_ref(git: &Path, reference: &str) -> Option<String> {
    let packed = std::fs::read_to_string(git.join("packed-refs")).ok()?;
    packed.lines().find_map(|line| {
        let (hash, name) = line.split_once(' ')?;
        (name == reference).then(|| hash.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> MetaInput {
        MetaInput {
            pipeline: "p.yaml".into(),
            stage: "s".into(),
            fingerprint: "f".into(),
            inputs: Json::Null,
            params: Json::Null,
            report: Json::Null,
            workdir: PathBuf::from("/"),
            vars: Json::Null,
            restored: None,
        }
    }

    fn staged(dir: &Path, name: &str, content: &str) -> PathBuf {
        let path = dir.join("staging").join(name);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("table.csv"), content).unwrap();
        path
    }

    /// Runs committing different content to the same output at once each get their own number,
    /// and every version is complete.
    #[test]
    fn concurrent_commits_never_share_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out/features");
        let committed: Vec<u32> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let stage = staged(dir.path(), &format!("run{i}"), &format!("x\n{i}\n"));
                    let root = root.clone();
                    scope.spawn(move || {
                        commit(&stage, &root, &Versioning { keep: None }, input())
                            .unwrap()
                            .version
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut numbers = committed.clone();
        numbers.sort();
        assert_eq!(numbers, (1..=8).collect::<Vec<_>>());
        for (version, path) in list(&root) {
            let meta = verify(&path).unwrap();
            assert_eq!(meta.version, version);
            assert_eq!(meta.name, format!("features_v{version}"));
        }
        let (latest, _) = latest(&root).unwrap();
        assert!(committed.contains(&latest));
    }

    #[test]
    fn the_same_content_is_the_same_version_and_a_changed_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("features");
        let none = Versioning { keep: None };
        let first = commit(&staged(dir.path(), "a", "x\n1\n"), &root, &none, input()).unwrap();
        let again = commit(&staged(dir.path(), "b", "x\n1\n"), &root, &none, input()).unwrap();
        assert_eq!((first.version, first.reused), (1, false));
        assert_eq!((again.version, again.reused), (1, true));
        std::fs::write(root.join("features_v1/table.csv"), "x\n2\n").unwrap();
        let error = commit(&staged(dir.path(), "c", "x\n1\n"), &root, &none, input()).unwrap_err();
        assert!(
            error.starts_with("version ")
                && error.contains(
                    "was modified after it was written (`table.csv` differs from its _meta.json)"
                ),
            "{error}"
        );
    }

    #[test]
    fn keep_moves_older_versions_to_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out/features");
        let keep = Versioning { keep: Some(2) };
        for i in 1..=4 {
            let version = commit(
                &staged(dir.path(), &i.to_string(), &format!("x\n{i}\n")),
                &root,
                &keep,
                input(),
            )
            .unwrap()
            .version;
            assert_eq!(version, i);
        }
        let names = |path: &Path| -> Vec<u32> { list(path).into_iter().map(|(v, _)| v).collect() };
        assert_eq!(names(&root), [3, 4]);
        let archived: Vec<u32> = list_in(&archive_dir(&root), "features")
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        assert_eq!(archived, [1, 2]);
        assert_eq!(
            std::fs::read_to_string(root.join(LATEST)).unwrap(),
            "features_v4\n"
        );
        // Numbers keep counting past the archived ones, even with nothing left in place.
        std::fs::remove_dir_all(root.join("features_v3")).unwrap();
        std::fs::remove_dir_all(root.join("features_v4")).unwrap();
        std::fs::remove_file(root.join(LATEST)).unwrap();
        std::fs::rename(
            archive_dir(&root).join("features_v2"),
            root.join("features_v2"),
        )
        .unwrap();
        std::fs::remove_dir_all(root.join("features_v2")).unwrap();
        let next = commit(&staged(dir.path(), "5", "x\n5\n"), &root, &keep, input()).unwrap();
        assert_eq!(next.version, 2, "the archive still holds v1 only");
    }
}
