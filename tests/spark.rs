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
        .get_or_init(|| common::start_cluster("spark-local", &[], "SPARK_REMOTE"))
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
    assert_same_table_but(local, spark, &[]);
}

/// [`assert_same_table`], with sample standard deviations (these columns) within 8 ulps: polars
/// and Spark compute them by different algorithms (a two-pass sum, Welford's update), each a few
/// ulps from the exact value (docs/engines.md, "What is equal, what differs by ulps").
fn assert_same_table_but(local: &DataFrame, spark: &DataFrame, deviations: &[&str]) {
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
                        let most = if deviations.contains(&a.name().as_str()) {
                            8
                        } else {
                            4
                        };
                        assert!(ulps <= most, "`{}` row {row}: {x} vs {y}", a.name());
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
    assert_eq!(aggregate["report"]["engine"]["name"], "spark");
    assert!(aggregate["report"]["engine"]["app_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("app-")));
    // scripts/spark-local sets the UI's port: its address is known.
    assert!(
        aggregate["report"]["engine"]["ui"]
            .as_str()
            .is_some_and(|ui| ui.starts_with("http://127.0.0.1:")),
        "{aggregate}"
    );
    // A no-op run asks nothing of Spark; switching engines runs the stage again.
    let again = run(&on_spark);
    assert!(again.stderr.contains("0 ran"), "{}", again.stderr);
    let local_again = run(&[
        &["run", "pipelines/monthly.yaml", "--set", "out=out/spark"][..],
        &stage,
    ]
    .concat());
    // Both stages go back: with `--engine spark`, clean_orders ran on Spark too.
    assert!(
        local_again.stderr.contains("2 ran"),
        "{}",
        local_again.stderr
    );
}

/// Runs imba with the cluster's `SPARK_REMOTE`; it must succeed.
fn on_cluster(t: &common::Test, remote: &str, args: &[&str]) -> common::Output {
    let mut command = t.command(args);
    command.env("SPARK_REMOTE", remote);
    let out = t.captured(&command.output().unwrap());
    assert_eq!(out.code, 0, "{}", out.stderr);
    out
}

/// The two summaries: the same keys, the same integers and strings, floats within 4 ulps.
fn assert_same_json(local: &serde_json::Value, spark: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (local, spark) {
        (Value::Object(a), Value::Object(b)) => {
            let keys = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(a), keys(b), "keys of {at}");
            for (k, v) in a {
                assert_same_json(v, &b[k], &format!("{at}.{k}"));
            }
        }
        (Value::Number(a), Value::Number(b)) if a.is_f64() || b.is_f64() => {
            let (x, y) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            let ulps = (x.to_bits() as i64 - y.to_bits() as i64).unsigned_abs();
            assert!(ulps <= 4, "{at}: {x} vs {y}");
        }
        (a, b) => assert_eq!(a, b, "{at}"),
    }
}

/// Text the lenient casts must read as the local engine does, quoting as RFC 4180, repeated and
/// missing rows, and values outside the domain and the fences.
const EDGES: &str = "id,n,x,flag,label,tag\n\
1,7,1.5,true,a,p\n\
2, 8 ,2.5,no,\" b \",p\n\
3,7.0,NaN,Y,\"c, d\",q\n\
4,+9,1e1,0,a,p\n\
5,abc,inf,maybe,,q\n\
6,,,,,\n\
7,1e2,-0.5,T,\"say \"\"hi\"\"\",p\n\
7,1e2,-0.5,T,\"say \"\"hi\"\"\",p\n\
8,99999999999999999999,.5,f,e,r\n\
9,3.5,5.,1,e,r\n\
10,2,1000,t,e,r\n\
11,\u{a0}4\u{a0},2,yes,e,s\n\
12,5,7d,n,e,s\n\
13,6,0x10,false,e,s\n";

/// `clean` with every step, on a file of edge cases and on the shipped sample, both engines.
#[test]
fn clean_on_spark_gives_the_local_table_and_summary() {
    let Some(remote) = spark_remote() else {
        return;
    };
    let pipeline = r#"
vars:
  engine: local
  input: edges.csv
stages:
  clean:
    uses: clean
    inputs: {table: "{{ input }}"}
    outputs: {table: "out/{{ engine }}/cleaned.parquet", summary: "out/{{ engine }}/summary.json"}
    params:
      cast: {id: int64, n: int64, x: float64, flag: bool, label: string}
      ON_CAST_ERROR
      domain: {tag: {in: [p, q, r, s]}, id: {between: [1, 12]}}
      iqr: {columns: [x], k: 1.5}
      dropna: {subset: [n, x], how: all}
      dedup: true
"#;
    let t = common::Test::new().file("edges.csv", EDGES);
    for input in ["edges.csv"] {
        for on_error in ["null", "drop"] {
            t.write(
                "pipeline.yaml",
                pipeline.replace("ON_CAST_ERROR", &format!("on_cast_error: \"{on_error}\"")),
            );
            let set = |engine: &str| {
                vec![
                    "run".to_owned(),
                    "pipeline.yaml".to_owned(),
                    "--set".to_owned(),
                    format!("engine={engine}"),
                    "--set".to_owned(),
                    format!("input={input}"),
                ]
            };
            let local = set("local");
            t.run_ok(&local.iter().skip(2).map(String::as_str).collect::<Vec<_>>());
            let mut spark = set("spark");
            spark.extend(["--engine".to_owned(), "spark".to_owned()]);
            on_cluster(
                &t,
                remote,
                &spark.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            let what = format!("{input}, on_cast_error: {on_error}");
            let (a, b) = (
                read(&t.path().join("out/local/cleaned.parquet")),
                read(&t.path().join("out/spark/cleaned.parquet")),
            );
            assert!(a.height() > 0, "{what}");
            assert_same_table(&a, &b);
            let json = |engine: &str| -> serde_json::Value {
                serde_json::from_str(&t.read(&format!("out/{engine}/summary.json"))).unwrap()
            };
            assert_same_json(&json("local"), &json("spark"), &what);
        }
    }

    // The monthly pipeline's clean_orders on the shipped sample (every kind of bad row).
    let t = common::monthly("");
    let stage = ["--stage", "clean_orders"];
    let local = t.exec(
        &[
            &["run", "pipelines/monthly.yaml", "--set", "out=out/local"][..],
            &stage,
        ]
        .concat(),
    );
    assert_eq!(local.code, 0, "{}", local.stderr);
    on_cluster(
        &t,
        remote,
        &[
            &["run", "pipelines/monthly.yaml", "--set", "out=out/spark"][..],
            &["--engine", "spark"],
            &stage,
        ]
        .concat(),
    );
    let cleaned = |engine: &str| {
        read(
            &t.path()
                .join(format!("out/{engine}/cleaned/orders.parquet")),
        )
    };
    assert!(cleaned("local").height() > 10_000);
    assert_same_table(&cleaned("local"), &cleaned("spark"));
    let json = |engine: &str| -> serde_json::Value {
        serde_json::from_str(&t.read(&format!(
            "out/{engine}/cleaned/summaries/clean_summary.json"
        )))
        .unwrap()
    };
    assert_same_json(&json("local"), &json("spark"), "clean_summary.json");
    assert_eq!(
        json("local"),
        json("spark"),
        "31 distinct gaps: quartiles to the bit"
    );
}

/// `on_cast_error: fail` names the same line on both engines.
#[test]
fn a_failing_cast_on_spark_names_the_line() {
    let Some(remote) = spark_remote() else {
        return;
    };
    let t = common::Test::new()
        .pipeline(
            r#"
stages:
  clean:
    uses: clean
    inputs: {table: in.csv}
    outputs: {table: out.parquet}
    params: {cast: {a: int64, b: float64}, on_cast_error: fail}
"#,
        )
        .file("in.csv", "a,b\n1,2\n2,x\n3,4\nz,5\n");
    let local = t.exec(&["run", "pipeline.yaml"]);
    let mut command = t.command(&["run", "pipeline.yaml", "--engine", "spark"]);
    command.env("SPARK_REMOTE", remote);
    let spark = t.captured(&command.output().unwrap());
    assert_eq!((local.code, spark.code), (1, 1), "{}", spark.stderr);
    let message = "`[TMP]/in.csv` line 3: cannot cast \"x\" in column `b` to float64";
    assert!(local.stderr.contains(message), "{}", local.stderr);
    assert!(spark.stderr.contains(message), "{}", spark.stderr);
    assert!(!t.path().join("out.parquet").exists());
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
    assert!(!out.stderr.contains("secret"), "{}", out.stderr);
    assert!(!t.path().join("out/monthly/aggregated").exists());
    crate::assert_run_snapshot!("an_unreachable_server_fails_the_stage", &out.all());
}

/// A Spark job that fails (ANSI division by zero, where polars gives `inf`) fails its stage
/// with Spark's error class and message, and commits nothing.
#[test]
fn a_failing_spark_job_names_its_error_class() {
    let Some(remote) = spark_remote() else {
        return;
    };
    let t = common::Test::new()
        .file("in.csv", "u,x\na,1\na,0\nb,2\n")
        .pipeline(
            r#"
stages:
  typed:
    uses: clean
    engine: local
    inputs: {table: in.csv}
    outputs: {table: typed.parquet}
    params: {cast: {x: float64}}
  ratios:
    uses: feature
    engine: spark
    inputs: {t: typed.parquet}
    outputs: {features: out/ratios.parquet}
    params:
      entity: u
      groups: [{name: g, from: t, features: [{low: min(x)}]}]
      derive: [{inverse: 1.0 / low}]
"#,
        );
    let mut command = t.command(&["run", "pipeline.yaml"]);
    command.env("SPARK_REMOTE", remote);
    let out = t.captured(&command.output().unwrap());
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(!t.path().join("out").exists());
    crate::assert_run_snapshot!("a_failing_spark_job_names_its_error_class", &out.all());
}

/// `feature` on both engines: a string entity (a null one counts for no one), a quoted column
/// name, a time window with a quote in a string literal, decimal-looking literals, a `columns:`
/// group, derived features over derived features; then a table that repeats an entity, refused
/// alike.
#[test]
fn feature_on_spark_gives_the_local_table() {
    let Some(remote) = spark_remote() else {
        return;
    };
    let t = common::Test::new()
        .pipeline(
            r#"
vars: {engine: local}
stages:
  orders:
    uses: clean
    engine: local
    inputs: {table: orders.csv}
    outputs: {table: orders.parquet}
    params: {cast: {order_id: int64, "days gap": float64, dow: int64}}
  imputed:
    uses: clean
    engine: local
    inputs: {table: imputed.csv}
    outputs: {table: imputed.parquet}
    params: {cast: {days_imp: float64}}
  features:
    uses: feature
    inputs: {orders: orders.parquet, imputed: imputed.parquet}
    outputs: {features: "out/{{ engine }}/features.parquet"}
    params:
      entity: user
      groups:
        - name: all
          from: orders
          features:
            - n: count(*)
            - gap: avg("days gap")
            - gap_sd: stddev("days gap")
            - weekend: avg(CASE WHEN dow IN (0, 6) THEN 1.0 ELSE 0.0 END)
            - scaled: sum(dow * 0.1)
            - last_month: max(t.month)
        - name: recent
          from: orders
          where: "month >= '2017-05' AND note <> 'it''s'"
          features:
            - recent: count(*)
        - name: imputed
          from: imputed
          columns: [days_imp]
      derive:
        - per_gap: n / days_imp
        - busy: per_gap > 0.2
"#,
        )
        .file(
            "orders.csv",
            "user,order_id,days gap,dow,month,note\n\
             u2,10,4.0,0,2017-05,x\n\
             u1,11,,3,2017-05,it's\n\
             u2,12,8.0,2,2017-05,x\n\
             u1,13,6.0,6,2017-04,x\n\
             u2,14,,1,2017-03,x\n\
             u3,15,30.0,5,2017-05,x\n\
             ,16,2.0,3,2017-05,x\n\
             u4,17,0.1,1,2017-05,x\n\
             u4,18,0.2,1,2017-05,x\n\
             é,19,2.5,4,2017-06,x\n",
        )
        .file("imputed.csv", "user,days_imp\nu1,12.5\nu2,7.0\nu4,3\n");
    let runs = |t: &common::Test| {
        let local = t.exec(&["run", "pipeline.yaml"]);
        let mut command = t.command(&[
            "run",
            "pipeline.yaml",
            "--set",
            "engine=spark",
            "--engine",
            "spark",
        ]);
        command.env("SPARK_REMOTE", remote);
        (local, t.captured(&command.output().unwrap()))
    };
    let (local, spark) = runs(&t);
    assert_eq!((local.code, spark.code), (0, 0), "{}", spark.stderr);
    let local_table = read(&t.path().join("out/local/features.parquet"));
    assert_eq!(local_table.height(), 5, "{local_table}");
    assert_same_table_but(
        &local_table,
        &read(&t.path().join("out/spark/features.parquet")),
        &["gap_sd"],
    );

    t.write(
        "imputed.csv",
        "user,days_imp\nu1,12.5\nu2,7.0\nu4,3\nu2,8\nu1,1\n",
    );
    let (local, spark) = runs(&t);
    assert_eq!((local.code, spark.code), (1, 1), "{}", spark.stderr);
    let message = "group `imputed` takes columns from `imputed` as one row per `user`, but 2 rows repeat an entity (e.g. user = \"u2\")";
    assert!(local.stderr.contains(message), "{}", local.stderr);
    assert!(spark.stderr.contains(message), "{}", spark.stderr);
}

/// The monthly pipeline with `--engine spark`: clean, aggregate and features on Spark, impute
/// and diagnose locally on Spark's outputs; every table as the local engine's. A no-op re-run
/// asks nothing of the cluster, and a changed feature re-runs that stage only.
#[test]
fn the_monthly_pipeline_on_spark_gives_the_local_tables() {
    let Some(remote) = spark_remote() else {
        return;
    };
    let t = common::monthly("");
    let local = t.exec(&["run", "pipelines/monthly.yaml", "--set", "out=out/local"]);
    assert_eq!(local.code, 0, "{}", local.stderr);
    let spark_run = ["run", "pipelines/monthly.yaml", "--set", "out=out/spark"];
    let spark = on_cluster(
        &t,
        remote,
        &[&spark_run[..], &["--engine", "spark"]].concat(),
    );
    assert!(spark.stderr.contains("5 ran"), "{}", spark.stderr);
    let tables = [
        "cleaned/orders.parquet",
        "aggregated/user_imp.parquet",
        "imputed/imputed_mean.parquet",
        "imputed/user_imp_m3.parquet",
        "features/features_v1/features.parquet",
    ];
    for table in tables {
        let (a, b) = (
            read(&t.path().join("out/local").join(table)),
            read(&t.path().join("out/spark").join(table)),
        );
        assert!(a.height() > 1000, "{table}");
        assert_same_table_but(&a, &b, &["days_std"]);
    }
    let record = t.read("out/spark/features/features_v1/_meta.json");
    assert!(record.contains("features.parquet"), "{record}");

    // Nothing to do, and nothing asked of the cluster: the server is not even there.
    let mut command = t.command(&[&spark_run[..], &["--engine", "spark"]].concat());
    command.env("SPARK_REMOTE", "sc://127.0.0.1:9/");
    let again = t.captured(&command.output().unwrap());
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stderr.contains("0 ran, 5 up to date"),
        "{}",
        again.stderr
    );

    // One feature changed: that stage alone runs again, on Spark, into a new version.
    let yaml = t.read("pipelines/monthly.yaml");
    let changed = yaml.replace(
        "CASE WHEN days_mean > 0 THEN days_imp / days_mean END",
        "CASE WHEN days_mean > 0 THEN days_mean / days_imp END",
    );
    assert_ne!(yaml, changed);
    t.write("pipelines/monthly.yaml", changed);
    let changed = on_cluster(
        &t,
        remote,
        &[&spark_run[..], &["--engine", "spark"]].concat(),
    );
    assert!(
        changed.stderr.contains("1 ran, 4 up to date"),
        "{}",
        changed.stderr
    );
    assert!(t
        .path()
        .join("out/spark/features/features_v2/features.parquet")
        .exists());
    let local = t.exec(&["run", "pipelines/monthly.yaml", "--set", "out=out/local"]);
    assert_eq!(local.code, 0, "{}", local.stderr);
    let version = "features/features_v2/features.parquet";
    assert_same_table_but(
        &read(&t.path().join("out/local").join(version)),
        &read(&t.path().join("out/spark").join(version)),
        &["days_std"],
    );
}

/// Checks of a table Spark wrote run on the cluster (a division by zero fails there, not in
/// polars) and say what they say locally, word for word: rows, not_null, unique with
/// the first repeat, range, sql, and a change against the committed output.
#[test]
fn checks_of_a_spark_output_run_on_the_cluster_and_read_the_same() {
    let Some(remote) = spark_remote() else {
        return;
    };
    let pipeline = |spark_only: bool| {
        format!(
            r#"
vars: {{engine: local}}
stages:
  clean:
    uses: clean
    inputs: {{table: in.csv}}
    outputs: {{table: "out/{{{{ engine }}}}/t.parquet"}}
    params: {{cast: {{id: int64, x: float64}}}}
    checks:
      - rows: {{min: 2, max: 3}}
        severity: warn
      - not_null: [x, label]
        severity: warn
      - unique: [label]
        severity: warn
      - unique: [id, label]
      - range: {{x: [0, 10]}}
        severity: warn
      - sql: "SELECT count(*) > 2 AND avg(self.x) < 100.5 FROM self WHERE label <> 'it''s'"
        severity: warn
      - change: {{metric: "mean(x)", max_pct: 5}}
        severity: warn
      - change: {{metric: "null_fraction(x)", max_pct: 5}}
        severity: warn
{extra}"#,
            extra = if spark_only {
                "      - sql: SELECT count(*) / (count(*) - count(*)) > 0 FROM self\n        severity: warn\n      - sql: SELECT spark_partition_id() >= 0 FROM self\n        severity: warn\n"
            } else {
                ""
            }
        )
    };
    let t = common::Test::new()
        .file(
            "in.csv",
            "id,x,label\n1,1.5,a\n2,,b\n3,12,a\n4,NaN,it's\n5,-1,\n6,2,\n",
        )
        .pipeline(&pipeline(false));
    let run = |t: &common::Test, engine: &str| {
        let mut command =
            t.command(&["run", "pipeline.yaml", "--set", &format!("engine={engine}")]);
        if engine == "spark" {
            command
                .args(["--engine", "spark"])
                .env("SPARK_REMOTE", remote);
        }
        let out = t.captured(&command.output().unwrap());
        assert_eq!(out.code, 0, "{}", out.stderr);
        // The warnings, without the output's path.
        out.stderr
            .lines()
            .filter(|l| l.starts_with("warning:"))
            .map(|l| l.replace(&format!("out/{engine}/"), "out/"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let local = run(&t, "local");
    let spark = run(&t, "spark");
    assert!(local.contains("rows repeat"), "{local}");
    assert_eq!(local, spark);
    // The inputs change; the change checks compare with what each engine committed.
    t.write(
        "in.csv",
        "id,x,label\n1,1.5,a\n2,,b\n3,12,a\n4,NaN,it's\n5,-1,\n6,2,\n7,9,c\n",
    );
    let (local, spark) = (run(&t, "local"), run(&t, "spark"));
    assert!(local.contains("changed by"), "{local}");
    assert_eq!(local, spark);
    // Where they ran: a division by zero is an error on Spark (`inf` in polars). And a query
    // polars cannot run is refused there too, as a restored output is checked here.
    t.write("pipeline.yaml", pipeline(true));
    let spark = run(&t, "spark");
    assert!(spark.contains("[DIVIDE_BY_ZERO]"), "{spark}");
    assert!(
        spark.contains("the query failed: unsupported function 'spark_partition_id'"),
        "{spark}"
    );
}
