//! `engine: spark` on a real Spark cluster on this machine (`scripts/spark-local`: a standalone
//! master, two workers and a Spark Connect server): the same tables as the local engine, cell by
//! cell. Built with `--features spark` only. Where the cluster cannot start, the tests say so
//! and pass, but under CI (`CI` set) they fail.
#![cfg(feature = "spark")]

mod common;

use std::path::Path;
use std::sync::OnceLock;

use imba_stages::polars::prelude::*;

/// The cluster's `SPARK_REMOTE`, started once for all the tests of this binary.
fn spark_remote() -> Option<&'static str> {
    static REMOTE: OnceLock<Option<String>> = OnceLock::new();
    REMOTE
        .get_or_init(|| {
            let script = common::repo().join("scripts/spark-local");
            let out = std::process::Command::new(script)
                .arg("start")
                .output()
                .expect("run scripts/spark-local");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let remote = stdout
                .lines()
                .find_map(|l| l.strip_prefix("SPARK_REMOTE="))
                .map(str::to_owned);
            if remote.is_none() {
                let why = String::from_utf8_lossy(&out.stderr);
                assert!(
                    std::env::var_os("CI").is_none(),
                    "the Spark cluster did not start: {why}"
                );
                eprintln!("skipping: the Spark cluster did not start: {why}");
            }
            remote
        })
        .as_deref()
}

fn read(path: &Path) -> DataFrame {
    ParquetReader::new(std::fs::File::open(path).unwrap())
        .finish()
        .unwrap()
}

/// Equal as the local engine's: same columns and types, same rows in the same order, integers
/// and strings exactly, floats within 4 ulps (Spark and polars may sum in another order).
fn assert_same_table(local: &DataFrame, spark: &DataFrame) {
    assert_eq!(local.get_column_names(), spark.get_column_names());
    assert_eq!(local.height(), spark.height());
    for (a, b) in local.columns().iter().zip(spark.columns()) {
        assert_eq!(a.dtype(), b.dtype(), "column `{}`", a.name());
        if a.dtype().is_float() {
            let (a64, b64) = (a.f64().unwrap(), b.f64().unwrap());
            for (row, (x, y)) in a64.iter().zip(b64.iter()).enumerate() {
                match (x, y) {
                    (Some(x), Some(y)) => {
                        let ulps = (x.to_bits() as i64 - y.to_bits() as i64).unsigned_abs();
                        assert!(ulps <= 4, "`{}` row {row}: {x} vs {y}", a.name());
                    }
                    (x, y) => assert_eq!(x, y, "`{}` row {row}", a.name()),
                }
            }
        } else {
            assert!(
                a.as_materialized_series()
                    .equals_missing(b.as_materialized_series()),
                "column `{}` differs",
                a.name()
            );
        }
    }
}

#[test]
fn aggregate_on_spark_gives_the_local_table() {
    let Some(remote) = spark_remote() else {
        return;
    };
    let t = common::monthly("");
    let run = |args: &[&str]| {
        let mut command = t.command(args);
        command.env("SPARK_REMOTE", remote);
        let out = t.captured(&command.output().unwrap());
        assert_eq!(out.code, 0, "{}", out.stderr);
        out
    };
    let stage = ["--stage", "aggregate_users"];
    run(&[
        &["run", "pipelines/monthly.yaml", "--set", "out=out/local"][..],
        &stage,
    ]
    .concat());
    let on_spark = [
        &[
            "run",
            "pipelines/monthly.yaml",
            "--set",
            "out=out/spark",
            "--engine",
            "spark",
        ][..],
        &stage,
    ]
    .concat();
    run(&on_spark);
    let local = read(&t.path().join("out/local/aggregated/user_imp.parquet"));
    let spark = read(&t.path().join("out/spark/aggregated/user_imp.parquet"));
    assert!(local.height() > 1000);
    assert_same_table(&local, &spark);
    // The run record says where it ran.
    let show = t.exec(&[
        "show",
        "pipelines/monthly.yaml",
        "--set",
        "out=out/spark",
        "--engine",
        "spark",
        "--json",
    ]);
    let record: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let aggregate = record["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "aggregate_users")
        .unwrap();
    assert_eq!(aggregate["report"]["summary"]["engine"], "spark");
    assert!(aggregate["report"]["summary"]["app_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("app-")));
    // A no-op run asks nothing of Spark; switching engines runs the stage again.
    let again = run(&on_spark);
    assert!(again.stderr.contains("0 ran"), "{}", again.stderr);
    let local_again = run(&[
        &["run", "pipelines/monthly.yaml", "--set", "out=out/spark"][..],
        &stage,
    ]
    .concat());
    assert!(
        local_again.stderr.contains("1 ran"),
        "{}",
        local_again.stderr
    );
}

#[test]
fn an_unreachable_server_fails_the_stage_at_once_and_commits_nothing() {
    let t = common::monthly("");
    let mut command = t.command(&[
        "run",
        "pipelines/monthly.yaml",
        "--engine",
        "spark",
        "--stage",
        "aggregate_users",
    ]);
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    command.env(
        "SPARK_REMOTE",
        format!("sc://127.0.0.1:{port}/;token=secret"),
    );
    let out = t.captured(&command.output().unwrap());
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "cannot reach the Spark Connect server at sc://127.0.0.1:{port}"
        )),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("secret"), "{}", out.stderr);
    assert!(!t.path().join("out/monthly/aggregated").exists());
}
