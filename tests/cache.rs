//! The local run cache: a fingerprint computed once is never computed again in this workdir.
//! Alternating `out` folders, a param changed and changed back, a reverted experiment that a
//! `change` check would otherwise block, versioned outputs, corrupt blobs, and what `status`,
//! `imba cache` and `imba gc` say.

mod common;

use common::Test;

fn monthly() -> Test {
    common::monthly("")
}

fn run(t: &Test, args: &[&str]) -> common::Output {
    let mut all = vec!["run", "pipelines/monthly.yaml"];
    all.extend_from_slice(args);
    let out = t.exec(&all);
    assert_eq!(out.code, 0, "run failed:\n{}", out.stderr);
    out
}

/// `STAGE DECISION` of each stage in the latest run.
fn decisions(t: &Test) -> Vec<String> {
    t.decisions_of("pipelines/monthly.yaml")
        .into_iter()
        .map(|(stage, decision)| format!("{stage} {decision}"))
        .collect()
}

fn all(decision: &str) -> Vec<String> {
    [
        "clean_orders",
        "aggregate_users",
        "impute_days",
        "diagnose_imputation",
        "user_features",
    ]
    .iter()
    .map(|s| format!("{s} {decision}"))
    .collect()
}

#[test]
fn alternating_out_folders_compute_nothing_the_third_time() {
    let t = monthly();
    run(&t, &["--set", "out=out/a"]);
    let first = common::tree(&t.path().join("out/a"));
    run(&t, &["--set", "out=out/b"]);
    assert_eq!(decisions(&t), all("ran"));
    let third = run(&t, &["--set", "out=out/a"]);
    assert_eq!(decisions(&t), all("cached"), "{}", third.stderr);
    assert!(
        third.stderr.contains("0 ran, 5 up to date, 0 failed"),
        "{}",
        third.stderr
    );
    assert_eq!(common::tree(&t.path().join("out/a")), first);
    // The lock now describes out/a: a fourth run skips as any up-to-date run does.
    run(&t, &["--set", "out=out/a"]);
    assert_eq!(decisions(&t), all("skipped"));
    let status = t.exec(&["status", "pipelines/monthly.yaml", "--set", "out=out/a"]);
    assert_eq!(status.code, 0, "{}", status.stderr);
}

#[test]
fn a_param_changed_and_changed_back_is_restored_byte_for_byte() {
    let t = monthly();
    run(&t, &[]);
    let first = common::tree(&t.path().join("out/monthly"));
    run(&t, &["--set", "impute_days.m=5"]);
    let second = decisions(&t);
    assert_eq!(second[2], "impute_days ran");
    // Back to 7: the cache has it; the stages downstream come back with it.
    let status = t.exec(&["status", "pipelines/monthly.yaml"]);
    assert!(
        status.stdout.contains("can be restored from the run cache"),
        "{}",
        status.stdout
    );
    let third = run(&t, &[]);
    assert_eq!(
        decisions(&t),
        [
            "clean_orders skipped",
            "aggregate_users skipped",
            "impute_days restored",
            "diagnose_imputation restored",
            "user_features restored",
        ],
        "{}",
        third.stderr
    );
    assert!(
        third.stderr.contains("0 ran, 3 restored, 2 up to date"),
        "{}",
        third.stderr
    );
    assert!(
        third.stderr.contains("restored from the run cache in"),
        "{}",
        third.stderr
    );
    let now = common::tree(&t.path().join("out/monthly"));
    // Every output as the first run wrote it, and nothing new but the m=5 run's version (which
    // stays, as versions do): the features are their first version again, not a copy of it.
    for (path, bytes) in &first {
        assert_eq!(&now[path], bytes, "{path} differs from the first run's");
    }
    let new: Vec<&String> = now.keys().filter(|k| !first.contains_key(*k)).collect();
    assert!(
        !new.is_empty() && new.iter().all(|k| k.starts_with("features/features_v2/")),
        "{new:?}"
    );
    assert_eq!(t.read("out/monthly/features/LATEST"), "features_v1\n");
    assert!(!t.path().join("out/monthly/features/features_v3").exists());
}

#[test]
fn a_reverted_experiment_is_not_blocked_by_its_own_change_check() {
    let t = monthly();
    run(&t, &[]);
    let cleaned = std::fs::read(t.path().join("out/monthly/cleaned/orders.parquet")).unwrap();
    // A stricter IQR fence drops more rows, within the 20% the change check allows…
    run(&t, &["--set", "clean_orders.iqr.k=0.5"]);
    assert_ne!(
        std::fs::read(t.path().join("out/monthly/cleaned/orders.parquet")).unwrap(),
        cleaned
    );
    // …and going back restores the first table, although it has more rows than the
    // experiment's: its change check passed when it was computed.
    let back = run(&t, &[]);
    assert_eq!(decisions(&t)[0], "clean_orders restored", "{}", back.stderr);
    assert_eq!(
        std::fs::read(t.path().join("out/monthly/cleaned/orders.parquet")).unwrap(),
        cleaned
    );
    let checks = t.exec(&["checks", "pipelines/monthly.yaml", "--json"]);
    assert_eq!(checks.code, 0, "{}", checks.stderr);
}

