//! `imba run` and `imba status`: skipping, early cutoff, parallelism, atomic outputs, failures,
//! concurrent runs, kill -9, run records.

mod common;

use std::time::{Duration, Instant};

use common::Test;
use insta::assert_snapshot;

/// raw.csv → count (lines of raw) → report; raw.csv → copy.
const CHAIN: &str = r#"
stages:
  count:
    cmd: wc -l < {{ inputs.raw }} | tr -d ' ' > {{ outputs.n }}
    inputs: {raw: data/raw.csv}
    outputs: {n: out/count.txt}
  report:
    cmd: echo "lines=$(cat {{ inputs[0] }})" > {{ outputs[0] }}
    inputs: [out/count.txt]
    outputs: [out/report.txt]
  copy:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    params: {k: 1}
    inputs: [data/raw.csv]
    outputs: [out/copy.csv]
"#;

fn chain() -> Test {
    Test::new().file("data/raw.csv", "a\nb\n").pipeline(CHAIN)
}

/// `imba run pipeline.yaml` in the background, for tests that interrupt or race it.
fn spawn_run(t: &Test, stderr: std::process::Stdio) -> std::process::Child {
    t.command(&["run", "pipeline.yaml"])
        .stderr(stderr)
        .spawn()
        .expect("spawn imba")
}

/// Polls `done` until it holds; fails naming `what` after 10 s (a bound, never the assertion).
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fails with every decision shown unless `stage` had `decision`.
fn assert_decision(decisions: &[(String, String)], stage: &str, decision: &str) {
    assert!(
        decisions.iter().any(|(s, d)| s == stage && d == decision),
        "expected {stage}: {decision} in {decisions:?}"
    );
}

