//! Partitioned pipelines as a user runs them month after month: month-over-month checks,
//! choosing partitions on the command line, a failure kept inside its partition.

mod common;

use common::Test;

/// The decisions of the last run but `skipped`, as `name decision` lines.
fn decisions(t: &Test) -> Vec<String> {
    t.decisions()
        .into_iter()
        .filter(|(_, decision)| decision != "skipped")
        .map(|(name, decision)| format!("{name} {decision}"))
        .collect()
}

/// `n` data rows and a header.
fn rows(n: usize) -> String {
    let mut text = String::from("id\n");
    for i in 0..n {
        text.push_str(&format!("{i}\n"));
    }
    text
}

/// Three months of orders; `clean` copies a month, checked against the month before; `report`
/// reads the cleaned month.
fn monthly(sizes: [usize; 3]) -> Test {
    let mut t = Test::new();
    for (month, n) in ["2017-03", "2017-04", "2017-05"].iter().zip(sizes) {
        t = t.file(&format!("raw/{month}/orders.csv"), rows(n));
    }
    t.pipeline(
        r#"
vars:
  max_change_pct: 20
partitions:
  month:
    range: {from: 2017-03, to: 2017-05}
stages:
  clean:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: ["raw/{{ month }}/orders.csv"]
    outputs: ["out/{{ month }}/orders.csv"]
    checks:
      - change: {metric: rows, max_pct: "{{ max_change_pct }}", against: previous}
  report:
    cmd: wc -l < {{ inputs[0] }} > {{ outputs[0] }}
    inputs: ["out/{{ month }}/orders.csv"]
    outputs: ["out/{{ month }}/report.txt"]
"#,
    )
}

