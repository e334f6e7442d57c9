//! `retries:` and `timeout:` on local stages: a flaky command commits on a later attempt, each
//! attempt in the run record and the log; a hanging one is stopped by its timeout and nothing
//! is committed; what cannot succeed by trying again is not tried again.

mod common;

use std::time::{Duration, Instant};

/// A command that fails on its first two runs (counted in a file of its own), then writes its
/// output.
const FLAKY: &str = r#"
stages:
  flaky:
    cmd: |
      n=$(cat tries 2>/dev/null || echo 0); n=$((n + 1)); echo $n > tries
      echo "partial" > {{ outputs.out }}
      if [ $n -lt 3 ]; then echo "flaky: try $n failed" >&2; exit 1; fi
      echo "done on try $n (IMBA_ATTEMPT=$IMBA_ATTEMPT)" > {{ outputs.out }}
    outputs: {out: out/result.txt}
    RETRIES
"#;

#[test]
fn a_flaky_stage_commits_on_its_third_attempt_with_three_attempts_recorded() {
    let t = common::Test::new()
        .pipeline(&FLAKY.replace("RETRIES", "retries: {attempts: 3, backoff: 10ms}"));
    let out = t.run_ok(&[]);
    assert_run_snapshot!("flaky_stage_retried", out.all());
    assert_eq!(
        t.read("out/result.txt"),
        "done on try 3 (IMBA_ATTEMPT=3)\n",
        "the third attempt's output, nothing of the failed ones"
    );
    let stage = &t.record_of("pipeline.yaml")["stages"][0];
    assert_eq!(stage["decision"], "ran");
    let attempts = stage["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    for (i, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt["attempt"], i as u64 + 1);
        assert!(attempt["started"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z')));
    }
    assert_eq!(attempts[0]["exit_status"], 1);
    assert!(attempts[0]["error"]
        .as_str()
        .unwrap()
        .contains("flaky: try 1 failed"));
    assert!(attempts[1]["error"]
        .as_str()
        .unwrap()
        .contains("flaky: try 2 failed"));
    assert!(attempts[2].get("error").is_none(), "{:?}", attempts[2]);
    // The log keeps every attempt, each after a line that says which.
    let log = t.read(stage["log"].as_str().unwrap().trim_start_matches("[TMP]/"));
    let expected = "flaky: try 1 failed\n\n--- imba: attempt 2 ---\nflaky: try 2 failed\n\n--- imba: attempt 3 ---\n";
    assert_eq!(log, expected);
    // A re-run does nothing: retries are not fingerprinted.
    t.run_ok(&[]);
    assert_eq!(t.decisions(), [("flaky".to_owned(), "skipped".to_owned())]);
    t.write(
        "pipeline.yaml",
        FLAKY.replace("RETRIES", "retries: 5\n    timeout: 1h"),
    );
    t.run_ok(&[]);
    assert_eq!(t.decisions(), [("flaky".to_owned(), "skipped".to_owned())]);
}

#[test]
fn without_enough_attempts_the_stage_fails_and_commits_nothing() {
    for retries in ["", "retries: 1"] {
        let t = common::Test::new().pipeline(&FLAKY.replace("RETRIES", retries));
        let out = t.exec(&["run", "pipeline.yaml"]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert!(
            out.stage_error()
                .contains("command failed with exit status 1"),
            "{}",
            out.stderr
        );
        assert!(!t.path().join("out/result.txt").exists());
        assert!(!t.path().join("imba.lock").exists());
        let stage = &t.record_of("pipeline.yaml")["stages"][0];
        assert_eq!(stage["decision"], "failed");
        let attempts = stage["attempts"].as_array().map_or(0, Vec::len);
        // Without `retries:` there is one attempt and no list of them.
        assert_eq!(
            attempts,
            if retries.is_empty() { 0 } else { 2 },
            "{retries}"
        );
    }
}

#[test]
fn a_hanging_stage_is_stopped_by_its_timeout_and_commits_nothing() {
    let t = common::Test::new().pipeline(
        r#"
stages:
  hangs:
    cmd: |
      echo $$ > hangs.pid
      echo "started" > {{ outputs.out }}
      sleep 600
    outputs: {out: out/result.txt}
    timeout: 1s
"#,
    );
    let started = Instant::now();
    let out = t.exec(&["run", "pipeline.yaml"]);
    let took = started.elapsed();
    assert_run_snapshot!("hanging_stage_timed_out", out.all());
    assert_eq!(out.code, 1);
    // SIGTERM to the command's process group at 1 s; it does not need the 5 s before SIGKILL.
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(!t.path().join("out/result.txt").exists());
    assert!(!t.path().join("imba.lock").exists());
    let pid: i32 = t.read("hangs.pid").trim().parse().unwrap();
    assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "the command is gone");
    let stage = &t.record_of("pipeline.yaml")["stages"][0];
    assert_eq!(stage["decision"], "failed");
    assert!(stage["error"]
        .as_str()
        .unwrap()
        .starts_with("timed out after 1s"));
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_after_its_timeout() {
    let t = common::Test::new().pipeline(
        r#"
stages:
  stubborn:
    cmd: |
      trap '' TERM
      echo $$ > stubborn.pid
      while true; do sleep 0.1; done
    outputs: [out/never.txt]
    timeout: 500ms
"#,
    );
    let out = t.exec(&["run", "pipeline.yaml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stage_error().contains("timed out after 500ms"),
        "{}",
        out.stderr
    );
    let pid: i32 = t.read("stubborn.pid").trim().parse().unwrap();
    assert_ne!(
        unsafe { libc::kill(pid, 0) },
        0,
        "SIGKILL after the grace period"
    );
}

#[test]
fn an_attempt_that_times_out_is_retried() {
    let t = common::Test::new().pipeline(
        r#"
stages:
  slow_then_fast:
    cmd: |
      if [ "$IMBA_ATTEMPT" = 1 ]; then sleep 600; fi
      echo "attempt $IMBA_ATTEMPT" > {{ outputs[0] }}
    outputs: [out/result.txt]
    timeout: 1s
    retries: {attempts: 2}
"#,
    );
    let out = t.run_ok(&[]);
    assert!(
        out.stderr
            .contains("attempt 1 of 2 failed: timed out after 1s (its `timeout`): stopped as Ctrl-C stops a stage; trying again)"),
        "{}",
        out.stderr
    );
    assert_eq!(t.read("out/result.txt"), "attempt 2\n");
    let attempts = t.record_of("pipeline.yaml")["stages"][0]["attempts"].clone();
    assert_eq!(attempts.as_array().unwrap().len(), 2);
}

#[test]
fn a_failed_check_or_a_missing_output_is_not_retried() {
    let t = common::Test::new().pipeline(
        r#"
stages:
  few_rows:
    cmd: |
      echo x >> ran
      printf 'a\n1\n' > {{ outputs[0] }}
    outputs: [out/t.csv]
    checks:
      - rows: {min: 5}
    retries: {attempts: 3}
  no_output:
    cmd: echo x >> ran2
    outputs: [out/missing.txt]
    retries: {attempts: 3}
"#,
    );
    let out = t.exec(&["run", "pipeline.yaml", "--keep-going"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(!out.stderr.contains("retry"), "{}", out.stderr);
    assert_eq!(t.read("ran"), "x\n", "one attempt");
    assert_eq!(t.read("ran2"), "x\n", "one attempt");
}

#[test]
fn ctrl_c_during_a_backoff_cancels_the_stage() {
    let t = common::Test::new().pipeline(
        r#"
stages:
  fails:
    cmd: echo x >> ran; exit 3
    outputs: [out/never.txt]
    retries: {attempts: 3, backoff: 10m}
"#,
    );
    let mut child = t
        .command(&["run", "pipeline.yaml"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first attempt to fail, then interrupt the 10-minute wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !t.path().join("ran").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(status.code(), Some(130));
    assert_eq!(t.read("ran"), "x\n", "no second attempt");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("attempt 1 of 3 failed: exit status 3; again in 10m"),
        "interrupted during the wait: {stderr}"
    );
}

#[test]
fn limits_are_checked_at_their_spans() {
    let t = common::Test::new()
        .pipeline(
            r#"
stages:
  a:
    cmd: "true"
    timeout: 0s
    retries: {attempts: 0, backoff: soon}
    resources: {cpus: 0, memory: 4, gpus: 1}
  b:
    cmd: "true"
    timeout: 30
    retries: [1]
  c:
    cmd: "true"
    resources: {memory: 4 lots}
"#,
        )
        .args(&["validate", "pipeline.yaml"]);
    let out = t.run();
    assert_eq!(out.code, 2);
    insta::assert_snapshot!("limits_errors", out.all());
}

/// Two stages that each write `start` and `end` around a pause, each asking for `MEMORY`.
const TWO_STAGES: &str = r#"
stages:
  a:
    cmd: echo start >> trace; sleep 0.3; echo end >> trace; echo a > {{ outputs[0] }}
    outputs: [out/a.txt]
    resources: {memory: MEMORY}
  b:
    cmd: echo start >> trace; sleep 0.3; echo end >> trace; echo b > {{ outputs[0] }}
    outputs: [out/b.txt]
    resources: {memory: MEMORY}
"#;

#[test]
fn stages_that_do_not_fit_the_memory_budget_together_run_one_after_the_other() {
    let t = common::Test::new().pipeline(&TWO_STAGES.replace("MEMORY", "3G"));
    let out = t.run_ok(&["-j", "2", "--memory", "4G"]);
    assert_eq!(
        t.read("trace"),
        "start\nend\nstart\nend\n",
        "never both at once"
    );
    // Whichever asked second waited, and said so.
    let waited = out
        .stderr
        .lines()
        .find(|l| l.starts_with("  wait "))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert!(
        waited.contains(" (needs 1 CPU and 3.0 GB; 1 CPU and 3.0 GB of the budget's "),
        "{waited}"
    );
    assert!(
        waited.ends_with(" CPUs and 4.0 GB in use: `--cpus`, `--memory`)"),
        "{waited}"
    );
    // The record says when each started computing: the second after the first's 0.3 s.
    let stages = t.record_of("pipeline.yaml")["stages"].clone();
    let mut started: Vec<std::time::SystemTime> = stages
        .as_array()
        .unwrap()
        .iter()
        .map(|s| humantime::parse_rfc3339(s["started"].as_str().unwrap()).unwrap())
        .collect();
    started.sort();
    let apart = started[1].duration_since(started[0]).unwrap();
    assert!(apart >= Duration::from_millis(300), "{apart:?}");
    // The same with one CPU for both.
    let t = common::Test::new().pipeline(&TWO_STAGES.replace("MEMORY", "1G"));
    t.run_ok(&["-j", "2", "--cpus", "1"]);
    assert_eq!(t.read("trace"), "start\nend\nstart\nend\n");
}

#[test]
fn stages_that_fit_the_budget_run_at_once() {
    // Each waits for the other to be running: both finish only when they run together.
    let t = common::Test::new().pipeline(
        r#"
stages:
  a:
    cmd: touch a.here; until [ -e b.here ]; do sleep 0.05; done; echo a > {{ outputs[0] }}
    outputs: [out/a.txt]
    resources: {cpus: 1, memory: 3G}
    timeout: 60s
  b:
    cmd: touch b.here; until [ -e a.here ]; do sleep 0.05; done; echo b > {{ outputs[0] }}
    outputs: [out/b.txt]
    resources: {cpus: 1, memory: 3G}
    timeout: 60s
"#,
    );
    let out = t.run_ok(&["-j", "2", "--cpus", "2", "--memory", "8G"]);
    assert!(!out.stderr.contains("wait"), "{}", out.stderr);
}

#[test]
fn a_stage_larger_than_the_budget_runs_alone() {
    let t = common::Test::new().pipeline(&TWO_STAGES.replace("MEMORY", "64G"));
    t.run_ok(&["-j", "2", "--memory", "1G"]);
    assert_eq!(t.read("trace"), "start\nend\nstart\nend\n");
    let bad = t.exec(&["run", "pipeline.yaml", "--memory", "12"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("a size needs a unit"), "{}", bad.stderr);
}

/// The monthly pipeline's two stages after the imputation need only it, and run side by side;
/// a memory budget below the sum of their estimates (from their inputs' sizes) keeps them apart.
#[test]
fn built_in_stages_reserve_their_estimate_of_memory() {
    let t = common::monthly("");
    let out = t.exec(&["run", "pipelines/monthly.yaml", "--memory", "200M"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let waited: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("  wait "))
        .collect();
    assert_eq!(waited.len(), 1, "{}", out.stderr);
    assert!(
        waited[0].starts_with("  wait diagnose_imputation (needs 1 CPU and ")
            || waited[0].starts_with("  wait user_features (needs 1 CPU and "),
        "{}",
        waited[0]
    );
    // With the machine's budget they do not wait.
    let t = common::monthly("");
    let out = t.exec(&["run", "pipelines/monthly.yaml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!out.stderr.contains("  wait "), "{}", out.stderr);
}
