//! `version: auto`: a new immutable version only when the content differs, `LATEST`, `keep`,
//! metadata, and a version changed by hand refused; with the `feature` stage.

mod common;

use common::Test;

const PIPELINE: &str = r#"
stages:
  user_features:
    uses: feature
    inputs: {orders: orders.csv}
    outputs: {features: out/features/}
    version: auto
    keep: 2
    params:
      entity: user_id
      formats: [parquet, csv]
      groups:
        - name: orders
          from: orders
          desc: Ordering habits
          features:
            - order_count: {sql: "count(*)", desc: Orders placed}
            - days_mean: avg(days)
"#;

/// The pipeline with one more feature: new definitions.
fn with_days_max() -> String {
    PIPELINE.replace(
        "            - days_mean: avg(days)\n",
        "            - days_mean: avg(days)\n            - days_max: max(days)\n",
    )
}

fn run(t: &Test, args: &[&str]) -> common::Output {
    let mut all = vec!["run", "pipeline.yaml"];
    all.extend(args);
    let out = t.exec(&all);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out
}

fn latest(t: &Test) -> String {
    t.read("out/features/LATEST").trim().to_owned()
}

#[test]
fn versions_are_made_only_when_the_content_changes_and_never_rewritten() {
    let t = Test::new()
        .file("orders.csv", "user_id,days\n1,3\n1,5\n2,7\n")
        .pipeline(PIPELINE);
    run(&t, &[]);
    assert_eq!(latest(&t), "features_v1");
    assert_eq!(
        t.read("out/features/features_v1/features.csv"),
        "user_id,order_count,days_mean\n1,2,4.0\n2,1,7.0\n"
    );
    let meta: serde_json::Value =
        serde_json::from_str(&t.read("out/features/features_v1/_meta.json")).unwrap();
    assert_eq!(meta["version"], 1);
    assert_eq!(meta["stage"], "user_features");
    assert_eq!(
        meta["report"]["descriptions"]["order_count"],
        "Orders placed"
    );
    assert_eq!(meta["tables"]["features.parquet"]["rows"], 2);
    assert_eq!(
        meta["tables"]["features.parquet"]["columns"][2]["mean"],
        5.5
    );
    assert_eq!(meta["files"].as_array().unwrap().len(), 2);
    assert!(meta["inputs"]["orders.csv"]["hash"].is_string());
    assert_eq!(meta["definitions_hash"].as_str().map(str::len), Some(64));

    // Forced, same bytes: the same version, nothing new.
    let forced = run(&t, &["--force"]);
    assert!(
        forced.stderr.contains("outputs unchanged"),
        "{}",
        forced.stderr
    );
    assert_eq!(latest(&t), "features_v1");
    assert!(!t.path().join("out/features/features_v2").exists());

    // New data: v2.
    t.write("orders.csv", "user_id,days\n1,3\n1,5\n2,7\n3,1\n");
    run(&t, &[]);
    assert_eq!(latest(&t), "features_v2");

    // New definitions: v3, and with `keep: 2` v1 moves to the archive, untouched.
    let v1 = t.read("out/features/features_v1/features.csv");
    t.write("pipeline.yaml", with_days_max());
    run(&t, &[]);
    assert_eq!(latest(&t), "features_v3");
    assert_eq!(t.read("out/archive/features_v1/features.csv"), v1);
    assert!(t.path().join("out/features/features_v2").is_dir());
    assert!(!t.path().join("out/features/features_v1").exists());
    assert!(t
        .read("out/features/features_v3/features.csv")
        .starts_with("user_id,order_count,days_mean,days_max\n"));

    // Up to date: nothing runs.
    let again = run(&t, &[]);
    assert!(
        again.stderr.contains("0 ran, 1 up to date"),
        "{}",
        again.stderr
    );

    // A version changed by hand is found, and the commit refuses to touch it.
    t.write("out/features/features_v3/features.csv", "tampered\n");
    let status = t.exec(&["status", "pipeline.yaml"]);
    assert!(
        status.stdout.contains("output out/features was modified"),
        "{}",
        status.stdout
    );
    let refused = t.exec(&["run", "pipeline.yaml"]);
    assert_eq!(refused.code, 1);
    let error = refused.stage_error().to_owned();
    assert!(
        error.contains("features_v3 was modified after it was written (`features.csv` differs from its _meta.json); versions are immutable"),
        "{error}"
    );
    assert_eq!(
        t.read("out/features/features_v3/features.csv"),
        "tampered\n"
    );
}

/// Three versions: the first orders, more orders (v2), then a new feature (v3; with `keep: 2`
/// v1 is archived).
fn three_versions() -> Test {
    let t = Test::new()
        .file("orders.csv", "user_id,days\n1,3\n1,5\n2,7\n")
        .pipeline(PIPELINE);
    run(&t, &[]);
    t.write("orders.csv", "user_id,days\n1,3\n1,5\n2,7\n3,9\n");
    run(&t, &[]);
    t.write("pipeline.yaml", with_days_max());
    run(&t, &[]);
    t
}

