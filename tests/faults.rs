//! Fault injection, the quick and deterministic part (scripts/faults runs the rest against the
//! monthly pipeline at scale; docs/reliability.md has both): a stage killed by SIGKILL, a
//! truncated or corrupt Parquet file, a deleted `.imba/`, a corrupt lock file, a version
//! published by a run killed before it moved `LATEST`, outputs on another file system, and a
//! file system that fills up while an output is copied onto it.

mod common;

use std::path::{Path, PathBuf};

use common::Test;

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Names in `dir` that start with a dot and are not imba's own state: leftovers of a commit.
fn hidden_leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// The OOM killer, simulated: a stage whose command SIGKILLs its own shell.
#[test]
fn a_stage_killed_by_sigkill_fails_naming_the_signal_and_commits_nothing() {
    let t = Test::new().file("data.csv", "a\n1\n").pipeline(
        r#"
vars:
  die: 0
stages:
  first:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/first.csv]
  oom:
    cmd: cat {{ inputs[0] }} > {{ outputs[0] }}; echo "die={{ die }}" >> {{ outputs[0] }}; if [ {{ die }} = 1 ]; then kill -9 $$; fi
    inputs: [out/first.csv]
    outputs: [out/oom.csv]
  after:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: [out/oom.csv]
    outputs: [out/after.csv]
"#,
    );
    t.run_ok(&[]);
    let lock_before: serde_json::Value = serde_json::from_str(&t.read("pipeline.lock")).unwrap();

    let out = t.exec(&["run", "pipeline.yaml", "--set", "die=1"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let error = out.stage_error();
    assert!(
        error.starts_with("error: stage `oom` failed: command was killed by signal 9 (SIGKILL"),
        "{}",
        out.stderr
    );
    assert_eq!(
        t.decisions(),
        pairs(&[
            ("first", "skipped"),
            ("oom", "failed"),
            ("after", "blocked")
        ])
    );
    // The half-written staging file never reached the output; the lock entry is the old one.
    assert_eq!(t.read("out/oom.csv"), "a\n1\ndie=0\n");
    assert_eq!(t.read("out/after.csv"), "a\n1\ndie=0\n");
    let lock_after: serde_json::Value = serde_json::from_str(&t.read("pipeline.lock")).unwrap();
    assert_eq!(lock_after, lock_before);
    assert!(hidden_leftovers(&t.path().join("out")).is_empty());

    // Once it stops being killed, it and its downstream run; `first` stays done.
    t.run_ok(&["--set", "die=2"]);
    assert_eq!(
        t.decisions(),
        pairs(&[("first", "skipped"), ("oom", "ran"), ("after", "ran")])
    );
    assert_eq!(t.read("out/after.csv"), "a\n1\ndie=2\n");
}

/// users.csv → `agg` (a Parquet table) → `top` (reads that Parquet).
const PARQUET_CHAIN: &str = r#"
stages:
  agg:
    uses: aggregate
    inputs: {orders: users.csv}
    outputs: {table: out/agg.parquet}
    params:
      by: [user_id]
      aggs:
        n: {count: x}
        x_max: {max: x}
  top:
    uses: aggregate
    inputs: {orders: out/agg.parquet}
    outputs: {table: out/top.parquet}
    params:
      by: [n]
      aggs:
        users: {count: user_id}
"#;

fn users_csv(users: usize) -> String {
    let mut csv = String::from("user_id,x\n");
    for user in 0..users {
        for k in 0..3 {
            csv.push_str(&format!("{user},{}\n", (user * 7 + k * 13) % 101));
        }
    }
    csv
}

#[test]
fn a_truncated_parquet_output_reruns_the_stage_that_wrote_it() {
    let t = Test::new()
        .file("users.csv", users_csv(3000))
        .pipeline(PARQUET_CHAIN);
    t.run_ok(&[]);
    let table = t.path().join("out/agg.parquet");
    let good = std::fs::read(&table).unwrap();
    std::fs::write(&table, &good[..good.len() / 2]).unwrap();

    let status = t.exec(&["status", "pipeline.yaml"]);
    assert!(
        status
            .stdout
            .contains("output out/agg.parquet was modified"),
        "{}",
        status.stdout
    );
    t.run_ok(&[]);
    // Restored byte for byte from the run cache, so `top` is cut off early.
    assert_eq!(std::fs::read(&table).unwrap(), good);
    assert_eq!(
        t.decisions(),
        pairs(&[("agg", "restored"), ("top", "skipped")])
    );
    // Without the cache (a clone that never ran it) it is computed, with the same bytes.
    std::fs::write(&table, &good[..good.len() / 2]).unwrap();
    std::fs::remove_dir_all(t.path().join(".imba/cache")).unwrap();
    t.run_ok(&[]);
    assert_eq!(std::fs::read(&table).unwrap(), good);
    assert_eq!(t.decisions(), pairs(&[("agg", "ran"), ("top", "skipped")]));
}

#[test]
fn a_corrupt_parquet_input_is_an_error_naming_the_file() {
    let t = Test::new()
        .file("users.csv", users_csv(30_000))
        .pipeline(PARQUET_CHAIN);
    t.run_ok(&[]);
    let good = std::fs::read(t.path().join("out/agg.parquet")).unwrap();
    assert!(good.len() > 20_000, "{} bytes", good.len());
    // The footer kept, the middle cut out: the footer points past the end of the data.
    let mut cut = good[..good.len() / 2].to_vec();
    cut.extend_from_slice(&good[good.len() - 2000..]);
    t.write("cut.parquet", &cut);
    t.write("truncated.parquet", &good[..good.len() / 2]);
    for file in ["cut.parquet", "truncated.parquet"] {
        t.write(
            "pipeline.yaml",
            format!(
                "stages:\n  read:\n    uses: aggregate\n    inputs: {{orders: {file}}}\n    outputs: {{table: out/read.parquet}}\n    params:\n      by: [n]\n      aggs:\n        users: {{count: user_id}}\n"
            ),
        );
        let out = t.exec(&["run", "pipeline.yaml"]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        let error = out.stage_error();
        assert!(
            error.starts_with("error: stage `read` failed: cannot read Parquet file `")
                && error.contains(file)
                && !error.contains("internal error"),
            "{file}: {}",
            out.stderr
        );
        assert!(!t.path().join("out/read.parquet").exists());
    }
}

#[test]
fn deleting_the_state_folder_reruns_nothing() {
    let t = Test::new()
        .file("users.csv", users_csv(200))
        .pipeline(PARQUET_CHAIN);
    t.run_ok(&[]);
    std::fs::remove_dir_all(t.path().join(".imba")).unwrap();
    t.run_ok(&[]);
    assert_eq!(
        t.decisions(),
        pairs(&[("agg", "skipped"), ("top", "skipped")])
    );
}

#[test]
fn a_torn_or_garbage_lock_file_reruns_everything_and_is_rewritten() {
    let t = Test::new()
        .file("users.csv", users_csv(200))
        .pipeline(PARQUET_CHAIN);
    t.run_ok(&[]);
    let lock = t.read("pipeline.lock");
    let outputs = std::fs::read(t.path().join("out/top.parquet")).unwrap();
    let torn = lock.as_bytes()[..lock.len() / 2].to_vec();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for (what, bytes) in [("torn", torn), ("garbage", garbage)] {
        t.write("pipeline.lock", &bytes);
        let out = t.run_ok(&[]);
        assert!(
            out.stderr.contains("warning: lock file `pipeline.lock`")
                && out.stderr.contains("every stage is treated as stale"),
            "{what}: {}",
            out.stderr
        );
        // Nothing is computed again: the outputs in place hold what the run cache recorded.
        assert_eq!(
            t.decisions(),
            pairs(&[("agg", "cached"), ("top", "cached")]),
            "{what}"
        );
        assert_eq!(t.read("pipeline.lock"), lock, "{what}: rewritten whole");
        assert_eq!(
            std::fs::read(t.path().join("out/top.parquet")).unwrap(),
            outputs
        );
        t.run_ok(&[]);
        assert_eq!(
            t.decisions(),
            pairs(&[("agg", "skipped"), ("top", "skipped")])
        );
    }
}

const VERSIONED: &str = r#"
stages:
  user_features:
    uses: feature
    inputs: {orders: orders.csv}
    outputs: {features: OUT/features/}
    version: auto
    params:
      entity: user_id
      groups:
        - name: orders
          from: orders
          features:
            - order_count: count(*)
            - days_mean: avg(days)
"#;

fn versions(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A run killed after it renamed its new version into place but before it wrote `LATEST` (and
/// its lock entry): the next run makes the same content, which is that version, not a copy.
#[test]
fn a_version_published_by_a_killed_run_is_adopted_not_duplicated() {
    let t = Test::new()
        .file("orders.csv", "user_id,days\n1,3\n1,5\n2,7\n")
        .pipeline(&VERSIONED.replace("OUT", "out"));
    t.run_ok(&[]);
    let lock_v1 = t.read("pipeline.lock");
    t.write("orders.csv", "user_id,days\n1,3\n1,9\n2,7\n");
    t.run_ok(&[]);
    let root = t.path().join("out/features");
    assert_eq!(versions(&root), ["LATEST", "features_v1", "features_v2"]);

    // The state such a kill leaves: v2 complete, LATEST and the lock still at v1.
    t.write("out/features/LATEST", "features_v1\n");
    t.write("pipeline.lock", &lock_v1);
    // Computed, not restored (the run cache would restore it into the same version).
    std::fs::remove_dir_all(t.path().join(".imba/cache")).unwrap();
    let out = t.run_ok(&[]);
    assert_eq!(
        t.decisions(),
        pairs(&[("user_features", "ran")]),
        "{}",
        out.stderr
    );
    assert_eq!(
        versions(&root),
        ["LATEST", "features_v1", "features_v2"],
        "no features_v3 holding features_v2's content"
    );
    assert_eq!(t.read("out/features/LATEST"), "features_v2\n");
    t.run_ok(&[]);
    assert_eq!(t.decisions(), pairs(&[("user_features", "skipped")]));
}

/// A temporary directory on another file system than the test's (where the staging is), or
/// None where there is none to use.
fn other_file_system(near: &Path) -> Option<tempfile::TempDir> {
    use std::os::unix::fs::MetadataExt;
    let here = std::fs::metadata(near).ok()?.dev();
    let shm = Path::new("/dev/shm");
    let there = std::fs::metadata(shm).ok()?.dev();
    (here != there)
        .then(|| tempfile::tempdir_in(shm).ok())
        .flatten()
}

/// A versioned output on another file system than `.imba/staging/` (another mount, a tmpfs,
/// NFS): a version cannot be renamed across, so it is copied beside the versions first.
#[test]
fn a_versioned_output_on_another_file_system_is_published() {
    let t = Test::new().file("orders.csv", "user_id,days\n1,3\n1,5\n2,7\n");
    let Some(elsewhere) = other_file_system(t.path()) else {
        eprintln!("skipped: /dev/shm is not another file system here");
        return;
    };
    let out = elsewhere.path().to_str().unwrap().to_owned();
    t.write("pipeline.yaml", VERSIONED.replace("OUT", &out));
    t.run_ok(&[]);
    let root = elsewhere.path().join("features");
    assert_eq!(versions(&root), ["LATEST", "features_v1"]);
    t.write("orders.csv", "user_id,days\n1,3\n1,9\n2,7\n");
    t.run_ok(&[]);
    assert_eq!(versions(&root), ["LATEST", "features_v1", "features_v2"]);
    assert_eq!(
        std::fs::read_to_string(root.join("LATEST")).unwrap(),
        "features_v2\n"
    );
    t.run_ok(&[]);
    assert_eq!(t.decisions(), pairs(&[("user_features", "skipped")]));
}

/// A small tmpfs mounted for the length of a test (root only); unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallFs { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// An output on a file system that fills up while the output is copied onto it: a clear error
/// naming the output, the earlier output intact, and no half-copied file left holding the space.
#[test]
fn no_space_left_while_committing_an_output_leaves_nothing_behind() {
    let Some(fs) = SmallFs::mount("256k") else {
        eprintln!("skipped: needs root and `mount -t tmpfs`");
        return;
    };
    let t = Test::new();
    let out = fs.path().join("big.bin");
    t.write(
        "pipeline.yaml",
        format!(
            "vars:\n  kib: 16\nstages:\n  write:\n    cmd: head -c {{{{ kib }}}}K /dev/zero > {{{{ outputs[0] }}}}\n    outputs: [{}]\n",
            out.display()
        ),
    );
    t.run_ok(&[]);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 16 * 1024);

    let full = t.exec(&["run", "pipeline.yaml", "--set", "kib=1024"]);
    assert_eq!(full.code, 1, "{}", full.stderr);
    let error = full.stage_error();
    assert!(
        error.contains("cannot move the output")
            && error.contains("big.bin")
            && error.contains("No space left on device"),
        "{}",
        full.stderr
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 16 * 1024);
    assert_eq!(
        hidden_leftovers(&fs.path()),
        Vec::<String>::new(),
        "the partial copy is removed"
    );
    // The space is free again: an output that fits commits.
    t.run_ok(&["--set", "kib=128"]);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 128 * 1024);
}
