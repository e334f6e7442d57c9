//! `checks:` on a stage: evaluated before commit, failed outputs quarantined, `warn` recorded,
//! `on_failure` hooks, `imba checks`.

mod common;

use common::{Output, Test};
use insta::assert_snapshot;

/// data.csv → copy (checked) → count.
const GUARDED: &str = r#"
stages:
  copy:
    cmd: cp {{ inputs[0] }} {{ outputs.table }}
    inputs: [data.csv]
    outputs: {table: out/table.csv}
    checks:
      - rows: {min: 2}
      - change: {metric: rows, max_pct: 50}
      - not_null: [x]
        severity: warn
  count:
    cmd: wc -l < {{ inputs[0] }} | tr -d ' ' > {{ outputs[0] }}
    inputs: [out/table.csv]
    outputs: [out/count.txt]
"#;

const FOUR_ROWS: &str = "id,x\n1,5\n2,7\n3,1\n4,2\n";

/// Snapshots with run ids and durations masked.
macro_rules! snapshot {
    ($value:expr) => {
        insta::with_settings!({filters => FILTERS.to_vec()}, { assert_snapshot!($value) })
    };
    ($name:expr, $value:expr) => {
        insta::with_settings!({filters => FILTERS.to_vec()}, { assert_snapshot!($name, $value) })
    };
}

const FILTERS: [(&str, &str); 2] = [
    (r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}", "[RUN]"),
    (r"\d+\.\d{2}s", "[TIME]"),
];

fn run(t: &Test, args: &[&str]) -> Output {
    let mut all = vec!["run", "pipeline.yaml", "-j", "1"];
    all.extend(args);
    t.exec(&all)
}