fn ran(t: &Test) -> Vec<String> {
    t.decisions()
        .into_iter()
        .filter(|(_, d)| d == "ran")
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn first_run_runs_everything_and_the_second_nothing() {
    let t = chain();
    t.run_ok(&[]);
    assert_eq!(ran(&t), ["count", "report", "copy"]);
    assert_eq!(t.read("out/report.txt"), "lines=2\n");
    assert_eq!(t.read("out/copy.csv"), "a\nb\n");
    t.run_ok(&[]);
    assert!(ran(&t).is_empty(), "{:?}", t.decisions());
}

#[test]
fn touching_a_file_without_changing_it_reruns_nothing() {
    let t = chain();
    t.run_ok(&[]);
    std::thread::sleep(Duration::from_millis(20));
    t.write("data/raw.csv", "a\nb\n");
    t.run_ok(&[]);
    assert!(ran(&t).is_empty(), "{:?}", t.decisions());
}

#[test]
fn changing_an_input_reruns_exactly_its_downstream() {
    let t = chain();
    t.run_ok(&[]);
    t.write("data/raw.csv", "a\nb\nc\n");
    t.run_ok(&[]);
    assert_eq!(ran(&t), ["count", "report", "copy"]);
    assert_eq!(t.read("out/report.txt"), "lines=3\n");
    // A change that only `copy` sees.
    t.write(
        "pipeline.yaml",
        CHAIN.replace("params: {k: 1}", "params: {k: 2}"),
    );
    t.run_ok(&[]);
    assert_eq!(ran(&t), ["copy"]);
}

#[test]
fn early_cutoff_when_outputs_come_out_identical() {
    let t = chain();
    t.run_ok(&[]);
    // Same number of lines: `count` re-runs and writes the same bytes, so `report` does not.
    t.write("data/raw.csv", "x\ny\n");
    t.run_ok(&[]);
    let decisions = t.decisions();
    assert_decision(&decisions, "count", "ran");
    assert_decision(&decisions, "report", "skipped");
}

#[test]
fn status_says_why() {
    let t = chain();
    let never = t.exec(&["status", "pipeline.yaml"]);
    t.run_ok(&[]);
    let fresh = t.exec(&["status", "pipeline.yaml"]);
    t.write("data/raw.csv", "a\n");
    t.write("out/copy.csv", "tampered\n");
    std::fs::remove_file(t.path().join("out/report.txt")).unwrap();
    t.write(
        "pipeline.yaml",
        CHAIN.replace("params: {k: 1}", "params: {k: 2.5}"),
    );
    let changed = t.exec(&["status", "pipeline.yaml"]);
    let json = t.exec(&["status", "pipeline.yaml", "--json"]);
    let dag = t.exec(&["dag", "pipeline.yaml", "--status"]);
    assert_snapshot!(format!(
        "{}\n{}\n{}\n{}\n{}",
        never.all(),
        fresh.all(),
        changed.all(),
        json.all(),
        dag.all()
    ));
}

#[test]
fn dry_run_changes_nothing() {
    let t = chain();
    let out = t.run_ok(&["--dry-run"]);
    assert_snapshot!(out.all());
    assert!(!t.path().join("out").exists());
    assert!(!t.path().join("pipeline.lock").exists());
}

#[test]
fn stage_selection_downstream_and_force() {
    let t = chain();
    t.run_ok(&["--stage", "count"]);
    assert_eq!(ran(&t), ["count"]);
    t.run_ok(&["--stage", "report"]);
    assert_eq!(ran(&t), ["report"]);
    t.run_ok(&["--stage", "count", "--force"]);
    assert_eq!(ran(&t), ["count"]);
    t.run_ok(&["--stage", "count", "--downstream", "--force"]);
    assert_eq!(ran(&t), ["count", "report"]);
    t.run_ok(&["--force"]);
    assert_eq!(ran(&t), ["count", "report", "copy"]);
    let unknown = t.exec(&["run", "pipeline.yaml", "--stage", "cuont"]);
    assert_eq!(unknown.code, 2);
    assert_snapshot!(unknown.all());
}

#[test]
fn independent_stages_run_in_parallel() {
    let t = Test::new().pipeline("stages:\n  a:\n    cmd: sleep 1 && echo a > {{ outputs[0] }}\n    outputs: [a.txt]\n  b:\n    cmd: sleep 1 && echo b > {{ outputs[0] }}\n    outputs: [b.txt]\n");
    let start = Instant::now();
    t.run_ok(&["-j", "2"]);
    let took = start.elapsed();
    // Serially this takes 2 s; in parallel about 1 s plus imba's start-up.
    assert!(took < Duration::from_millis(1800), "took {took:?}");
}

#[test]
fn a_failing_stage_keeps_earlier_outputs_and_the_lock() {
    let t = chain();
    t.run_ok(&[]);
    let lock = t.read("pipeline.lock");
    t.write("data/raw.csv", "a\nb\nc\n");
    t.write(
        "pipeline.yaml",
        CHAIN.replace(
            "wc -l < {{ inputs.raw }}",
            "echo boom >&2; exit 3; wc -l < {{ inputs.raw }}",
        ),
    );
    let out = t.exec(&["run", "pipeline.yaml", "-j", "1"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("stage `count` failed: command failed with exit status 3"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("boom"),
        "the tail of stderr is shown: {}",
        out.stderr
    );
    assert_eq!(
        t.read("out/count.txt"),
        "2\n",
        "the earlier output is intact"
    );
    assert_eq!(t.read("out/report.txt"), "lines=2\n");
    let decisions = t.decisions();
    assert_decision(&decisions, "report", "blocked");
    // `copy` ran (or was cancelled before starting); the lock changed only for what succeeded.
    let new_lock: serde_json::Value = serde_json::from_str(&t.read("pipeline.lock")).unwrap();
    let old_lock: serde_json::Value = serde_json::from_str(&lock).unwrap();
    assert_eq!(new_lock["stages"]["count"], old_lock["stages"]["count"]);
    assert_eq!(new_lock["stages"]["report"], old_lock["stages"]["report"]);
}

#[test]
fn keep_going_finishes_the_other_branches() {
    let t = Test::new().pipeline("stages:\n  bad:\n    cmd: exit 1\n    outputs: [bad.txt]\n  after_bad:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [bad.txt]\n    outputs: [after.txt]\n  good:\n    cmd: sleep 0.3 && echo ok > {{ outputs[0] }}\n    outputs: [good.txt]\n");
    let out = t.exec(&["run", "pipeline.yaml", "--keep-going", "-j", "2"]);
    assert_eq!(out.code, 1);
    assert_eq!(t.read("good.txt"), "ok\n");
    let decisions = t.decisions();
    assert_decision(&decisions, "after_bad", "blocked");
    assert_decision(&decisions, "good", "ran");
}

#[test]
fn without_keep_going_a_failure_cancels_running_stages() {
    let t = Test::new().pipeline("stages:\n  bad:\n    cmd: sleep 0.2; exit 1\n    outputs: [bad.txt]\n  slow:\n    cmd: sleep 20 && echo late > {{ outputs[0] }}\n    outputs: [slow.txt]\n");
    let start = Instant::now();
    let out = t.exec(&["run", "pipeline.yaml", "-j", "2"]);
    assert_eq!(out.code, 1);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the slow stage was stopped"
    );
    assert!(!t.path().join("slow.txt").exists());
    let decisions = t.decisions();
    assert_decision(&decisions, "slow", "cancelled");
}

#[test]
fn failures_name_what_went_wrong() {
    let t = Test::new()
        .file("blocker", "a file where a directory should be")
        .pipeline("stages:\n  missing_cmd:\n    cmd: no-such-command-imba-test\n    outputs: [a.txt]\n  forgot_output:\n    cmd: echo hi > elsewhere.txt\n    outputs: [b.txt]\n  unwritable:\n    cmd: echo x > {{ outputs[0] }}\n    outputs: [blocker/c.txt]\n");
    let out = t.exec(&["run", "pipeline.yaml", "--keep-going", "-j", "1"]);
    assert_eq!(out.code, 1);
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    insta::with_settings!({filters => vec![
        (r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}", "[RUN]"),
        (r"\d+\.\d{2}s", "[TIME]"),
    ]}, {
        assert_snapshot!(errors.join("\n").replace(t.path().to_str().unwrap(), "[TMP]"));
    });
    assert!(
        out.stderr.contains("not found"),
        "sh says the command is missing: {}",
        out.stderr
    );
}

#[test]
fn a_corrupt_lock_reruns_with_a_warning_and_a_newer_one_is_refused() {
    let t = chain();
    t.run_ok(&[]);
    t.write("pipeline.lock", "{ this is not json");
    let out = t.run_ok(&[]);
    assert!(
        out.stderr
            .contains("warning: lock file `pipeline.lock` is not valid JSON"),
        "{}",
        out.stderr
    );
    // Every stage is stale, and none is computed: the outputs hold what the run cache recorded.
    assert!(ran(&t).is_empty(), "{}", out.stderr);
    assert!(out.stderr.contains("0 ran, 3 up to date"), "{}", out.stderr);
    t.write("pipeline.lock", r#"{"version": 9, "stages": {}}"#);
    let newer = t.exec(&["run", "pipeline.yaml"]);
    assert_eq!(newer.code, 2);
    assert_snapshot!(newer.all());
}

#[test]
fn a_second_run_waits_for_the_first() {
    let t = Test::new().pipeline("stages:\n  slow:\n    cmd: sleep 1.5 && echo done > {{ outputs[0] }}\n    outputs: [slow.txt]\n");
    let mut first = spawn_run(&t, std::process::Stdio::null());
    // Wait until the first run holds the lock (its pid is written into it).
    let lock = t.path().join(".imba/run.lock");
    wait_until("the first run takes the lock", || {
        std::fs::read_to_string(&lock).is_ok_and(|s| !s.trim().is_empty())
    });
    let refused = t.exec(&["run", "pipeline.yaml", "--no-wait"]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("another imba run holds the lock"),
        "{}",
        refused.stderr
    );
    let second = t.exec(&["run", "pipeline.yaml"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        second.stderr.contains("waiting for another imba run"),
        "{}",
        second.stderr
    );
    assert!(first.wait().unwrap().success());
    assert_eq!(t.read("slow.txt"), "done\n");
    assert!(ran(&t).is_empty(), "the second run found everything done");
}

#[test]
fn kill_9_mid_run_then_rerun_finishes_the_job() {
    let t = Test::new().pipeline("stages:\n  fast:\n    cmd: echo fast > {{ outputs[0] }}\n    outputs: [fast.txt]\n  slow:\n    cmd: sleep 30 && echo slow > {{ outputs[0] }}\n    inputs: [fast.txt]\n    outputs: [slow.txt]\n");
    let mut child = spawn_run(&t, std::process::Stdio::null());
    // A committed stage is in the run's journal at once (the lock file is rewritten at the end).
    let journal = t.path().join(".imba/journal");
    let committed = || {
        std::fs::read_dir(&journal)
            .map(|entries| {
                entries.flatten().any(|e| {
                    std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .contains("\"fast\"")
                })
            })
            .unwrap_or(false)
    };
    wait_until("`fast` commits", committed);
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The orphaned `sleep 30` of the killed run still runs; it cannot touch slow.txt, which only
    // its staging copy would have held.
    assert!(!t.path().join("slow.txt").exists());
    t.write(
        "pipeline.yaml",
        t.read("pipeline.yaml").replace("sleep 30", "sleep 0.1"),
    );
    t.run_ok(&[]);
    let decisions = t.decisions();
    assert_eq!(
        decisions,
        [
            ("fast".to_owned(), "skipped".to_owned()),
            ("slow".to_owned(), "ran".to_owned())
        ]
    );
    assert_eq!(t.read("slow.txt"), "slow\n");
}

#[test]
fn runs_are_recorded_and_listed() {
    let t = chain();
    t.run_ok(&[]);
    t.run_ok(&[]);
    let log = t.exec(&["log", "pipeline.yaml"]);
    assert_eq!(log.code, 0);
    let lines: Vec<&str> = log.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", log.stdout);
    assert!(
        lines[1].contains(" ok ") && lines[1].contains("   0    3 "),
        "newest first: {}",
        log.stdout
    );
    let logs = std::fs::read_dir(t.path().join(".imba/logs"))
        .unwrap()
        .count();
    assert_eq!(logs, 1, "one log folder per run that ran a stage");
}

#[test]
fn directory_outputs_are_replaced_whole() {
    let t = Test::new()
        .file("data/raw.csv", "1\n2\n3\n")
        .pipeline("vars:\n  n: 2\nstages:\n  split:\n    cmd: split -l {{ n }} {{ inputs[0] }} {{ outputs.parts }}/part-\n    inputs: [data/raw.csv]\n    outputs: {parts: out/parts/}\n  count:\n    cmd: cat {{ inputs[0] }}/* | wc -l | tr -d ' ' > {{ outputs[0] }}\n    inputs: [out/parts/]\n    outputs: [out/n.txt]\n");
    t.run_ok(&[]);
    let names = |t: &Test| {
        let mut n: Vec<String> = std::fs::read_dir(t.path().join("out/parts"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&t), ["part-aa", "part-ab"]);
    t.run_ok(&["--set", "n=1"]);
    assert_eq!(names(&t), ["part-aa", "part-ab", "part-ac"]);
    // The directory changed, so `count` re-ran; it counted the same lines.
    assert_eq!(t.read("out/n.txt"), "3\n");
    assert_eq!(ran(&t), ["split", "count"]);
    let record: serde_json::Value =
        serde_json::from_str(&t.exec(&["show", "pipeline.yaml", "--json"]).stdout).unwrap();
    assert_eq!(record["stages"][1]["unchanged"], true);
}

#[test]
fn ctrl_c_cancels_cleanly_and_exits_130() {
    let t = Test::new().pipeline("stages:\n  slow:\n    cmd: echo old > {{ outputs[0] }} && sleep 30\n    outputs: [slow.txt]\n");
    t.write("slow.txt", "earlier\n");
    let child = spawn_run(&t, std::process::Stdio::piped());
    // Wait until the stage's command is running (its staging output exists).
    let staging = t.path().join(".imba/staging");
    wait_until("the stage starts", || walk_has_file(&staging, "slow.txt"));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let output = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the stage was stopped"
    );
    assert_eq!(
        output.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        t.read("slow.txt"),
        "earlier\n",
        "the earlier output is intact"
    );
    assert!(!t.path().join("pipeline.lock").exists() || !t.read("pipeline.lock").contains("slow"));
}

fn walk_has_file(dir: &std::path::Path, name: &str) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().any(|e| {
                let path = e.path();
                if path.is_dir() {
                    walk_has_file(&path, name)
                } else {
                    path.file_name().is_some_and(|n| n == name)
                }
            })
        })
        .unwrap_or(false)
}

#[test]
fn status_after_a_crash_counts_what_was_committed() {
    let t = Test::new().pipeline("stages:\n  fast:\n    cmd: echo fast > {{ outputs[0] }}\n    outputs: [fast.txt]\n  slow:\n    cmd: sleep 30 && echo slow > {{ outputs[0] }}\n    inputs: [fast.txt]\n    outputs: [slow.txt]\n");
    let mut child = spawn_run(&t, std::process::Stdio::null());
    // `slow` starts (its log appears) only after `fast` committed.
    wait_until("`slow` starts", || {
        walk_has_file(&t.path().join(".imba/logs"), "slow.err")
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let status = t.exec(&["status", "pipeline.yaml"]);
    assert_eq!(
        status.stdout,
        "slow\n  - never run\n1 of 2 stages are stale\n"
    );
}

#[test]
fn files_of_a_committed_directory_are_in_the_stat_cache() {
    let t = Test::new().pipeline("stages:\n  parts:\n    cmd: echo a > {{ outputs[0] }}/a && echo b > {{ outputs[0] }}/b\n    outputs: [out/parts/]\n");
    t.run_ok(&[]);
    let cache = t.read(".imba/stat-cache.json");
    for file in ["out/parts/a", "out/parts/b"] {
        let path = t.path().join(file);
        assert!(
            cache.contains(path.to_str().unwrap()),
            "{file} is cached: {cache}"
        );
    }
}

/// `imba status -q` gates CI as `dvc status -q` does: nothing printed, exit 1 while anything
/// is stale, 0 once everything is up to date.
#[test]
fn status_quiet_exits_1_while_anything_is_stale() {
    let t = chain();
    let stale = t.exec(&["status", "-q", "pipeline.yaml"]);
    t.run_ok(&[]);
    let fresh = t.exec(&["status", "-q", "pipeline.yaml"]);
    t.write("data/raw.csv", "a\n");
    let one = t.exec(&["status", "-q", "pipeline.yaml", "--stage", "count"]);
    assert_snapshot!(format!("{}\n{}\n{}", stale.all(), fresh.all(), one.all()));
}

/// A run record says what the run was for: its `--set` arguments and resolved vars, a secret's
/// value masked; `imba log` shows the arguments, `imba show` both.
#[test]
fn runs_remember_their_vars_and_set_arguments() {
    let t = Test::new().pipeline(
        "vars: {month: 2024-12}\nstages:\n  s:\n    cmd: echo {{ month }} > {{ outputs.o }}\n    outputs: {o: out/m.txt}\n",
    );
    t.run_ok(&["--set", "month=2024-06", "--set", "+api_token=hunter2"]);
    let log = t.exec(&["log", "pipeline.yaml"]);
    assert!(
        log.stdout
            .lines()
            .nth(1)
            .is_some_and(|l| l.ends_with("  month=2024-06 +api_token=***")),
        "{}",
        log.stdout
    );
    let show = t.exec(&["show", "pipeline.yaml"]);
    assert!(
        show.stdout
            .contains("set: month=2024-06 +api_token=***\nvars: api_token=*** month=2024-06\n"),
        "{}",
        show.stdout
    );
    let json: serde_json::Value =
        serde_json::from_str(&t.exec(&["show", "pipeline.yaml", "--json"]).stdout).unwrap();
    assert_eq!(json["vars"]["month"], "2024-06");
    assert!(!std::fs::read_to_string(t.path().join(".imba/runs"))
        .map(|s| s.contains("hunter2"))
        .unwrap_or(false));
    for entry in walkdir::WalkDir::new(t.path().join(".imba"))
        .into_iter()
        .flatten()
    {
        if entry.file_type().is_file() {
            let text = String::from_utf8_lossy(&std::fs::read(entry.path()).unwrap()).into_owned();
            assert!(
                !text.contains("hunter2"),
                "{} holds the secret",
                entry.path().display()
            );
        }
    }
}

/// Three shell stages written the DVC way: each command writes its outputs at their declared
/// paths, never through `{{ outputs }}`. `count` fails when `fail` is 1, after writing half its
/// folder; `report` fails its check when `max` is below its line count.
const IN_PLACE: &str = r#"
vars:
  fail: 0
  max: 100
stages:
  prepare:
    cmd: mkdir -p out && tr a-z A-Z < data.txt > out/upper.txt
    inputs: [data.txt]
    outputs: [out/upper.txt]
  count:
    cmd: mkdir -p out/stats && wc -l < out/upper.txt | tr -d ' ' > out/stats/lines.txt && echo {{ fail }} > out/stats/attempt.txt && test {{ fail }} = 0
    inputs: [out/upper.txt]
    outputs: [out/stats/]
  report:
    cmd: (echo line; cat out/upper.txt) > out/report.csv
    inputs: [out/upper.txt, out/stats/]
    outputs: [out/report.csv]
    checks:
      - rows: {max: "{{ max }}"}
"#;

#[test]
fn shell_stages_that_write_in_place_run_skip_and_put_back_what_a_failure_touched() {
    let t = Test::new().file("data.txt", "a\nb\n").pipeline(IN_PLACE);
    let out = t.run_ok(&[]);
    assert!(out.stderr.contains("3 ran"), "{}", out.stderr);
    assert_eq!(t.read("out/upper.txt"), "A\nB\n");
    assert_eq!(t.read("out/stats/lines.txt"), "2\n");
    assert_eq!(t.read("out/report.csv"), "line\nA\nB\n");
    t.run_ok(&[]);
    assert!(t.decisions().iter().all(|(_, d)| d == "skipped"));
    assert_eq!(t.exec(&["status", "pipeline.yaml", "-q"]).code, 0);

    // A new input: the second stage fails after writing half its folder. Everything it
    // touched is as it was, and the lock still describes it: a status says `count` is stale
    // for its input only, never that its half-written folder is up to date.
    t.write("data.txt", "a\nb\nc\n");
    let before = common::tree(&t.path().join("out"));
    let out = t.exec(&["run", "pipeline.yaml", "--set", "fail=1"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(
        t.decisions(),
        [
            ("prepare", "ran"),
            ("count", "failed"),
            ("report", "blocked")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    let after = common::tree(&t.path().join("out"));
    assert_eq!(after["stats/lines.txt"], b"2\n", "the old folder is back");
    assert_eq!(after["stats/attempt.txt"], b"0\n");
    assert_eq!(after["upper.txt"], b"A\nB\nC\n", "`prepare` was committed");
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    assert!(
        !t.path().join(".imba/aside").exists(),
        "nothing is left aside"
    );

    // A failed check: the new output goes to quarantine, the old one comes back.
    t.run_ok(&["--set", "fail=0", "--stage", "count"]);
    let out = t.exec(&["run", "pipeline.yaml", "--set", "max=2"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("check `rows` on out/report.csv: 3 rows, expected ≤ 2"),
        "{}",
        out.stderr
    );
    assert_eq!(t.read("out/report.csv"), "line\nA\nB\n");
    let quarantined: Vec<String> = common::tree(&t.path().join(".imba/quarantine"))
        .into_keys()
        .collect();
    assert!(
        quarantined.len() == 1 && quarantined[0].ends_with("out/report.csv"),
        "{quarantined:?}"
    );

    // Fixed: it runs, and then nothing is stale.
    t.run_ok(&[]);
    assert_eq!(t.read("out/report.csv"), "line\nA\nB\nC\n");
    assert_eq!(t.exec(&["status", "pipeline.yaml", "-q"]).code, 0);
}

#[test]
fn a_missing_in_place_output_and_an_in_place_s3_output_are_explained() {
    let t = Test::new().pipeline(
        "stages:\n  named:\n    cmd: echo hi > {{ outputs.a }}\n    outputs: {a: a.txt, b: b.txt}\n  listed:\n    cmd: echo hi > {{ outputs[0] }}\n    outputs: [c.txt, d.txt]\n",
    );
    let out = t.exec(&["run", "pipeline.yaml", "-k", "-j", "1"]);
    assert_eq!(out.code, 1);
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: stage"))
        .collect();
    assert_snapshot!(errors.join("\n"));

    let t = Test::new().pipeline(
        "stages:\n  up:\n    cmd: aws s3 cp x s3://bucket/x\n    outputs: [s3://bucket/x]\n",
    );
    let out = t.exec(&["validate", "pipeline.yaml"]);
    assert_eq!(out.code, 2);
    assert_snapshot!(out.stderr);
}

/// The processes whose environment says they belong to the imba run `run`.
fn processes_of_run(run: &str) -> Vec<u32> {
    let wanted = format!("IMBA_RUN={run}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == wanted.as_bytes()))
        })
        .collect()
}

#[test]
fn kill_9_or_ctrl_c_during_an_in_place_stage_leaves_the_previous_output() {
    let t = Test::new().pipeline(
        "vars:\n  v: 1\n  wait: 0\nstages:\n  write:\n    cmd: echo {{ v }} > out/a.txt && touch out/started && sleep {{ wait }} && if [ {{ wait }} != 0 ]; then echo late >> out/a.txt; fi\n    outputs: [out/a.txt]\n",
    );
    t.run_ok(&[]);
    assert_eq!(t.read("out/a.txt"), "1\n");
    let started = t.path().join("out/started");

    // kill -9 of imba while its command has half-written the output and sleeps.
    std::fs::remove_file(&started).unwrap();
    let mut child = t
        .command(&["run", "pipeline.yaml", "--set", "v=2", "--set", "wait=30"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the command starts", || started.exists());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        t.read("out/a.txt"),
        "2\n",
        "torn: the new value, unfinished"
    );
    let runs: Vec<String> = std::fs::read_dir(t.path().join(".imba/aside"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(runs.len(), 1, "the dead run's plan is on disk");
    assert!(
        !processes_of_run(&runs[0]).is_empty(),
        "its command goes on"
    );
    // The lock never calls the torn output up to date.
    assert_eq!(t.exec(&["status", "pipeline.yaml", "-q"]).code, 1);

    // The next run kills the leftovers and puts the old output back before deciding: with the
    // old value, nothing is to run.
    let out = t.run_ok(&[]);
    assert!(
        out.stderr.contains(&format!(
            "warning: run {} stopped while stage `write` was writing `out/a.txt` in place; put back what was there before",
            runs[0]
        )),
        "{}",
        out.stderr
    );
    assert_eq!(t.decisions(), [("write".to_owned(), "skipped".to_owned())]);
    assert_eq!(t.read("out/a.txt"), "1\n");
    wait_until("the leftovers are gone", || {
        processes_of_run(&runs[0]).is_empty()
    });
    assert!(!t.path().join(".imba/aside").exists());

    // Ctrl-C: the command is stopped and the old output put back at once.
    std::fs::remove_file(&started).unwrap();
    let child = t
        .command(&["run", "pipeline.yaml", "--set", "v=3", "--set", "wait=30"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the command starts", || started.exists());
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130));
    assert_eq!(t.read("out/a.txt"), "1\n");
    assert!(!t.path().join(".imba/aside").exists());
    assert_eq!(t.exec(&["status", "pipeline.yaml", "-q"]).code, 0);
}

/// A changed var is the reason, named with its old and new values, never the long command or
/// param it renders into; a var built from it (`query`) is not named twice.
#[test]
fn a_changed_var_is_named_with_the_stages_it_reaches() {
    let t = Test::new().file("data/raw.csv", "a\nb\n").pipeline(
        r#"
vars:
  month: 2024-12
  query: "SELECT user_id, count(*) AS orders, avg(days_since_prior_order) AS gap FROM orders WHERE month = '{{ month }}' GROUP BY user_id ORDER BY user_id"
stages:
  extract:
    cmd: echo "$QUERY" > {{ outputs[0] }}
    env: {QUERY: "{{ query }}"}
    outputs: ["out/{{ month }}/query.sql"]
  count:
    cmd: wc -l < {{ inputs[0] }} > {{ outputs[0] }}
    inputs: [data/raw.csv]
    params: {label: "{{ month }}"}
    outputs: [out/count.txt]
  report:
    cmd: cat {{ inputs[0] }} > {{ outputs[0] }}
    inputs: [out/count.txt]
    outputs: [out/report.txt]
"#,
    );
    t.run_ok(&[]);
    let out = t.exec(&["status", "pipeline.yaml", "--set", "month=2024-06"]);
    assert_eq!(out.code, 0);
    assert_snapshot!(out.stdout);
}

/// A `change` check on an output written in place compares with the previous output (set
/// aside while the command ran), not with the new one at its path.
#[test]
fn a_change_check_on_an_in_place_output_compares_with_the_previous_one() {
    let t = Test::new().pipeline(
        "vars:\n  n: 10\nstages:\n  rows:\n    cmd: (echo x; seq {{ n }}) > out.csv\n    outputs: [out.csv]\n    checks:\n      - change: {metric: rows, max_pct: 20}\n",
    );
    t.run_ok(&[]);
    let out = t.exec(&["run", "pipeline.yaml", "--set", "n=5"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("check `change(rows)` on out.csv"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("was changed after imba committed it"),
        "{}",
        out.stderr
    );
    assert_eq!(
        t.read("out.csv").lines().count(),
        11,
        "the previous output is back"
    );
    t.run_ok(&["--set", "n=11"]);
}

/// A var that reaches a command's environment may be a credential: the lock keeps `***`.
#[test]
fn a_var_in_a_commands_environment_never_lands_in_the_lock() {
    let t = Test::new().pipeline(
        "vars:\n  db_url: postgres://etl:hunter2@db/prod\nstages:\n  q:\n    cmd: echo \"$DB\" | wc -c > {{ outputs[0] }}\n    env: {DB: \"{{ db_url }}\"}\n    outputs: [n.txt]\n",
    );
    t.run_ok(&[]);
    let lock = t.read("pipeline.lock");
    assert!(!lock.contains("hunter2"), "{lock}");
    assert!(lock.contains("\"db_url\": \"***\""), "{lock}");
}

/// A changed var explains only the differences in what it reaches: a param edited by hand at
/// the same time is still named.
#[test]
fn a_changed_var_hides_no_other_change() {
    let t = Test::new().pipeline(
        "vars:\n  month: 2024-12\nstages:\n  s:\n    cmd: echo {{ month }} {{ params.limit }} > {{ outputs[0] }}\n    params: {limit: 10}\n    outputs: [out.txt]\n",
    );
    t.run_ok(&[]);
    t.write(
        "pipeline.yaml",
        t.read("pipeline.yaml").replace("limit: 10", "limit: 20"),
    );
    let out = t.exec(&["status", "pipeline.yaml", "--set", "month=2024-06"]);
    assert_eq!(
        out.stdout,
        "s\n  - var month changed: 2024-12 → 2024-06\n  - param limit changed: 10 → 20\nvar month changed: 2024-12 → 2024-06; read by s\n1 of 1 stages are stale\n"
    );
}

/// A partitioned stage runs once per key, as `NAME@KEY`, in date order; a stage that reads no
/// key runs once and sees them all; one instance can be selected alone.
#[test]
fn partitioned_stages_run_once_per_key_in_date_order() {
    let mut t = Test::new();
    for month in ["2016-12", "2017-01", "2017-02"] {
        t = t.file(&format!("data/{month}.csv"), format!("a\n{month}\n"));
    }
    let t = t.pipeline(
        r#"
partitions:
  month:
    values: [2017-02, 2016-12, 2017-01]
  span:
    range: {from: 2016-11, to: 2017-02}
stages:
  clean:
    cmd: cat {{ inputs[0] }} > {{ outputs[0] }}
    inputs: ["data/{{ month }}.csv"]
    outputs: ["out/{{ month }}/clean.csv"]
  months:
    cmd: echo {{ partitions.month.all }} / {{ partitions.span.all }} > {{ outputs[0] }}
    outputs: [out/months.txt]
"#,
    );
    let dag = t.exec(&["dag", "pipeline.yaml"]);
    let names: Vec<&str> = dag.stdout.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(
        names,
        [
            "clean@2016-12 [cmd]",
            "clean@2017-01 [cmd]",
            "clean@2017-02 [cmd]",
            "months [cmd]"
        ],
        "{}",
        dag.stdout
    );
    t.run_ok(&[]);
    assert_eq!(t.read("out/2017-01/clean.csv"), "a\n2017-01\n");
    assert_eq!(
        t.read("out/months.txt"),
        "2016-12 2017-01 2017-02 / 2016-11 2016-12 2017-01 2017-02\n"
    );
    t.run_ok(&["--stage", "clean@2017-01", "--force"]);
    assert_eq!(ran(&t), ["clean@2017-01"], "one partition's instance alone");
}