#[test]
fn a_month_that_shrinks_by_a_third_is_quarantined_and_the_others_commit() {
    let t = monthly([30, 30, 20]);
    let out = t.exec(&["run", "pipeline.yaml", "-j", "2"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    // The check names both months and both values.
    assert!(
        out.stderr
            .contains("rows changed by 33.33%: 30 in 2017-04 → 20 in 2017-05, expected ≤ 20%"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("partition 2017-05 failed"),
        "{}",
        out.stderr
    );
    assert_eq!(
        decisions(&t),
        [
            "clean@2017-03 ran",
            "clean@2017-04 ran",
            "clean@2017-05 failed",
            "report@2017-03 ran",
            "report@2017-04 ran",
            "report@2017-05 blocked",
        ]
    );
    assert!(t.path().join("out/2017-04/report.txt").is_file());
    assert!(!t.path().join("out/2017-05/orders.csv").exists());
    // The first month had nothing to compare with, and said so.
    let show = t.exec(&["show", "pipeline.yaml", "--json"]);
    let record: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let first = &record["stages"][0]["checks"][0];
    assert_eq!(
        first["detail"], "no baseline: 2017-03 is the first partition of `month` (rows is 30)",
        "{first}"
    );
    assert_eq!(record["stages"][2]["partition"], "2017-05");
}

#[test]
fn a_month_whose_previous_month_never_ran_has_no_baseline() {
    let t = monthly([30, 30, 20]);
    t.run_ok(&["--partition", "2017-05"]);
    assert_eq!(
        decisions(&t),
        ["clean@2017-05 ran", "report@2017-05 ran"],
        "only the chosen partition"
    );
    let show = t.exec(&["show", "pipeline.yaml", "--json"]);
    let record: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(
        record["stages"][0]["checks"][0]["detail"],
        "no baseline: 2017-04 has not run (rows is 20)"
    );
    // A backfill of the two before: 2017-04 compares with 2017-03, which runs first.
    t.run_ok(&["--partitions", "2017-03..2017-04"]);
    assert_eq!(
        decisions(&t),
        [
            "clean@2017-03 ran",
            "clean@2017-04 ran",
            "report@2017-03 ran",
            "report@2017-04 ran"
        ]
    );
}

#[test]
fn a_changed_month_is_checked_against_the_month_before_as_committed() {
    let t = monthly([30, 30, 30]);
    t.run_ok(&[]);
    // May's data is corrected: 35 rows, +16.7% on April's 30.
    t.write("raw/2017-05/orders.csv", rows(35));
    let out = t.run_ok(&["--latest"]);
    assert_eq!(
        decisions(&t),
        ["clean@2017-05 ran", "report@2017-05 ran"],
        "{}",
        out.stderr
    );
    // April shrinks: April fails against March; May is not run again (its input did not
    // change), and stays as committed.
    t.write("raw/2017-04/orders.csv", rows(10));
    let out = t.exec(&["run", "pipeline.yaml"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("30 in 2017-03 → 10 in 2017-04"),
        "{}",
        out.stderr
    );
    assert_eq!(
        decisions(&t),
        ["clean@2017-04 failed", "report@2017-04 blocked"]
    );
    assert_eq!(t.read("out/2017-05/report.txt").trim(), "36");
}

#[test]
fn partition_options_name_what_is_wrong() {
    let t = monthly([30, 30, 30]);
    let out = t.exec(&["run", "pipeline.yaml", "--partition", "2017-13"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        "error: no partition is `2017-13` (did you mean `2017-03`?); `month` has 3 partitions: 2017-03, 2017-04, 2017-05"
    );
    let out = t.exec(&["run", "pipeline.yaml", "--partitions", "2017-05..2017-03"]);
    assert_eq!(out.code, 2);
    assert_eq!(
        out.stderr.trim_end(),
        "error: --partitions 2017-05..2017-03 goes backwards: in `month`, 2017-03 comes before 2017-05"
    );
    let out = t.exec(&["run", "pipeline.yaml", "--partitions", "2017-05"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("expected FROM..TO, e.g. 2017-01..2017-06"),
        "{}",
        out.stderr
    );
}

#[test]
fn against_previous_needs_a_partitioned_stage() {
    let t = Test::new().file("a.csv", "x\n1\n").pipeline(
        r#"
stages:
  copy:
    cmd: cp a.csv {{ outputs[0] }}
    outputs: [out/a.csv]
    checks:
      - change: {metric: rows, max_pct: 10, against: previus}
      - change: {metric: rows, max_pct: 10, against: previous}
"#,
    );
    let out = t.exec(&["validate", "pipeline.yaml"]);
    assert_eq!(out.code, 2);
    insta::assert_snapshot!(out.all());
}

#[test]
fn a_failure_stops_its_own_partition_and_no_other() {
    let t = Test::new().pipeline(
        r#"
partitions:
  month:
    values: [2017-01, 2017-02, 2017-03]
stages:
  extract:
    cmd: test {{ month }} != 2017-02 && echo {{ month }} > {{ outputs[0] }}
    outputs: ["out/{{ month }}/extract.txt"]
  side:
    cmd: echo {{ month }} > {{ outputs[0] }}
    outputs: ["out/{{ month }}/side.txt"]
  load:
    cmd: cat {{ inputs[0] }} > {{ outputs[0] }}
    inputs: ["out/{{ month }}/extract.txt"]
    outputs: ["out/{{ month }}/load.txt"]
  model:
    cmd: cat {{ inputs }} > {{ outputs[0] }}
    inputs: ["{{ expand('out/{month}/load.txt', month=partitions.month.all) }}"]
    outputs: [out/model.txt]
"#,
    );
    // One job: stages start one at a time, oldest partition first.
    let out = t.exec(&["run", "pipeline.yaml", "-j", "1"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(
        decisions(&t),
        [
            "extract@2017-01 ran",
            "extract@2017-02 failed",
            "extract@2017-03 ran",
            "side@2017-01 ran",
            "side@2017-02 blocked",
            "side@2017-03 ran",
            "load@2017-01 ran",
            "load@2017-02 blocked",
            "load@2017-03 ran",
            "model blocked",
        ]
    );
    assert!(
        out.stderr.contains("; partition 2017-02 failed"),
        "{}",
        out.stderr
    );
}

/// Each month's `extract`, and `model` over all of them through `expand('PATTERN', …)`.
const FAN_IN: &str = r#"
partitions:
  month:
    values: [2017-01, 2017-02]
stages:
  extract:
    cmd: echo {{ month }} > {{ outputs[0] }}
    outputs: ["out/{{ month }}/extract.txt"]
  model:
    cmd: cat {{ inputs }} > {{ outputs[0] }}
    inputs: ["{{ expand('PATTERN', month=partitions.month.all) }}"]
    outputs: [out/model.txt]
"#;

#[test]
fn a_stage_over_every_partition_reads_each_output() {
    let t = Test::new().pipeline(&FAN_IN.replace("PATTERN", "out/{month}/extract.txt"));
    t.run_ok(&[]);
    assert_eq!(t.read("out/model.txt"), "2017-01\n2017-02\n");
    let dag = t.exec(&["dag", "pipeline.yaml", "--dot"]);
    assert!(
        dag.stdout.contains("\"extract@2017-02\" -> \"model\""),
        "{}",
        dag.stdout
    );
}

#[test]
fn status_shows_each_partition_by_stage() {
    // March and April run; May fails its check; June's data lands after.
    let t = monthly([30, 30, 20]);
    let yaml = t.read("pipeline.yaml").replace(
        "range: {from: 2017-03, to: 2017-05}",
        "range: {from: 2017-03, to: 2017-06}",
    ) + r#"  summary:
    cmd: cat {{ inputs }} > {{ outputs[0] }}
    inputs: ["{{ expand('out/{month}/report.txt', month=partitions.month.all) }}"]
    outputs: [out/summary.txt]
"#;
    t.write("pipeline.yaml", yaml);
    t.write("raw/2017-06/orders.csv", rows(20));
    let out = t.exec(&["run", "pipeline.yaml", "--partitions", "2017-03..2017-05"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    // March's data is corrected since.
    t.write("raw/2017-03/orders.csv", rows(31));
    let status = t.exec(&["status", "pipeline.yaml"]);
    insta::assert_snapshot!(status.all());
    let json = t.exec(&["status", "pipeline.yaml", "--json"]);
    let value: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(value["partitions"][2]["key"], "2017-05");
    assert_eq!(value["partitions"][2]["stages"]["clean"], "quarantined");
    assert_eq!(value["partitions"][3]["stages"]["report"], "never_run");
    assert_eq!(value["stages"][0]["state"], "stale");
    let reasons = t.exec(&["status", "pipeline.yaml", "--reasons", "--latest"]);
    insta::assert_snapshot!(reasons.all());
}

/// Months found as `raw/{month}/orders.csv`.
fn discovered(months: &[(&str, usize)]) -> Test {
    let mut t = Test::new();
    for (month, n) in months {
        t = t.file(&format!("raw/{month}/orders.csv"), rows(*n));
    }
    t.file("raw/README.md", "not a month\n").pipeline(
        r#"
vars:
  raw: raw
partitions:
  month:
    discover: "{{ raw }}/{month}/orders.csv"
stages:
  clean:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: ["{{ raw }}/{{ month }}/orders.csv"]
    outputs: ["out/{{ month }}/orders.csv"]
    params: {keep: all}
"#,
    )
}

#[test]
fn discovered_months_run_and_a_new_month_runs_alone() {
    let t = discovered(&[("2017-02", 5), ("2016-12", 5), ("2017-01", 5)]);
    t.run_ok(&[]);
    assert_eq!(
        decisions(&t),
        [
            "clean@2016-12 ran",
            "clean@2017-01 ran",
            "clean@2017-02 ran"
        ]
    );
    t.write("raw/2017-03/orders.csv", rows(6));
    t.run_ok(&[]);
    assert_eq!(decisions(&t), ["clean@2017-03 ran"]);
    // A param changes: every month's instance runs again, and nothing else.
    let yaml = t.read("pipeline.yaml").replace("keep: all", "keep: some");
    t.write("pipeline.yaml", &yaml);
    t.run_ok(&[]);
    assert_eq!(decisions(&t).len(), 4);
    // Back to what it was: the run cache knows every month; nothing is computed.
    t.write("pipeline.yaml", yaml.replace("keep: some", "keep: all"));
    t.run_ok(&[]);
    let computed: Vec<(String, String)> = t
        .decisions()
        .into_iter()
        .filter(|(_, d)| d != "cached" && d != "restored")
        .collect();
    assert_eq!(computed, []);
}

#[test]
fn discovered_keys_are_checked_and_name_their_paths() {
    let t = discovered(&[("2017-01", 5), ("2017-13", 5)]);
    let out = t.exec(&["validate", "pipeline.yaml"]);
    assert_eq!(out.code, 2);
    insta::assert_snapshot!("invalid_month", out.all());
    // Two paths with the same key, through a `*`.
    let t = Test::new()
        .file("raw/a/2017-01/orders.csv", "id\n1\n")
        .file("raw/b/2017-01/orders.csv", "id\n1\n")
        .pipeline(
            r#"
partitions:
  month:
    discover: "raw/*/{month}/orders.csv"
stages:
  clean:
    cmd: echo {{ month }} > {{ outputs[0] }}
    outputs: ["out/{{ month }}.txt"]
"#,
        );
    let out = t.exec(&["validate", "pipeline.yaml"]);
    assert_eq!(out.code, 2);
    insta::assert_snapshot!("same_key_twice", out.all());
    // Nothing matches.
    let t = Test::new().file("raw/x.csv", "id\n").pipeline(
        r#"
partitions:
  month:
    discover: "raw/{month}/orders.csv"
stages:
  clean:
    cmd: echo {{ month }} > {{ outputs[0] }}
    outputs: ["out/{{ month }}.txt"]
"#,
    );
    let out = t.exec(&["validate", "pipeline.yaml"]);
    assert_eq!(out.code, 2);
    insta::assert_snapshot!("nothing_matches", out.all());
    // Several files in one month's folder are that month, once; weeks sort as numbers.
    let t = Test::new()
        .file("raw/w2/part-1.csv", "id\n1\n")
        .file("raw/w2/part-2.csv", "id\n2\n")
        .file("raw/w10/part-1.csv", "id\n3\n")
        .pipeline(
            r#"
partitions:
  week:
    discover: "raw/{week}/part-*.csv"
stages:
  merge:
    cmd: cat {{ inputs[0] }}/*.csv > {{ outputs[0] }}
    inputs: ["raw/{{ week }}/"]
    outputs: ["out/{{ week }}.csv"]
"#,
        );
    let dag = t.exec(&["dag", "pipeline.yaml"]);
    assert_eq!(dag.code, 0, "{}", dag.stderr);
    let names: Vec<&str> = dag.stdout.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(names, ["merge@w2 [cmd]", "merge@w10 [cmd]"]);
}

/// Three months of orders with a cleaned table and a JSON summary, each with `metrics:`.
fn with_metrics() -> Test {
    let mut t = Test::new();
    for (month, rows) in [
        ("2017-03", "id,days\n1,3\n2,5\n3,\n"),
        ("2017-04", "id,days\n1,4\n2,6\n3,8\n4,2\n"),
        ("2017-05", "id,days\n1,10\n"),
    ] {
        t = t.file(&format!("raw/{month}/orders.csv"), rows);
    }
    t.pipeline(
        r#"
partitions:
  month:
    discover: "raw/{month}/orders.csv"
stages:
  clean:
    cmd: >-
      cp {{ inputs[0] }} {{ outputs.table }} && echo '{"files": 1}' > {{ outputs.summary }}
    inputs: ["raw/{{ month }}/orders.csv"]
    outputs:
      table: "out/{{ month }}/orders.csv"
      summary: "out/{{ month }}/summary.json"
    metrics:
      rows: rows
      mean_days: mean(days)
      late: {sql: "SELECT count(*) FROM self WHERE days > 4", output: table}
      files: {json: /files, output: summary}
  total:
    cmd: cat {{ inputs }} | wc -l > {{ outputs[0] }}
    inputs: ["{{ expand('out/{month}/orders.csv', month=partitions.month.all) }}"]
    outputs: [out/total.csv]
"#,
    )
}

#[test]
fn metrics_follow_each_month() {
    let t = with_metrics();
    t.run_ok(&["--partitions", "2017-03..2017-04"]);
    let table = t.exec(&["metrics", "pipeline.yaml"]);
    insta::assert_snapshot!(table.all());
    t.run_ok(&[]);
    let json = t.exec(&["metrics", "pipeline.yaml", "--json", "--stage", "clean"]);
    let value: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let rows = &value["metrics"][0];
    assert_eq!(rows["metric"], "rows");
    let points: Vec<(String, f64)> = rows["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].as_str().unwrap().to_owned(),
                p["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        points,
        [
            ("2017-03".to_owned(), 3.0),
            ("2017-04".to_owned(), 4.0),
            ("2017-05".to_owned(), 1.0)
        ]
    );
    assert_eq!(rows["points"][2]["change_pct"], -75.0);
    // CloudWatch EMF: one line per month, its metrics and dimensions.
    let emf = t.exec(&["metrics", "pipeline.yaml", "--emf", "--namespace", "shop"]);
    let lines: Vec<serde_json::Value> = emf
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{}", emf.stdout);
    let may = &lines[2];
    assert_eq!(may["Partition"], "2017-05");
    assert_eq!(may["Stage"], "clean");
    assert_eq!(may["Pipeline"], "pipeline");
    assert_eq!(may["rows"], 1.0);
    assert_eq!(may["mean_days"], 10.0);
    let directive = &may["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], "shop");
    // The newest month also counts across months, for an alarm on the month that just ran.
    assert_eq!(
        directive["Dimensions"],
        serde_json::json!([["Pipeline", "Stage", "Partition"], ["Pipeline", "Stage"]])
    );
    assert_eq!(
        lines[1]["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
        serde_json::json!([["Pipeline", "Stage", "Partition"]])
    );
    assert_eq!(
        directive["Metrics"][3],
        serde_json::json!({"Name": "rows", "Unit": "Count"})
    );
    assert!(may["_aws"]["Timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    // Stamped at commit: the same lines again, byte for byte.
    let again = t.exec(&["metrics", "pipeline.yaml", "--emf", "--namespace", "shop"]);
    assert_eq!(again.stdout, emf.stdout);
}

#[test]
fn a_metric_added_later_is_measured_on_the_committed_outputs() {
    let t = with_metrics();
    t.run_ok(&[]);
    let yaml = t.read("pipeline.yaml").replace(
        "      rows: rows\n",
        "      rows: rows\n      missing: null_fraction(days)\n",
    );
    t.write("pipeline.yaml", yaml);
    // Nothing is stale: a metric is not part of a stage's fingerprint.
    let status = t.exec(&["status", "pipeline.yaml"]);
    assert!(status.stdout.contains("3 up to date"), "{}", status.stdout);
    let json = t.exec(&["metrics", "pipeline.yaml", "--json"]);
    let value: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let missing = value["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == "missing")
        .unwrap();
    let first = missing["points"][0]["value"].as_f64().unwrap();
    assert!((first - 1.0 / 3.0).abs() < 1e-12, "{first}");
}

#[test]
fn the_metrics_chart_has_a_point_per_partition_and_its_axes() {
    let t = with_metrics();
    t.run_ok(&[]);
    let out = t.exec(&["metrics", "pipeline.yaml", "--plot", "metrics.svg"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stderr,
        "drew 4 metrics over 3 partitions of `month` into metrics.svg\n"
    );
    let svg = t.read("metrics.svg");
    // Four panels of three points each.
    assert_eq!(svg.matches("<circle").count(), 12, "{svg}");
    for label in ["month", "mean_days", "2017-03", "2017-05", "rows", "late"] {
        assert!(
            svg.contains(&format!(">\n{label}\n</text>")),
            "no `{label}` in the chart"
        );
    }
    let png = t.exec(&[
        "metrics",
        "pipeline.yaml",
        "--plot",
        "metrics.png",
        "--stage",
        "clean",
    ]);
    assert_eq!(png.code, 0, "{}", png.stderr);
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(t.path().join("metrics.png")).unwrap(),
    ));
    let reader = decoder.read_info().unwrap();
    assert_eq!((reader.info().width, reader.info().height), (900, 4 * 300));
}

/// The shipped partitioned pipeline and its three sample months, in a temp dir of their own.
fn shipped() -> Test {
    let repo = common::repo();
    let mut t = Test::new()
        .file(
            "pipelines/monthly_partitioned.yaml",
            std::fs::read(repo.join("pipelines/monthly_partitioned.yaml")).unwrap(),
        )
        .file(
            "pipelines/monthly.yaml",
            std::fs::read(repo.join("pipelines/monthly.yaml")).unwrap(),
        );
    for month in ["2017-03", "2017-04", "2017-05"] {
        let path = format!("examples/instacart/months/{month}/orders.csv");
        t = t.file(&path, std::fs::read(repo.join(&path)).unwrap());
    }
    t
}

const SHIPPED: &str = "pipelines/monthly_partitioned.yaml";

/// The stages that ran in the last run of the shipped pipeline.
fn ran_in(t: &Test) -> Vec<String> {
    t.decisions_of(SHIPPED)
        .into_iter()
        .filter(|(_, d)| d == "ran")
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn the_shipped_pipeline_runs_each_month_then_only_what_changed() {
    let t = shipped();
    let run = |args: &[&str]| {
        let mut all = vec!["run", SHIPPED];
        all.extend_from_slice(args);
        let out = t.exec(&all);
        assert_eq!(out.code, 0, "{}", out.stderr);
    };
    run(&[]);
    assert_eq!(ran_in(&t).len(), 15, "five stages in each of three months");
    // Each month's outputs are laid out as monthly.yaml lays out one month, byte for byte.
    let single = t.exec(&[
        "run",
        "pipelines/monthly.yaml",
        "--set",
        "input=examples/instacart/months/2017-04/orders.csv",
        "--set",
        "out=out/single",
    ]);
    assert_eq!(single.code, 0, "{}", single.stderr);
    let month = common::tree(&t.path().join("out/monthly_partitioned/2017-04"));
    let alone = common::tree(&t.path().join("out/single"));
    assert_eq!(
        month.keys().collect::<Vec<_>>(),
        alone.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in &month {
        if path.ends_with(".parquet") && !path.starts_with("features/") {
            assert!(alone[path] == *bytes, "{path} differs");
        }
    }
    // A fourth month lands: only its stages run.
    t.write(
        "examples/instacart/months/2017-06/orders.csv",
        t.read("examples/instacart/months/2017-03/orders.csv"),
    );
    run(&[]);
    let ran = ran_in(&t);
    assert_eq!(ran.len(), 5, "{ran:?}");
    assert!(ran.iter().all(|n| n.ends_with("@2017-06")), "{ran:?}");
    // A param of one stage: that stage and what follows it, in every month.
    let yaml = t.read(SHIPPED);
    t.write(SHIPPED, yaml.replace("iterations: 10", "iterations: 12"));
    run(&[]);
    let mut ran = ran_in(&t);
    ran.sort();
    let mut expected: Vec<String> = ["diagnose_imputation", "impute_days", "user_features"]
        .iter()
        .flat_map(|s| {
            ["2017-03", "2017-04", "2017-05", "2017-06"]
                .iter()
                .map(move |m| format!("{s}@{m}"))
        })
        .collect();
    expected.sort();
    assert_eq!(ran, expected);
    // Back again: the run cache has every month's results; nothing is computed.
    t.write(SHIPPED, yaml);
    run(&[]);
    assert_eq!(ran_in(&t), Vec::<String>::new());
}

#[test]
fn a_month_with_a_third_fewer_orders_is_quarantined_and_the_others_commit() {
    let t = shipped();
    // June: the first two thirds of May's users (orders are sorted by user).
    let may = t.read("examples/instacart/months/2017-05/orders.csv");
    let lines: Vec<&str> = may.lines().collect();
    let cut = lines.len() * 2 / 3;
    let cut = (cut..lines.len())
        .find(|&i| lines[i].split(',').nth(1) != lines[i - 1].split(',').nth(1))
        .unwrap();
    t.write(
        "examples/instacart/months/2017-06/orders.csv",
        lines[..cut].join("\n") + "\n",
    );
    let out = t.exec(&["run", SHIPPED]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let error = out
        .stderr
        .lines()
        .find(|l| l.contains("rows changed by"))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert!(
        error.contains("in 2017-05 →") && error.contains("in 2017-06, expected ≤ 20%"),
        "{error}"
    );
    assert!(
        out.stderr.contains("; partition 2017-06 failed"),
        "{}",
        out.stderr
    );
    let decisions = t.decisions_of(SHIPPED);
    let failed: Vec<&str> = decisions
        .iter()
        .filter(|(_, d)| d != "ran")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        failed,
        [
            "clean_orders@2017-06",
            "aggregate_users@2017-06",
            "impute_days@2017-06",
            "diagnose_imputation@2017-06",
            "user_features@2017-06"
        ]
    );
    assert!(t
        .path()
        .join("out/monthly_partitioned/2017-05/features/LATEST")
        .is_file());
    assert!(!t
        .path()
        .join("out/monthly_partitioned/2017-06/cleaned/orders.parquet")
        .exists());
    let status = t.exec(&["status", SHIPPED]);
    assert!(
        status.stdout.contains("2017-06  quarantined   never run"),
        "{}",
        status.stdout
    );
}

#[test]
fn expand_names_what_it_cannot_fill() {
    let t = Test::new().pipeline(&FAN_IN.replace("PATTERN", "out/{mnth}/extract.txt"));
    let out = t.exec(&["validate", "pipeline.yaml"]);
    assert_eq!(out.code, 2);
    insta::assert_snapshot!(out.all());
}

#[test]
fn a_backfill_compares_each_month_with_the_month_before_as_just_computed() {
    // January is slow and February fast: February computes beside it, then waits at its check
    // for January's commit.
    let t = Test::new()
        .file("raw/2017-01.csv", rows(30))
        .file("raw/2017-02.csv", rows(20))
        .pipeline(
            r#"
partitions:
  month:
    values: [2017-01, 2017-02]
stages:
  clean:
    cmd: |
      if [ {{ month }} = 2017-01 ]; then sleep 1; fi
      cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: ["raw/{{ month }}.csv"]
    outputs: ["out/{{ month }}.csv"]
    checks:
      - change: {metric: rows, max_pct: 20, against: previous}
"#,
        );
    let out = t.exec(&["run", "pipeline.yaml", "-j", "2"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("30 in 2017-01 → 20 in 2017-02"),
        "{}",
        out.stderr
    );
    assert_eq!(decisions(&t), ["clean@2017-01 ran", "clean@2017-02 failed"]);
}

#[test]
fn a_month_after_a_failed_month_is_not_compared_with_a_stale_baseline() {
    let t = monthly([30, 30, 30]);
    t.run_ok(&[]);
    // April shrinks and fails its check; May, unchanged, is not compared with the April
    // committed before this run.
    t.write("raw/2017-04/orders.csv", rows(10));
    t.write("raw/2017-05/orders.csv", rows(31));
    let out = t.exec(&["run", "pipeline.yaml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "warning: stage `clean@2017-05`: its month-over-month check has no baseline: `clean@2017-04` failed in this run; once 2017-04 is committed, `--stage clean@2017-05 --force` checks it"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(
        decisions(&t),
        [
            "clean@2017-04 failed",
            "clean@2017-05 ran",
            "report@2017-04 blocked",
            "report@2017-05 ran"
        ]
    );
}
