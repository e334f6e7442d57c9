//! Stages as jobs on a real Slurm cluster on this machine (`scripts/slurm-local`: munge, a
//! controller and two nodes on 127.0.0.1): the same outputs as a local run, no job on a no-op,
//! jobs spread over the nodes, a job killed on its node or cancelled from outside, Ctrl-C. Where
//! the cluster cannot start (no slurm-wlm), the tests say so and pass, but under CI they fail.

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The cluster's `SLURM_CONF`, started once for all the tests of this binary, and the cluster
/// to this test alone until the guard goes: two nodes of 2 CPUs are shared by no two tests, so
/// that what one test sees of the queue and of the nodes is its own.
fn slurm_conf() -> Option<(&'static str, std::sync::MutexGuard<'static, ()>)> {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    cluster().map(|conf| (conf, guard))
}

fn cluster() -> Option<&'static str> {
    static CONF: OnceLock<Option<String>> = OnceLock::new();
    CONF.get_or_init(|| common::start_cluster("slurm-local", &[], "SLURM_CONF"))
        .as_deref()
}

/// A Slurm client command against the test cluster; its stdout.
fn slurm(conf: &str, program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The jobs imba submitted that have not ended, by name `imba:…` (the other tests of this binary
/// run their own at the same time).
fn live_jobs(conf: &str, stage: &str) -> Vec<String> {
    slurm(conf, "squeue", &["-h", "-o", "%i %j"])
        .lines()
        .filter(|l| l.ends_with(&format!(" imba:{stage}")))
        .map(str::to_owned)
        .collect()
}

/// Waits until no job of `stage` is left in the queue (Slurm ends a job's processes, then the
/// job); fails after 30 s.
fn no_jobs_within_30s(conf: &str, stage: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !live_jobs(conf, stage).is_empty() {
        assert!(
            Instant::now() < deadline,
            "a job of `{stage}` is still there"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run(t: &common::Test, conf: &str, args: &[&str]) -> common::Output {
    let mut command = t.command(args);
    command.env("SLURM_CONF", conf);
    t.captured(&command.output().unwrap())
}

/// Every file under `dir` but the versions' `_meta.json`, which says when it was made.
fn outputs(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = common::tree(dir);
    files.retain(|path, _| !path.ends_with("_meta.json"));
    files
}

#[test]
fn the_monthly_pipeline_as_slurm_jobs_gives_the_local_outputs() {
    let Some((conf, _alone)) = slurm_conf() else {
        return;
    };
    let local = common::monthly("");
    let done = local.exec(&["run", "pipelines/monthly.yaml"]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    let t = common::monthly("");
    let out = run(
        &t,
        conf,
        &["run", "pipelines/monthly.yaml", "--executor", "slurm"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (a, b) = (
        outputs(&local.path().join("out")),
        outputs(&t.path().join("out")),
    );
    assert!(a.len() > 10, "{:?}", a.keys());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (path, bytes) in &a {
        assert!(b[path] == *bytes, "{path} differs");
    }
    // Every stage ran as a job, on one of the two nodes, its log beside the others.
    let stages = t.record_of("pipelines/monthly.yaml")["stages"].clone();
    for stage in stages.as_array().unwrap() {
        let job = &stage["job"];
        assert_eq!(job["executor"], "slurm", "{stage}");
        assert_eq!(job["state"], "COMPLETED");
        assert!(matches!(job["node"].as_str(), Some("n1" | "n2")), "{job}");
        let log = job["log"].as_str().unwrap();
        assert!(log.ends_with(&format!("/{}.log", stage["name"].as_str().unwrap())));
        let log = log.replace("[TMP]", &t.path().display().to_string());
        assert!(
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("imba exec-stage: stage"),
            "{log}"
        );
    }
    // A no-op re-run submits nothing: no job of these stages is added to the queue.
    let jobs = |conf: &str| -> usize {
        slurm(conf, "squeue", &["-h", "-t", "all", "-o", "%j"])
            .lines()
            .filter(|name| {
                stages
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| format!("imba:{}", s["name"].as_str().unwrap()) == name.trim())
            })
            .count()
    };
    let before = jobs(conf);
    assert!(before >= 5, "{before}");
    let again = run(
        &t,
        conf,
        &["run", "pipelines/monthly.yaml", "--executor", "slurm"],
    );
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stderr.contains("0 ran, 5 up to date"),
        "{}",
        again.stderr
    );
    assert_eq!(jobs(conf), before, "no job was submitted");
}

#[test]
fn twelve_partitions_spread_over_both_nodes() {
    let Some((conf, _alone)) = slurm_conf() else {
        return;
    };
    let mut t = common::Test::new().pipeline(
        r#"
executors:
  hpc:
    slurm: {}
partitions:
  month: {range: {from: 2017-01, to: 2017-12}}
stages:
  monthly:
    cmd: sleep 1; echo "{{ month }} $SLURMD_NODENAME" > {{ outputs[0] }}
    inputs: ["raw/{{ month }}.csv"]
    outputs: ["out/{{ month }}.txt"]
"#,
    );
    for m in 1..=12 {
        t = t.file(&format!("raw/2017-{m:02}.csv"), "x\n1\n");
    }
    let out = run(
        &t,
        conf,
        &["run", "pipeline.yaml", "--executor", "hpc", "-j", "12"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut nodes = std::collections::BTreeSet::new();
    for m in 1..=12 {
        let text = t.read(&format!("out/2017-{m:02}.txt"));
        let (month, node) = text.trim().split_once(' ').unwrap();
        assert_eq!(month, format!("2017-{m:02}"));
        nodes.insert(node.to_owned());
    }
    assert_eq!(nodes.into_iter().collect::<Vec<_>>(), ["n1", "n2"]);
}

/// A stage that writes where its job runs, then waits for the test.
const WAITS: &str = r#"
executors:
  hpc:
    slurm: {}
stages:
  NAME:
    cmd: |
      echo "$PPID" > waits.$IMBA_ATTEMPT.pid
      if [ "$IMBA_ATTEMPT" = 1 ]; then sleep 600; fi
      echo "attempt $IMBA_ATTEMPT" > {{ outputs[0] }}
    outputs: [out/result.txt]
    executor: hpc
    RETRIES
"#;

/// `imba run pipeline.yaml` of a [`WAITS`] pipeline, once its first attempt runs on a node.
fn first_attempt_running(t: &common::Test, conf: &str) -> std::process::Child {
    let child = t
        .command(&["run", "pipeline.yaml"])
        .env("SLURM_CONF", conf)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !t.path().join("waits.1.pid").exists() {
        assert!(Instant::now() < deadline, "the first attempt never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

#[test]
fn a_job_cancelled_from_outside_fails_or_is_retried_and_commits_nothing_partial() {
    let Some((conf, _alone)) = slurm_conf() else {
        return;
    };
    for retries in ["", "retries: {attempts: 2}"] {
        let t = common::Test::new().pipeline(
            &WAITS
                .replace("RETRIES", retries)
                .replace("NAME", "scancelled"),
        );
        let child = first_attempt_running(&t, conf);
        let job = live_jobs(conf, "scancelled");
        assert_eq!(job.len(), 1, "{job:?}");
        let id = job[0].split_whitespace().next().unwrap();
        slurm(conf, "scancel", &[id]);
        let out = t.captured(&child.wait_with_output().unwrap());
        if retries.is_empty() {
            assert_eq!(out.code, 1, "{}", out.stderr);
            assert!(
                out.stage_error()
                    .contains(&format!("job {id} was stopped on n")),
                "{}",
                out.stderr
            );
            assert!(
                out.stage_error()
                    .contains("cancelled from outside imba (scancel)"),
                "{}",
                out.stderr
            );
            assert!(!t.path().join("out/result.txt").exists());
            assert!(!t.path().join("imba.lock").exists());
        } else {
            assert_eq!(out.code, 0, "{}", out.stderr);
            assert!(
                out.stderr.contains("attempt 1 of 2 failed: job"),
                "{}",
                out.stderr
            );
            assert_eq!(t.read("out/result.txt"), "attempt 2\n");
        }
    }
}

#[test]
fn a_job_whose_imba_is_killed_on_its_node_fails_with_a_clear_message() {
    let Some((conf, _alone)) = slurm_conf() else {
        return;
    };
    let t = common::Test::new().pipeline(&WAITS.replace("RETRIES", "").replace("NAME", "killed"));
    let child = first_attempt_running(&t, conf);
    // The command's parent is `imba exec-stage` on the node.
    let pid: i32 = t.read("waits.1.pid").trim().parse().unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let out = t.captured(&child.wait_with_output().unwrap());
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stage_error()
            .contains("and wrote no result: its imba was killed, or could not start"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("full log: [TMP]/.imba/logs/"),
        "{}",
        out.stderr
    );
    assert!(!t.path().join("out/result.txt").exists());
    // Its command went with it (Slurm kills the job's processes).
    no_jobs_within_30s(conf, "killed");
}

#[test]
fn jobs_left_by_a_killed_run_are_cancelled_by_the_next_run() {
    let Some((conf, _alone)) = slurm_conf() else {
        return;
    };
    let t = common::Test::new().pipeline(
        &WAITS
            .replace("RETRIES", "")
            .replace("NAME", "orphaned")
            .replace(r#"if [ "$IMBA_ATTEMPT" = 1 ]"#, "if [ ! -e go ]"),
    );
    let mut child = first_attempt_running(&t, conf);
    let left = live_jobs(conf, "orphaned");
    assert_eq!(left.len(), 1, "{left:?}");
    let orphan = left[0].split_whitespace().next().unwrap().to_owned();
    // The orchestrator dies; its job runs on.
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(live_jobs(conf, "orphaned"), left);

    // Jobs of runs that may be alive: one from another machine, one from a live process here.
    let ours = imba::run::execute::Orphans::tag(&t.path().join(".imba"), "R");
    let workdir = ours.split(':').take(2).collect::<Vec<_>>().join(":");
    let here = ours.rsplit(':').nth(1).unwrap().to_owned();
    let mut alive = Vec::new();
    for from in [
        "login2:1".to_owned(),
        format!("{here}:{}", std::process::id()),
    ] {
        let comment = format!("--comment={workdir}:20261204T000000.000Z-0000:{from}");
        let id = slurm(
            conf,
            "sbatch",
            &[
                "--parsable",
                "--job-name=imba:alive",
                // Its output nowhere: by default it would land in the test's working directory.
                "--output=/dev/null",
                &comment,
                "--wrap=sleep 600",
            ],
        );
        alive.push((id.trim().to_owned(), from));
    }

    std::fs::write(t.path().join("go"), "").unwrap();
    let out = run(&t, conf, &["run", "pipeline.yaml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "warning: executor `hpc`: cancelled a job left running by an earlier run of this workdir that ended without them ({orphan})"
        )),
        "{}",
        out.stderr
    );
    let host_of = |from: &str| from.split(':').next().unwrap().to_owned();
    assert!(
        out.stderr.contains(&format!(
            "warning: executor `hpc`: 2 jobs of another run of this workdir still running, left alone: {} (from {}), {} (from {})",
            alive[0].0, host_of(&alive[0].1), alive[1].0, host_of(&alive[1].1)
        )),
        "{}",
        out.stderr
    );
    assert_eq!(live_jobs(conf, "alive").len(), 2, "left alone");
    for (id, _) in &alive {
        slurm(conf, "scancel", &[id]);
    }
    assert_eq!(t.read("out/result.txt"), "attempt 1\n");
    no_jobs_within_30s(conf, "orphaned");
    // A run finds nothing to cancel when nothing was left.
    let again = run(&t, conf, &["run", "pipeline.yaml", "-f"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(!again.stderr.contains("cancelled"), "{}", again.stderr);
}

#[test]
fn ctrl_c_cancels_the_running_jobs() {
    let Some((conf, _alone)) = slurm_conf() else {
        return;
    };
    let t = common::Test::new().pipeline(
        &WAITS
            .replace("RETRIES", "retries: 3")
            .replace("NAME", "interrupted"),
    );
    let child = first_attempt_running(&t, conf);
    assert_eq!(live_jobs(conf, "interrupted").len(), 1);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = t.captured(&child.wait_with_output().unwrap());
    assert_eq!(out.code, 130, "{}", out.stderr);
    assert!(
        live_jobs(conf, "interrupted").is_empty(),
        "squeue shows none"
    );
    assert!(
        !t.path().join("waits.2.pid").exists(),
        "no retry after Ctrl-C"
    );
    assert!(!t.path().join("out/result.txt").exists());
}

#[test]
fn a_node_with_another_build_of_imba_is_refused() {
    let Some((conf, _alone)) = slurm_conf() else {
        return;
    };
    let t = common::Test::new().pipeline(
        &WAITS
            .replace("RETRIES", "retries: 3")
            .replace("NAME", "other_build"),
    );
    // The same program, one byte longer: another build as far as a hash can tell.
    let other = t.path().join("other-imba");
    std::fs::copy(assert_cmd::cargo::cargo_bin("imba"), &other).unwrap();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&other)
        .unwrap();
    std::io::Write::write_all(&mut file, b"\0").unwrap();
    drop(file);
    let out = t.captured(
        &t.command(&["run", "pipeline.yaml"])
            .env("SLURM_CONF", conf)
            .env("IMBA_REMOTE_BIN", &other)
            .output()
            .unwrap(),
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stage_error().contains("is another build (imba "),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("retry"), "not retried: {}", out.stderr);
    assert!(!t.path().join("waits.1.pid").exists(), "nothing ran");
}

#[test]
fn executors_are_checked_at_validate_time() {
    let t = common::Test::new().pipeline(
        r#"
executors:
  hpc:
    slurm: {partition: -p, qos: high, extra: [high]}
  local:
    slurm: {}
  two:
    slurm: {}
    pbs: {}
stages:
  a:
    cmd: "true"
    executor: hcp
  b:
    uses: clean
    inputs: [data.csv]
    outputs: {table: out/b.parquet}
    engine: spark
    executor: two
"#,
    );
    let out = t.exec(&["validate", "pipeline.yaml"]);
    assert_eq!(out.code, 2);
    insta::assert_snapshot!("executor_errors", out.all());
    let t = common::Test::new().pipeline("stages:\n  a:\n    cmd: \"true\"\n");
    let out = t.exec(&["run", "pipeline.yaml", "--executor", "hpc"]);
    assert_eq!(out.code, 2);
    insta::assert_snapshot!("executor_flag_unknown", out.all());
}

#[test]
fn a_job_that_runs_past_its_timeout_is_cancelled_on_the_cluster() {
    let Some((conf, _alone)) = slurm_conf() else {
        return;
    };
    let t = common::Test::new().pipeline(
        &WAITS
            .replace("RETRIES", "timeout: 2s")
            .replace("NAME", "too_slow"),
    );
    let out = run(&t, conf, &["run", "pipeline.yaml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stage_error()
            .contains("timed out after 2s (its `timeout`)"),
        "{}",
        out.stderr
    );
    assert!(live_jobs(conf, "too_slow").is_empty(), "scancelled");
    assert!(!t.path().join("out/result.txt").exists());
}

#[test]
fn resources_no_node_has_are_an_error_before_anything_runs() {
    let Some((conf, _alone)) = slurm_conf() else {
        return;
    };
    let t = common::Test::new().pipeline(
        r#"
executors:
  hpc:
    slurm: {}
stages:
  big:
    cmd: touch ran
    outputs: [out/x.txt]
    executor: hpc
    resources: {cpus: 64, memory: 1T}
  fits:
    cmd: touch ran
    outputs: [out/y.txt]
    executor: hpc
    resources: {cpus: 2, memory: 1G}
"#,
    );
    let out = run(&t, conf, &["validate", "pipeline.yaml"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    insta::assert_snapshot!("resources_over_any_node", out.all());
    let out = run(&t, conf, &["run", "pipeline.yaml"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(!t.path().join("ran").exists());
}
