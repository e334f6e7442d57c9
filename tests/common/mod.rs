//! A small builder for CLI tests: files in a temp dir, one run of `imba`, the whole output.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;

pub struct Test {
    dir: tempfile::TempDir,
    args: Vec<String>,
}

/// What one run printed, with the temp dir's path replaced by `[TMP]`.
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The first `error: stage …` line of stderr (empty when there is none).
    pub fn stage_error(&self) -> &str {
        self.stderr
            .lines()
            .find(|l| l.starts_with("error: stage"))
            .unwrap_or_default()
    }

    /// Exit code, stdout and stderr in one string, for snapshots.
    pub fn all(&self) -> String {
        format!(
            "exit: {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Test {
    pub fn new() -> Self {
        Test {
            dir: tempfile::tempdir().expect("temp dir"),
            args: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` to `path` inside the test dir, creating parent directories.
    pub fn file(self, path: &str, contents: impl AsRef<[u8]>) -> Self {
        let full = self.dir.path().join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(full, contents).expect("write file");
        self
    }

    /// `pipeline.yaml` with these contents.
    pub fn pipeline(self, yaml: &str) -> Self {
        self.file("pipeline.yaml", yaml)
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn run(&self) -> Output {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.exec(&args)
    }

    /// Runs `imba` with `args` in the test dir (the builder's own args are not used).
    pub fn exec(&self, args: &[&str]) -> Output {
        let output = Command::cargo_bin("imba")
            .expect("imba binary")
            .args(args)
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .output()
            .expect("run imba");
        self.captured(&output)
    }

    /// What a finished `imba` printed, with the test dir's path replaced by `[TMP]`.
    pub fn captured(&self, output: &std::process::Output) -> Output {
        let tmp = self.dir.path().to_string_lossy().into_owned();
        let clean = |bytes: &[u8]| String::from_utf8_lossy(bytes).replace(&tmp, "[TMP]");
        Output {
            code: output.status.code().unwrap_or(-1),
            stdout: clean(&output.stdout),
            stderr: clean(&output.stderr),
        }
    }
}

impl Test {
    /// Writes a file after the builder stage (for changes between runs).
    pub fn write(&self, path: &str, contents: impl AsRef<[u8]>) {
        let full = self.dir.path().join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(full, contents).expect("write file");
    }

    /// Reads a file of the test dir, as text.
    pub fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(path))
            .unwrap_or_else(|e| panic!("read {path}: {e}"))
    }

    /// `imba run pipeline.yaml ARGS…`, which must succeed.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let mut all = vec!["run", "pipeline.yaml"];
        all.extend_from_slice(args);
        let out = self.exec(&all);
        assert_eq!(out.code, 0, "run failed:\n{}", out.stderr);
        out
    }

    /// The decision of each stage in the latest run of `pipeline.yaml`, from its record.
    pub fn decisions(&self) -> Vec<(String, String)> {
        self.decisions_of("pipeline.yaml")
    }

    /// The latest run record of `pipeline` (`imba show --json`), paths under `[TMP]`.
    pub fn record_of(&self, pipeline: &str) -> serde_json::Value {
        let out = self.exec(&["show", pipeline, "--json"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        serde_json::from_str(&out.stdout).expect("json")
    }

    /// The decision of each stage in the latest run of `pipeline`, from its record.
    pub fn decisions_of(&self, pipeline: &str) -> Vec<(String, String)> {
        let record = self.record_of(pipeline);
        record["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_owned(),
                    s["decision"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// A command for `imba` in the test dir, for tests that need to spawn it themselves.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("imba"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1");
        command
    }
}

/// The repository root, for tests that read shipped files.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts a cluster on this machine with `scripts/SCRIPT start` (its environment extended with
/// `env`) and returns the value of the `VAR=…` line it prints. Where it cannot start, the test
/// says so and gets `None`, but under CI that is a failure: a component the project starts
/// itself is never silently skipped there.
#[allow(dead_code)]
pub fn start_cluster(script: &str, env: &[(&str, &std::ffi::OsStr)], var: &str) -> Option<String> {
    let out = std::process::Command::new(repo().join("scripts").join(script))
        .arg("start")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = stdout
        .lines()
        .find_map(|l| l.strip_prefix(var)?.strip_prefix('='))
        .map(str::to_owned);
    if value.is_none() {
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var_os("CI").is_none(),
            "scripts/{script} could not start its cluster: {why}"
        );
        eprintln!("skipping: scripts/{script} could not start its cluster: {why}");
    }
    value
}

/// The shipped monthly pipeline (with `extra` appended to its file) and its sample orders, in a
/// temp dir of their own: a clone of the repository, as far as the pipeline is concerned.
pub fn monthly(extra: &str) -> Test {
    let repo = repo();
    let mut yaml = std::fs::read_to_string(repo.join("pipelines/monthly.yaml")).unwrap();
    yaml.push_str(extra);
    Test::new().file("pipelines/monthly.yaml", yaml).file(
        "examples/instacart/orders.csv",
        std::fs::read(repo.join("examples/instacart/orders.csv")).unwrap(),
    )
}

/// Every file under `dir`: relative path → bytes.
pub fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let relative = e.path().strip_prefix(dir).unwrap().display().to_string();
            (relative, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// Asserts a snapshot (named, in the calling test's `tests/snapshots/`) of a run's output with
/// what changes between runs masked: the run id as `[RUN]`, durations as `[TIME]`, a port on
/// 127.0.0.1 as `[PORT]`.
#[macro_export]
macro_rules! assert_run_snapshot {
    ($name:expr, $text:expr) => {
        insta::with_settings!({filters => vec![
            (r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}", "[RUN]"),
            (r"\d+\.\d{2}s", "[TIME]"),
            (r"127\.0\.0\.1:\d+", "127.0.0.1:[PORT]"),
        ]}, {
            insta::assert_snapshot!($name, $text)
        })
    };
}