#[test]
fn a_corrupt_blob_is_reported_and_the_stage_computed() {
    let t = monthly();
    run(&t, &[]);
    let mean = "out/monthly/imputed/imputed_mean.parquet";
    let imputed = std::fs::read(t.path().join(mean)).unwrap();
    run(&t, &["--set", "impute_days.m=5"]);
    // Damage the blob of the first run's imputed means.
    let hash = blake3::hash(&imputed).to_hex().to_string();
    let blob = t
        .path()
        .join(".imba/cache/blobs")
        .join(&hash[..2])
        .join(&hash[2..]);
    assert!(blob.is_file(), "the imputed means are in the cache");
    let mut permissions = std::fs::metadata(&blob).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o644);
    std::fs::set_permissions(&blob, permissions).unwrap();
    std::fs::write(&blob, b"not the table").unwrap();
    let back = run(&t, &[]);
    assert!(
        back.stderr.contains(&format!(
            "warning: stage `impute_days`: the cached blob of `{mean}` is corrupt: expected BLAKE3 {hash}, found {}; computing it instead",
            blake3::hash(b"not the table").to_hex()
        )),
        "{}",
        back.stderr
    );
    assert_eq!(decisions(&t)[2], "impute_days ran");
    assert_eq!(std::fs::read(t.path().join(mean)).unwrap(), imputed);
    // The computed output replaced the damaged blob.
    assert_eq!(std::fs::read(&blob).unwrap(), imputed);
}

#[test]
fn force_computes_whatever_the_cache_holds() {
    let t = Test::new().pipeline(
        "stages:\n  s:\n    cmd: echo {{ n }} > {{ outputs.o }}\n    outputs: {o: o.txt}\nvars: {n: 1}\n",
    );
    t.run_ok(&[]);
    t.run_ok(&["--set", "n=2"]);
    t.run_ok(&["--force", "--set", "n=2"]);
    assert_eq!(t.decisions(), [("s".to_owned(), "ran".to_owned())]);
    t.run_ok(&["--set", "n=1"]);
    assert_eq!(t.decisions(), [("s".to_owned(), "restored".to_owned())]);
    assert_eq!(t.read("o.txt"), "1\n");
}

#[test]
fn cache_and_gc_say_what_they_keep_and_need_no_inputs() {
    let t = Test::new()
        .file("in.txt", "x")
        .pipeline("stages:\n  s:\n    cmd: cat {{ inputs[0] }} > {{ outputs.o }}; echo {{ n }} >> {{ outputs.o }}\n    inputs: [in.txt]\n    outputs: {o: o.txt}\nvars: {n: 1}\n");
    t.run_ok(&[]);
    t.run_ok(&["--set", "n=2"]);
    let json = |out: common::Output| -> serde_json::Value {
        assert_eq!(out.code, 0, "{}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    };
    let usage = json(t.exec(&["cache", "pipeline.yaml", "--json"]));
    assert_eq!(
        (usage["entries"].as_u64(), usage["blobs"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(usage["bytes"], 6, "\"x1\\n\" and \"x2\\n\"");
    // The input is gone: neither command reads it.
    std::fs::remove_file(t.path().join("in.txt")).unwrap();
    let dry = json(t.exec(&["gc", "pipeline.yaml", "--dry-run", "--json"]));
    assert_eq!(
        (
            dry["local"]["entries"].as_u64(),
            dry["local"]["blobs"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(
        json(t.exec(&["cache", "pipeline.yaml", "--json"]))["entries"],
        2
    );
    // The lock refers to n=2: n=1's entry goes, and its blob.
    let gone = t.exec(&["gc", "pipeline.yaml"]);
    assert_eq!(gone.code, 0, "{}", gone.stderr);
    assert_eq!(
        gone.stdout,
        "removed 1 entry, 1 blob (3 B), 0 folder manifests\n"
    );
    assert_eq!(
        json(t.exec(&["cache", "pipeline.yaml", "--json"]))["entries"],
        1
    );
    // Used within a day: kept, whatever the lock says.
    t.write("in.txt", "x");
    t.run_ok(&["--set", "n=3"]);
    let kept = t.exec(&["gc", "pipeline.yaml", "--older-than", "1d"]);
    assert_eq!(
        kept.stdout,
        "removed 0 entries, 0 blobs (0 B), 0 folder manifests\n"
    );
}

#[test]
fn max_size_evicts_the_least_recently_used_after_a_run() {
    let t = Test::new().pipeline(
        "cache: {max_size: 10}\nstages:\n  s:\n    cmd: printf '%s' {{ text }} > {{ outputs.o }}\n    outputs: {o: o.txt}\nvars: {text: abcdef}\n",
    );
    t.run_ok(&[]);
    t.run_ok(&["--set", "text=ghijkl"]);
    // 6 + 6 bytes do not fit in 10: the older entry went.
    let usage = t.exec(&["cache", "pipeline.yaml", "--json"]);
    let usage: serde_json::Value = serde_json::from_str(&usage.stdout).unwrap();
    assert_eq!(
        (usage["entries"].as_u64(), usage["bytes"].as_u64()),
        (Some(1), Some(6))
    );
    t.run_ok(&["--set", "text=abcdef"]);
    assert_eq!(t.decisions(), [("s".to_owned(), "ran".to_owned())]);
}

/// `imba diff`: the vars and `--set` arguments two runs differ by, the outputs that changed,
/// and the numbers the built-ins reported, side by side.
#[test]
fn diff_says_what_two_runs_differ_by() {
    let t = monthly();
    let none = t.exec(&["diff", "pipelines/monthly.yaml"]);
    run(&t, &[]);
    run(
        &t,
        &["--set", "impute_days.m=5", "--set", "max_change_pct=30"],
    );
    let two = t.exec(&["diff", "pipelines/monthly.yaml"]);
    run(
        &t,
        &["--set", "impute_days.m=5", "--set", "max_change_pct=30"],
    );
    let same = t.exec(&["diff", "pipelines/monthly.yaml"]);
    insta::with_settings!({filters => vec![
        (r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}", "[RUN]"),
    ]}, {
        insta::assert_snapshot!(format!("{}\n{}\n{}", none.all(), two.all(), same.all()));
    });
}