#[test]
fn imba_versions_lists_and_compares() {
    let t = three_versions();
    let list = t.exec(&["versions", "pipeline.yaml"]);
    let diff = t.exec(&["versions", "diff", "pipeline.yaml", "v1", "3"]);
    let missing = t.exec(&["versions", "diff", "pipeline.yaml", "1", "v7"]);
    insta::with_settings!({filters => vec![
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "[CREATED]"),
        (r"  [0-9a-f]{12}  ", "  [FINGERPRINT]  "),
    ]}, {
        insta::assert_snapshot!(format!("{}\n{}\n{}", list.all(), diff.all(), missing.all()));
    });
    let json: serde_json::Value =
        serde_json::from_str(&t.exec(&["versions", "pipeline.yaml", "--json"]).stdout).unwrap();
    assert_eq!(json[1]["changed"], serde_json::json!(["orders.csv"]));
    assert_eq!(json[2]["changed"], serde_json::json!(["params"]));
    assert_eq!(json[2]["latest"], true);
    assert_eq!(json[0]["archived"], true);
}

/// `kill -9` while a versioned stage is writing: no half-written version appears, and the next
/// run makes the version whole.
#[test]
fn a_killed_run_leaves_no_partial_version() {
    let t = Test::new().pipeline(
        "stages:\n  parts:\n    cmd: echo a > {{ outputs[0] }}/a.csv && if [ -e slow ]; then sleep 30; fi && echo b > {{ outputs[0] }}/b.csv\n    outputs: [out/parts/]\n    version: auto\n",
    );
    t.write("slow", "");
    // No pipes: the stage's `sleep`, left behind by the kill, must not hold the test's output open.
    let mut child = t
        .command(&["run", "pipeline.yaml"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let staged = |dir: &std::path::Path| {
        walkdir::WalkDir::new(dir)
            .into_iter()
            .flatten()
            .any(|e| e.file_name() == "a.csv")
    };
    while !staged(&t.path().join(".imba/staging")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the stage never started writing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !t.path().join("out/parts/parts_v1").exists(),
        "no version before the stage finished"
    );
    assert!(!t.path().join("out/parts/LATEST").exists());

    std::fs::remove_file(t.path().join("slow")).unwrap();
    run(&t, &[]);
    assert_eq!(t.read("out/parts/LATEST"), "parts_v1\n");
    assert_eq!(t.read("out/parts/parts_v1/b.csv"), "b\n");
}

/// Two versions with the same content (the first was archived by `keep:` before the content
/// came back): the diff says so instead of listing every mean at +0.00%.
#[test]
fn a_diff_of_identical_versions_says_so() {
    let t = three_versions();
    t.write("orders.csv", "user_id,days\n1,3\n1,5\n2,7\n");
    t.write("pipeline.yaml", PIPELINE);
    run(&t, &[]);
    let same = t.exec(&["versions", "diff", "pipeline.yaml", "1", "4"]);
    assert_eq!(same.code, 0, "{}", same.stderr);
    assert!(
        same.stdout
            .starts_with("features_v1 → features_v4: identical content (same content hash "),
        "{}",
        same.stdout
    );
    let json = t.exec(&["versions", "diff", "pipeline.yaml", "1", "4", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(json["identical"], true);
    let other = t.exec(&["versions", "diff", "pipeline.yaml", "1", "2", "--json"]);
    let other: serde_json::Value = serde_json::from_str(&other.stdout).unwrap();
    assert_eq!(other["identical"], false);
}

/// `imba gc --archive` removes what `keep:` archived, never a version in place.
#[test]
fn gc_archive_removes_archived_versions_only() {
    let t = Test::new()
        .file("orders.csv", "user_id,days\n1,3\n1,5\n2,7\n")
        .pipeline(PIPELINE);
    run(&t, &[]);
    t.write("orders.csv", "user_id,days\n1,3\n1,5\n2,7\n3,9\n");
    run(&t, &[]);
    t.write("orders.csv", "user_id,days\n1,3\n1,5\n2,7\n3,9\n4,1\n");
    run(&t, &[]);
    assert!(t.path().join("out/archive/features_v1").is_dir());
    let dry = t.exec(&["gc", "pipeline.yaml", "--archive", "--dry-run"]);
    assert_eq!(
        dry.stdout, "would remove 1 archived version\n",
        "{}",
        dry.stderr
    );
    assert!(t.path().join("out/archive/features_v1").is_dir());
    let kept = t.exec(&["gc", "pipeline.yaml", "--archive", "--older-than", "1d"]);
    assert_eq!(
        kept.stdout, "removed 0 archived versions\n",
        "{}",
        kept.stderr
    );
    let gone = t.exec(&["gc", "pipeline.yaml", "--archive"]);
    assert_eq!(
        gone.stdout, "removed 1 archived version\n",
        "{}",
        gone.stderr
    );
    assert!(!t.path().join("out/archive/features_v1").exists());
    assert!(t.path().join("out/features/features_v2").is_dir());
    assert!(t.path().join("out/features/features_v3").is_dir());
}