/// The latest run record, as JSON.
fn last_record(t: &Test) -> serde_json::Value {
    let out = t.exec(&["show", "pipeline.yaml", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str(&out.stdout).expect("json")
}

fn stage<'a>(record: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    record["stages"]
        .as_array()
        .and_then(|stages| stages.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no stage {name} in {record}"))
}

#[test]
fn a_failed_check_keeps_the_committed_outputs_and_quarantines_the_new_ones() {
    let t = Test::new().file("data.csv", FOUR_ROWS).pipeline(GUARDED);
    let first = run(&t, &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(t.read("out/table.csv"), FOUR_ROWS);
    assert_eq!(t.read("out/count.txt"), "5\n");

    // Seven rows where four were committed: +75%, over the 50% allowed.
    let seven = "id,x\n1,5\n2,7\n3,1\n4,2\n5,5\n6,6\n7,7\n";
    t.write("data.csv", seven);
    let failed = run(&t, &[]);
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    snapshot!(failed.stderr);

    // The committed outputs are the earlier ones, downstream did not run.
    assert_eq!(t.read("out/table.csv"), FOUR_ROWS);
    assert_eq!(t.read("out/count.txt"), "5\n");
    let record = last_record(&t);
    assert_eq!(stage(&record, "copy")["decision"], "failed");
    assert_eq!(stage(&record, "count")["decision"], "blocked");
    // The new table is kept where the record says, at its path under the workdir.
    let quarantine = stage(&record, "copy")["quarantine"]
        .as_str()
        .expect("quarantine")
        .replace("[TMP]", t.path().to_str().unwrap());
    let kept = std::path::Path::new(&quarantine).join("out/table.csv");
    assert_eq!(std::fs::read_to_string(kept).unwrap(), seven);

    // Still stale: the next run evaluates the checks again, and fails again.
    let status = t.exec(&["status", "pipeline.yaml"]);
    assert!(status.stdout.contains("copy"), "{}", status.stdout);
    assert_eq!(run(&t, &[]).code, 1);

    // Back to data within bounds: the stage and its downstream run, the outputs move.
    let five = "id,x\n1,5\n2,7\n3,1\n4,2\n5,5\n";
    t.write("data.csv", five);
    let fixed = run(&t, &[]);
    assert_eq!(fixed.code, 0, "{}", fixed.stderr);
    assert_eq!(t.read("out/table.csv"), five);
    assert_eq!(t.read("out/count.txt"), "6\n");
}

#[test]
fn a_warn_check_commits_and_is_recorded() {
    let t = Test::new()
        .file("data.csv", "id,x\n1,5\n2,\n3,1\n")
        .pipeline(GUARDED);
    let out = run(&t, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    snapshot!(out.stderr);
    assert_eq!(t.read("out/table.csv"), "id,x\n1,5\n2,\n3,1\n");
    let record = last_record(&t);
    let checks = &stage(&record, "copy")["checks"];
    let statuses: Vec<(&str, &str, &str)> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["severity"].as_str().unwrap(),
                c["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("rows", "fail", "pass"),
            ("change(rows)", "fail", "pass"),
            ("not_null(x)", "warn", "fail")
        ]
    );
    assert_eq!(checks[2]["value"], serde_json::json!({"x": 1}));
    assert_eq!(checks[0]["value"], serde_json::json!(3));
    assert_eq!(
        checks[1]["detail"],
        "no baseline: no committed output to compare with (rows is 3)"
    );
}

/// One stage per kind of check, each failing; with `--keep-going` every failure is printed.
#[test]
fn every_kind_of_check_fails_with_the_measured_value_and_the_threshold() {
    let t = Test::new()
        .file("data.csv", "id,day,hour\n1,3,10\n1,,11\n2,40,25\n")
        .pipeline(
            r#"
stages:
  rows:
    cmd: cp data.csv {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/rows.csv]
    checks:
      - rows: {min: 10, max: 100}
  not_null:
    cmd: cp data.csv {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/not_null.csv]
    checks:
      - not_null: [id, day]
  unique:
    cmd: cp data.csv {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/unique.csv]
    checks:
      - unique: [id]
  range:
    cmd: cp data.csv {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/range.csv]
    checks:
      - range: {day: [0, 30], hour: [0, 23]}
  sql:
    cmd: cp data.csv {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/sql.csv]
    checks:
      - sql: SELECT max(hour) <= 23 FROM self
        name: hours_in_a_day
  error:
    cmd: cp data.csv {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/error.csv]
    checks:
      - sql: SELECT count(*) FROM self
  passing:
    cmd: cp data.csv {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/passing.csv]
    checks:
      - rows: {min: 3, max: 3}
      - not_null: [id, hour]
      - unique: [id, hour]
      - range: {day: [0, null]}
      - sql: SELECT count(*) = 3 AND min(hour) >= 10 FROM self
"#,
        );
    let out = run(&t, &["--keep-going"]);
    assert_eq!(out.code, 1);
    snapshot!(out.stderr);
    for failed in ["rows", "not_null", "unique", "range", "sql", "error"] {
        assert!(
            !t.path().join(format!("out/{failed}.csv")).exists(),
            "{failed} was committed"
        );
    }
    assert_eq!(t.read("out/passing.csv"), t.read("data.csv"));
}

#[test]
fn on_failure_gets_the_failure_as_json_on_stdin() {
    let t = Test::new().file("data.csv", "id\n1\n").pipeline(
        r#"
on_failure: cat > pipeline-hook.json
stages:
  checked:
    cmd: cp data.csv {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/checked.csv]
    checks:
      - rows: {min: 2}
    on_failure: cat > stage-hook.json; echo "IMBA_STAGE=$IMBA_STAGE" >> stage-hook.env
  broken:
    cmd: echo oops >&2; exit 4
    outputs: [out/broken.txt]
"#,
    );
    let out = run(&t, &["--keep-going"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    // The stage's own hook, not the pipeline's, for the stage that has one.
    let payload: serde_json::Value = serde_json::from_str(&t.read("stage-hook.json")).unwrap();
    assert_eq!(payload["event"], "stage_failed");
    assert_eq!(payload["stage"], "checked");
    assert_eq!(payload["pipeline"], "pipeline.yaml");
    assert_eq!(payload["checks"][0]["status"], "fail");
    assert_eq!(payload["checks"][0]["value"], 1);
    assert_eq!(payload["checks"][0]["expected"], "≥ 2");
    let quarantine = payload["quarantine"].as_str().expect("a quarantine folder");
    assert!(std::path::Path::new(quarantine)
        .join("out/checked.csv")
        .is_file());
    assert!(payload["error"]
        .as_str()
        .unwrap()
        .starts_with("a check failed; the outputs were not committed"));
    assert_eq!(t.read("stage-hook.env"), "IMBA_STAGE=checked\n");
    // The pipeline's hook for the stage without its own, with the command's failure.
    let payload: serde_json::Value = serde_json::from_str(&t.read("pipeline-hook.json")).unwrap();
    assert_eq!(payload["stage"], "broken");
    assert_eq!(payload["checks"], serde_json::json!([]));
    assert_eq!(payload["quarantine"], serde_json::Value::Null);
    assert!(payload["error"]
        .as_str()
        .unwrap()
        .contains("command failed with exit status 4"));
    let record = last_record(&t);
    assert_eq!(stage(&record, "broken")["hook"]["exit_status"], 0);
}

#[test]
fn a_failing_hook_is_reported_and_does_not_hide_the_failure() {
    let t = Test::new().file("data.csv", "id\n1\n").pipeline(
        r#"
on_failure: echo "pager unreachable" >&2; exit 3
stages:
  checked:
    cmd: cp data.csv {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/checked.csv]
    checks:
      - rows: {min: 2}
"#,
    );
    let out = run(&t, &[]);
    assert_eq!(out.code, 1);
    snapshot!(out.stderr);
    let record = last_record(&t);
    let hook = &stage(&record, "checked")["hook"];
    assert_eq!(hook["exit_status"], 3);
    assert_eq!(hook["error"], "exit status 3");
    let log = hook["log"]
        .as_str()
        .unwrap()
        .replace("[TMP]", t.path().to_str().unwrap());
    assert_eq!(std::fs::read_to_string(log).unwrap(), "pager unreachable\n");
}

#[test]
fn imba_checks_prints_the_latest_results() {
    let t = Test::new().file("data.csv", FOUR_ROWS).pipeline(GUARDED);
    let none = t.exec(&["checks", "pipeline.yaml"]);
    assert_eq!(none.code, 0);
    snapshot!("before_any_run", none.stdout);
    assert_eq!(run(&t, &[]).code, 0);
    t.write("data.csv", "id,x\n1,5\n");
    assert_eq!(run(&t, &[]).code, 1);
    let out = t.exec(&["checks", "pipeline.yaml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    snapshot!("after_a_failure", out.stdout);
    let json = t.exec(&["checks", "pipeline.yaml", "--json"]);
    let value: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(value[0]["stage"], "copy");
    assert_eq!(value[0]["decision"], "failed");
    assert_eq!(value[0]["checks"][0]["status"], "fail");
}

#[test]
fn editing_the_checks_reruns_the_stage() {
    let t = Test::new().file("data.csv", FOUR_ROWS).pipeline(GUARDED);
    assert_eq!(run(&t, &[]).code, 0);
    t.write("pipeline.yaml", GUARDED.replace("min: 2", "min: 3"));
    let status = t.exec(&["status", "pipeline.yaml"]);
    assert!(
        status.stdout.contains("checks changed"),
        "{}",
        status.stdout
    );
    let out = run(&t, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("run  copy (checks changed)"),
        "{}",
        out.stderr
    );
    // Same bytes out: the downstream stage is cut off.
    assert!(
        out.stderr.contains("skip count (up to date)"),
        "{}",
        out.stderr
    );
    // The change check compared against the table committed before: no change.
    let record = last_record(&t);
    assert_eq!(
        stage(&record, "copy")["checks"][1]["value"]["change_pct"],
        0.0
    );
}

#[test]
fn a_check_reads_a_table_inside_a_directory_output() {
    let t = Test::new().pipeline(
        r#"
stages:
  split:
    cmd:
      - printf 'k\n1\n2\n' > {{ outputs.dir }}/a.csv
      - printf 'k\n1\n1\n' > {{ outputs.dir }}/b.csv
    outputs: {dir: out/parts/}
    checks:
      - unique: [k]
        output: dir/a.csv
      - unique: k
        output: out/parts/b.csv
        severity: warn
"#,
    );
    let out = run(&t, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stderr
            .lines()
            .filter(|l| l.starts_with("warning:"))
            .collect::<Vec<_>>(),
        ["warning: stage `split`: check `unique(k)` missed (warn) on out/parts/b.csv: 1 row repeats an earlier `k`, first at row 2 (k=1)"]
    );
    assert_eq!(t.read("out/parts/a.csv"), "k\n1\n2\n");
}

/// A committed output cut short by hand is not a baseline: the stage re-runs and repairs it,
/// rather than failing for ever on a file it cannot read.
#[test]
fn an_output_changed_after_its_commit_is_not_a_change_baseline() {
    let t = Test::new().file("data.csv", FOUR_ROWS).pipeline(GUARDED);
    assert_eq!(run(&t, &[]).code, 0);
    // Half the rows gone: a "change" of 50% against this would pass, but it is not imba's.
    t.write("out/table.csv", "id,x\n1,5\n");
    // Without its run cache (a clone that never ran it), the stage is computed again; with it,
    // the table would simply be restored (tests/cache.rs).
    std::fs::remove_dir_all(t.path().join(".imba/cache")).unwrap();
    let out = run(&t, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("warning: `out/table.csv` was changed after imba committed it: the `change` checks of stage `copy` have no baseline this run"),
        "{}",
        out.stderr
    );
    assert_eq!(t.read("out/table.csv"), FOUR_ROWS);
    let record = last_record(&t);
    assert_eq!(
        stage(&record, "copy")["checks"][1]["detail"],
        "no baseline: no committed output to compare with (rows is 4)"
    );
}

/// The baseline of a versioned output is its latest version.
#[test]
fn a_versioned_output_is_compared_with_its_latest_version() {
    let t = Test::new().file("data.csv", FOUR_ROWS).pipeline(
        r#"
stages:
  copy:
    cmd: mkdir -p {{ outputs[0] }} && cp {{ inputs[0] }} {{ outputs[0] }}/table.csv
    inputs: [data.csv]
    outputs: [out/tables/]
    version: auto
    checks:
      - change: {metric: rows, max_pct: 30}
        output: out/tables/table.csv
"#,
    );
    assert_eq!(run(&t, &[]).code, 0);
    t.write("data.csv", "id,x\n1,5\n2,7\n3,1\n4,2\n5,0\n");
    let grew = run(&t, &[]);
    assert_eq!(grew.code, 0, "{}", grew.stderr);
    assert_eq!(
        stage(&last_record(&t), "copy")["checks"][0]["detail"],
        "rows changed by 25%: 4 → 5, expected ≤ 30%"
    );
    t.write("data.csv", "id,x\n1,5\n");
    let shrank = run(&t, &[]);
    assert_eq!(shrank.code, 1, "{}", shrank.stderr);
    assert!(
        shrank
            .stderr
            .contains("rows changed by 80%: 5 → 1, expected ≤ 30%"),
        "{}",
        shrank.stderr
    );
}

/// `imba quarantine` lists what checks kept out, and `imba gc --quarantine` clears it.
#[test]
fn quarantine_lists_what_checks_kept_out_and_gc_clears_it() {
    let t = Test::new().pipeline(
        "stages:\n  few:\n    cmd: printf 'id\\n1\\n' > {{ outputs.t }}\n    outputs: {t: out/t.csv}\n    checks:\n      - rows: {min: 10}\n",
    );
    let before = t.exec(&["quarantine", "pipeline.yaml"]);
    assert_eq!(run(&t, &[]).code, 1);
    let held = t.exec(&["quarantine", "pipeline.yaml"]);
    let dry = t.exec(&["gc", "pipeline.yaml", "--quarantine", "--dry-run"]);
    let gone = t.exec(&["gc", "pipeline.yaml", "--quarantine"]);
    let after = t.exec(&["quarantine", "pipeline.yaml"]);
    assert!(!t
        .path()
        .join(".imba/quarantine")
        .read_dir()
        .unwrap()
        .any(|_| true));
    insta::with_settings!({filters => vec![
        (r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}", "[RUN]"),
    ]}, {
        insta::assert_snapshot!(format!(
            "{}\n{}\n{}\n{}\n{}",
            before.all(),
            held.all(),
            dry.all(),
            gone.all(),
            after.all()
        ));
    });
}

/// `imba accept`: a person looked at what a check kept out and commits it, with a reason; the
/// stage is then up to date, and `imba checks` says it was accepted by hand. A stage that
/// changed since is refused.
#[test]
fn accept_commits_quarantined_outputs_with_a_reason() {
    let t = Test::new().pipeline(
        "stages:\n  few:\n    cmd: printf 'id\\n1\\n' > {{ outputs.t }}\n    outputs: {t: out/t.csv}\n    checks:\n      - rows: {min: 10}\n",
    );
    assert_eq!(run(&t, &[]).code, 1);
    assert!(!t.path().join("out/t.csv").exists());
    let run_id = last_record(&t)["id"].as_str().unwrap().to_owned();
    let accepted = t.exec(&[
        "accept",
        "pipeline.yaml",
        &run_id[..15],
        "few",
        "--reason",
        "a holiday month",
    ]);
    assert_eq!(accepted.code, 0, "{}", accepted.stderr);
    assert_eq!(t.read("out/t.csv"), "id\n1\n");
    let status = t.exec(&["status", "pipeline.yaml"]);
    assert_eq!(
        status.stdout, "all 1 stages are up to date\n",
        "{}",
        status.stderr
    );
    let checks = t.exec(&["checks", "pipeline.yaml"]);
    assert!(
        checks
            .stdout
            .contains("accepted by hand (a holiday month): 1 row, expected ≥ 10"),
        "{}",
        checks.stdout
    );
    let again = t.exec(&[
        "accept",
        "pipeline.yaml",
        &run_id,
        "few",
        "--reason",
        "again",
    ]);
    assert_eq!(again.code, 2);
    assert!(
        again.stderr.contains("holds nothing in quarantine"),
        "{}",
        again.stderr
    );

    // Quarantined again, then the stage changes: what is held is not what it would make now.
    t.write(
        "pipeline.yaml",
        "stages:\n  few:\n    cmd: printf 'id\\n2\\n' > {{ outputs.t }}\n    outputs: {t: out/t.csv}\n    checks:\n      - rows: {min: 10}\n",
    );
    assert_eq!(run(&t, &[]).code, 1);
    let second = last_record(&t)["id"].as_str().unwrap().to_owned();
    t.write(
        "pipeline.yaml",
        "stages:\n  few:\n    cmd: printf 'id\\n3\\n' > {{ outputs.t }}\n    outputs: {t: out/t.csv}\n    checks:\n      - rows: {min: 10}\n",
    );
    let changed = t.exec(&["accept", "pipeline.yaml", &second, "few", "--reason", "x"]);
    assert_eq!(changed.code, 2);
    assert!(
        changed.stderr.contains("changed since run"),
        "{}",
        changed.stderr
    );
    assert_eq!(t.read("out/t.csv"), "id\n1\n");
}
