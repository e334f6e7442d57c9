//! `pipelines/monthly.yaml` on the shipped sample, checked against an independent reading of the
//! seed's `clean_orders` and user aggregation, written here in plain Rust (no polars).

mod common;

use std::collections::{BTreeMap, HashSet};

use common::Test;

/// The seed's semantics, step by step, on the raw CSV text.
struct Reference {
    summary: serde_json::Value,
    /// user → (max days, max order_number)
    users: BTreeMap<i64, (Option<f64>, Option<i64>)>,
}

fn int(field: &str) -> Option<i64> {
    let t = field.trim();
    t.parse::<i64>().ok().or_else(|| {
        t.parse::<f64>()
            .ok()
            .filter(|f| f.fract() == 0.0 && f.is_finite())
            .map(|f| f as i64)
    })
}

fn float(field: &str) -> Option<f64> {
    field.trim().parse::<f64>().ok().filter(|f| !f.is_nan())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

type Row = (
    Option<i64>,
    Option<i64>,
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<f64>,
);

fn reference(csv: &str) -> Reference {
    let rows: Vec<Row> = csv
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            (
                int(f[0]),
                int(f[1]),
                f[2].to_owned(),
                int(f[3]),
                int(f[4]),
                int(f[5]),
                float(f[6]),
            )
        })
        .collect();
    let initial = rows.len();
    let domain: Vec<Row> = rows
        .into_iter()
        .filter(|r| ["prior", "train", "test"].contains(&r.2.as_str()))
        .filter(|r| r.4.is_some_and(|d| (0..=6).contains(&d)))
        .filter(|r| r.5.is_some_and(|h| (0..=23).contains(&h)))
        .collect();
    let mut days: Vec<f64> = domain.iter().filter_map(|r| r.6).collect();
    days.sort_by(f64::total_cmp);
    let (q1, q3) = (quantile(&days, 0.25), quantile(&days, 0.75));
    let (lower, upper) = (q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1));
    let iqr: Vec<Row> = domain
        .iter()
        .filter(|r| r.6.is_none_or(|d| d >= lower && d <= upper))
        .cloned()
        .collect();
    let mut seen = HashSet::new();
    let clean: Vec<Row> = iqr
        .iter()
        .filter(|r| !(r.0.is_none() && r.1.is_none() && r.6.is_none()))
        .filter(|r| seen.insert(format!("{r:?}")))
        .cloned()
        .collect();
    let mut users: BTreeMap<i64, (Option<f64>, Option<i64>)> = BTreeMap::new();
    for r in &clean {
        let Some(user) = r.1 else { continue };
        let entry = users.entry(user).or_insert((None, None));
        if let Some(d) = r.6 {
            entry.0 = Some(entry.0.map_or(d, |m: f64| m.max(d)));
        }
        if let Some(n) = r.3 {
            entry.1 = Some(entry.1.map_or(n, |m: i64| m.max(n)));
        }
    }
    let summary = serde_json::json!({
        "initial": initial,
        "after_cast": initial,
        "after_domain": domain.len(),
        "removed_domain": initial - domain.len(),
        "after_iqr": iqr.len(),
        "removed_iqr": domain.len() - iqr.len(),
        "iqr_bounds": {"q1": q1, "q3": q3, "lower": lower, "upper": upper},
        "after_dropna_dedup": clean.len(),
        "removed_dropna_dedup": iqr.len() - clean.len(),
    });
    Reference { summary, users }
}

/// The shipped pipeline and sample, copied into a temp dir (so that the lock file and `.imba/`
/// land there, not in the repository).
fn monthly() -> Test {
    let repo = common::repo();
    Test::new()
        .file(
            "pipelines/monthly.yaml",
            std::fs::read(repo.join("pipelines/monthly.yaml")).unwrap(),
        )
        .file(
            "examples/instacart/orders.csv",
            std::fs::read(repo.join("examples/instacart/orders.csv")).unwrap(),
        )
}

#[test]
fn the_monthly_pipeline_matches_the_seed_semantics_on_the_sample() {
    let csv =
        std::fs::read_to_string(common::repo().join("examples/instacart/orders.csv")).unwrap();
    let expected = reference(&csv);

    let t = monthly();
    let run = t.exec(&["run", "pipelines/monthly.yaml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = t.path().join("out/monthly");

    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("cleaned/summaries/clean_summary.json")).unwrap(),
    )
    .unwrap();
    for (key, value) in expected.summary.as_object().unwrap() {
        assert_eq!(&summary[key], value, "summary key `{key}`");
    }
    // The sample has every kind of bad row.
    for key in ["removed_domain", "removed_iqr", "removed_dropna_dedup"] {
        assert!(
            summary[key].as_u64().unwrap() > 0,
            "the sample exercises `{key}`"
        );
    }

    let users =
        imba_stages::io::table::read_table(&out.join("aggregated/user_imp.parquet")).unwrap();
    assert_eq!(
        users.get_column_names(),
        ["user_id", "days_imp", "frequency"]
    );
    let ids: Vec<i64> = users
        .column("user_id")
        .unwrap()
        .i64()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    let imp: Vec<Option<f64>> = users
        .column("days_imp")
        .unwrap()
        .f64()
        .unwrap()
        .iter()
        .collect();
    let freq: Vec<Option<i64>> = users
        .column("frequency")
        .unwrap()
        .i64()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(ids, expected.users.keys().copied().collect::<Vec<_>>());
    for (i, (user, (max_days, frequency))) in expected.users.iter().enumerate() {
        let want = max_days.filter(|d| *d != 30.0);
        assert_eq!((imp[i], freq[i]), (want, *frequency), "user {user}");
    }
    let missing = imp.iter().filter(|v| v.is_none()).count() as f64 / imp.len() as f64;
    assert!(
        (0.6..0.8).contains(&missing),
        "about 70% of days_imp are censored: {missing}"
    );
}

#[test]
fn a_second_run_skips_every_stage_and_out_moves_the_layout() {
    let t = monthly();
    let first = t.exec(&["run", "pipelines/monthly.yaml", "--set", "out=out/2017-05"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    for path in [
        "cleaned/orders.parquet",
        "cleaned/summaries/clean_summary.json",
        "aggregated/user_imp.parquet",
        "imputed/user_imp_m0.parquet",
        "imputed/user_imp_m6.parquet",
        "imputed/imputed_long.parquet",
        "imputed/imputed_mean.parquet",
        "imputed/trace.parquet",
        "imputed/summaries/impute_summary.json",
        "diagnostics/report.html",
        "diagnostics/diagnostics.json",
        "diagnostics/plots/days_imp_density.png",
        "diagnostics/plots/days_imp_trace.svg",
        "features/LATEST",
        "features/features_v1/features.parquet",
        "features/features_v1/_meta.json",
    ] {
        assert!(t.path().join("out/2017-05").join(path).is_file(), "{path}");
    }
    let second = t.exec(&["run", "pipelines/monthly.yaml", "--set", "out=out/2017-05"]);
    assert!(
        second.stderr.contains("0 ran, 5 up to date"),
        "{}",
        second.stderr
    );
}

/// The user features, checked row by row against the cleaned orders and the imputed mean table
/// the same run wrote, recomputed here without SQL.
#[test]
fn user_features_agree_with_the_tables_they_come_from() {
    use imba_stages::polars::prelude::*;
    let t = monthly();
    let out = t.exec(&["run", "pipelines/monthly.yaml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let read = |path: &str| {
        let file = std::fs::File::open(t.path().join("out/monthly").join(path)).unwrap();
        ParquetReader::new(file).finish().unwrap()
    };
    let orders = read("cleaned/orders.parquet");
    let imputed = read("imputed/imputed_mean.parquet");
    let features = read("features/features_v1/features.parquet");
    let ints = |df: &DataFrame, c: &str| -> Vec<Option<i64>> {
        df.column(c)
            .unwrap()
            .cast(&DataType::Int64)
            .unwrap()
            .i64()
            .unwrap()
            .iter()
            .collect()
    };
    // Per user: orders, sum and count of days, count at the cap, Sunday orders, evening orders.
    let mut per_user: BTreeMap<i64, (f64, f64, f64, f64, f64, f64)> = BTreeMap::new();
    let users = ints(&orders, "user_id");
    let days = floats(&orders, "days_since_prior_order");
    let dow = ints(&orders, "order_dow");
    let hour = ints(&orders, "order_hour_of_day");
    for i in 0..orders.height() {
        let Some(user) = users[i] else { continue };
        let entry = per_user.entry(user).or_default();
        entry.0 += 1.0;
        if let Some(d) = days[i] {
            entry.1 += d;
            entry.2 += 1.0;
            if d == 30.0 {
                entry.3 += 1.0;
            }
        }
        if dow[i] == Some(0) {
            entry.4 += 1.0;
        }
        if hour[i].is_some_and(|h| h >= 18) {
            entry.5 += 1.0;
        }
    }
    let feature_users = ints(&features, "user_id");
    assert_eq!(
        feature_users.iter().map(|u| u.unwrap()).collect::<Vec<_>>(),
        per_user.keys().copied().collect::<Vec<_>>(),
        "one row per user with an order, sorted"
    );
    let count = floats(&features, "order_count");
    let mean = floats(&features, "days_mean");
    let capped = floats(&features, "capped_share");
    let sunday = floats(&features, "dow_0_share");
    let evening = floats(&features, "evening_share");
    let close =
        |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() <= 1e-9 * b.abs().max(1.0));
    for (row, (user, (n, sum, with_days, at_cap, sundays, evenings))) in per_user.iter().enumerate()
    {
        assert_eq!(count[row], Some(*n), "user {user}");
        if *with_days > 0.0 {
            assert!(
                close(mean[row], sum / with_days),
                "user {user}: {:?}",
                mean[row]
            );
        } else {
            assert_eq!(mean[row], None, "user {user}");
        }
        assert!(close(capped[row], at_cap / n), "user {user}");
        assert!(close(sunday[row], sundays / n), "user {user}");
        assert!(close(evening[row], evenings / n), "user {user}");
    }
    // The imputed columns are the mean table's, matched by user.
    let imputed_users = ints(&imputed, "user_id");
    let imputed_days = floats(&imputed, "days_imp");
    let by_user: BTreeMap<i64, Option<f64>> = imputed_users
        .iter()
        .zip(&imputed_days)
        .map(|(u, d)| (u.unwrap(), *d))
        .collect();
    let feature_days = floats(&features, "days_imp");
    for (row, user) in per_user.keys().enumerate() {
        assert_eq!(
            feature_days[row],
            by_user.get(user).copied().flatten(),
            "user {user}"
        );
    }
    let meta: serde_json::Value =
        serde_json::from_str(&t.read("out/monthly/features/features_v1/_meta.json")).unwrap();
    assert_eq!(
        meta["report"]["descriptions"]["order_count"],
        "Orders placed"
    );
    assert_eq!(meta["tables"]["features.parquet"]["rows"], per_user.len());
}

/// The seed's alarm ("清洗行数变化 > X%"): a month whose cleaned orders fall by more than 20%
/// from the month committed at the same place stops the pipeline before anything is replaced.
#[test]
fn a_month_with_far_fewer_orders_is_stopped_by_the_checks() {
    let t = monthly();
    let first = t.exec(&["run", "pipelines/monthly.yaml"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let cleaned = std::fs::read(t.path().join("out/monthly/cleaned/orders.parquet")).unwrap();
    let users = std::fs::read(t.path().join("out/monthly/aggregated/user_imp.parquet")).unwrap();

    // Two thirds of the orders: the same layout, a third fewer rows.
    let sample = t.read("examples/instacart/orders.csv");
    let lines: Vec<&str> = sample.lines().collect();
    let kept = lines.len() * 2 / 3;
    t.write("smaller.csv", lines[..kept].join("\n") + "\n");
    let out = t.exec(&[
        "run",
        "pipelines/monthly.yaml",
        "-j",
        "1",
        "--set",
        "input=smaller.csv",
    ]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    snapshot(
        "a_check_stops_a_month_with_a_third_fewer_orders",
        &out.stderr,
    );
    let failure = out
        .stderr
        .lines()
        .skip_while(|l| !l.starts_with("error: stage `clean_orders` failed"))
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(
        failure[0],
        "error: stage `clean_orders` failed: a check failed; the outputs were not committed"
    );
    assert!(
        failure[1].starts_with(
            "  check `change(rows)` on out/monthly/cleaned/orders.parquet: rows changed by 33."
        ) && failure[1].ends_with("expected ≤ 20%"),
        "{}",
        failure[1]
    );
    assert!(out
        .stderr
        .contains("skip aggregate_users (upstream clean_orders failed)"));
    assert_eq!(
        std::fs::read(t.path().join("out/monthly/cleaned/orders.parquet")).unwrap(),
        cleaned
    );
    assert_eq!(
        std::fs::read(t.path().join("out/monthly/aggregated/user_imp.parquet")).unwrap(),
        users
    );

    // The same smaller month into its own folder has no baseline, and runs through.
    let own = t.exec(&[
        "run",
        "pipelines/monthly.yaml",
        "--set",
        "input=smaller.csv",
        "--set",
        "out=out/smaller",
    ]);
    assert_eq!(own.code, 0, "{}", own.stderr);
    let table = t.exec(&[
        "checks",
        "pipelines/monthly.yaml",
        "--set",
        "out=out/smaller",
    ]);
    assert!(
        table
            .stdout
            .contains("no baseline: no committed output to compare with"),
        "{}",
        table.stdout
    );
}

/// The diagnose stage's own thresholds act as checks: a missed `fail` one keeps the new report
/// in quarantine, for a person to read, and the report committed before stays.
#[test]
fn a_failed_imputation_check_quarantines_the_report() {
    let t = monthly();
    assert_eq!(t.exec(&["run", "pipelines/monthly.yaml"]).code, 0);
    let report = std::fs::read(t.path().join("out/monthly/diagnostics/report.html")).unwrap();
    let strict = "diagnose_imputation.checks.mean_spread={max: 0.0, severity: fail}";
    let out = t.exec(&["run", "pipelines/monthly.yaml", "-j", "1", "--set", strict]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    snapshot("a_missed_imputation_threshold_fails_the_stage", &out.stderr);
    assert!(
        out.stderr.contains("check `mean_spread(days_imp)` on out/monthly/diagnostics: days_imp: spread of the per-imputation means "),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read(t.path().join("out/monthly/diagnostics/report.html")).unwrap(),
        report
    );
    let quarantine = std::fs::read_dir(t.path().join(".imba/quarantine"))
        .unwrap()
        .flatten()
        .next()
        .expect("a quarantined run")
        .path();
    let kept = std::fs::read_to_string(
        quarantine.join("diagnose_imputation/out/monthly/diagnostics/report.html"),
    )
    .unwrap();
    assert!(
        kept.contains("mean_spread"),
        "the kept report shows the check"
    );
    let table = t.exec(&["checks", "pipelines/monthly.yaml"]);
    let line = table
        .stdout
        .lines()
        .find(|l| l.contains("mean_spread(days_imp)"))
        .unwrap_or_default()
        .to_owned();
    assert!(line.contains(" fail ") && line.contains(" FAIL "), "{line}");
}

#[test]
fn a_missing_column_fails_the_stage_naming_column_param_and_file() {
    // Written by a command, so that validate cannot know its columns: the stage finds out.
    let t = Test::new().pipeline(
        "stages:\n  export:\n    cmd: printf 'order_id,user_id\\n1,2\\n' > {{ outputs[0] }}\n    outputs: [orders.csv]\n  clean_orders:\n    uses: clean\n    inputs: [orders.csv]\n    outputs: [out/orders.parquet]\n    params:\n      cast: {order_dow: int64}\n",
    );
    let out = t.exec(&["run", "pipeline.yaml"]);
    assert_eq!(out.code, 1);
    let error = out
        .stage_error()
        .replace(t.path().to_str().unwrap(), "[TMP]");
    assert_eq!(error, "error: stage `clean_orders` failed: column `order_dow` (param `cast.order_dow`) is not in `[TMP]/orders.csv`; its columns are: order_id, user_id");
    assert!(!t.path().join("out").exists(), "nothing was written");
    // The param is shown where it is set.
    insta::with_settings!({filters => vec![
        (r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}", "[RUN]"),
        (r"\d+\.\d{2}s", "[TIME]"),
    ]}, {
        insta::assert_snapshot!(out.stderr.replace(t.path().to_str().unwrap(), "[TMP]"));
    });
}

/// A run's stderr as the error catalogue (docs/errors.md) shows it: run ids and times masked.
fn snapshot(name: &str, stderr: &str) {
    insta::with_settings!({filters => vec![
        (r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}", "[RUN]"),
        (r"\d+\.\d{2}s", "[TIME]"),
    ]}, {
        insta::assert_snapshot!(name, stderr);
    });
}

fn floats(df: &imba_stages::polars::prelude::DataFrame, column: &str) -> Vec<Option<f64>> {
    use imba_stages::polars::prelude::DataType;
    df.column(column)
        .unwrap()
        .cast(&DataType::Float64)
        .unwrap()
        .f64()
        .unwrap()
        .iter()
        .collect()
}

/// The imputed layout agrees with itself and with the aggregated table: every imputation keeps
/// the observed values and fills each missing one with an observed value (PMM); the long table
/// stacks the imputations; the mean table averages them; the trace has every chain and
/// iteration. The same seed gives the same bytes; another seed, other imputations.
#[test]
fn the_imputed_outputs_agree_with_each_other_and_repeat_exactly() {
    use imba_stages::io::table::read_table;
    let t = monthly();
    let run = t.exec(&["run", "pipelines/monthly.yaml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = t.path().join("out/monthly");
    let users = read_table(&out.join("aggregated/user_imp.parquet")).unwrap();
    let days = floats(&users, "days_imp");
    let observed: std::collections::BTreeSet<u64> =
        days.iter().flatten().map(|d| d.to_bits()).collect();
    let missing = days.iter().filter(|d| d.is_none()).count();
    let mut per_imputation = Vec::new();
    for k in 0..7 {
        let table = read_table(&out.join(format!("imputed/user_imp_m{k}.parquet"))).unwrap();
        assert_eq!(
            table.get_column_names(),
            ["user_id", "days_imp", "frequency"]
        );
        assert!(table
            .column("user_id")
            .unwrap()
            .equals(users.column("user_id").unwrap()));
        assert!(table
            .column("frequency")
            .unwrap()
            .equals(users.column("frequency").unwrap()));
        let imputed = floats(&table, "days_imp");
        for (before, after) in days.iter().zip(&imputed) {
            let after = after.expect("every value is filled");
            match before {
                Some(v) => assert_eq!(*v, after),
                None => assert!(
                    observed.contains(&after.to_bits()),
                    "{after} was never observed"
                ),
            }
        }
        per_imputation.push(imputed);
    }
    assert_ne!(per_imputation[0], per_imputation[1]);

    let long = read_table(&out.join("imputed/imputed_long.parquet")).unwrap();
    assert_eq!(
        long.get_column_names(),
        ["impute_id", "user_id", "days_imp", "frequency"]
    );
    assert_eq!(long.height(), 7 * users.height());
    let stacked: Vec<Option<f64>> = per_imputation.iter().flatten().copied().collect();
    assert_eq!(floats(&long, "days_imp"), stacked);

    let mean = read_table(&out.join("imputed/imputed_mean.parquet")).unwrap();
    assert_eq!(
        mean.get_column_names(),
        [
            "user_id",
            "days_imp",
            "days_imp_std",
            "frequency",
            "frequency_std",
            "was_missing"
        ]
    );
    let (avg, std) = (floats(&mean, "days_imp"), floats(&mean, "days_imp_std"));
    let was_missing: Vec<bool> = mean
        .column("was_missing")
        .unwrap()
        .bool()
        .unwrap()
        .iter()
        .map(|b| b.unwrap())
        .collect();
    for r in 0..users.height() {
        let values: Vec<f64> = per_imputation.iter().map(|v| v[r].unwrap()).collect();
        let m = values.iter().sum::<f64>() / 7.0;
        let s = (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 6.0).sqrt();
        assert!((avg[r].unwrap() - m).abs() < 1e-9);
        assert!((std[r].unwrap() - s).abs() < 1e-9);
        assert_eq!(was_missing[r], days[r].is_none());
        if days[r].is_some() {
            assert_eq!(s, 0.0);
        }
    }

    let trace = read_table(&out.join("imputed/trace.parquet")).unwrap();
    assert_eq!(
        trace.get_column_names(),
        ["chain", "iteration", "column", "mean", "std"]
    );
    assert_eq!(
        trace.height(),
        7 * 10,
        "7 chains × 10 iterations × 1 incomplete column"
    );

    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("imputed/summaries/impute_summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["missing"]["days_imp"], missing);
    assert_eq!(summary["missing"]["frequency"], 0);
    assert_eq!(summary["m"], 7);
    assert_eq!(summary["methods"], serde_json::json!({"days_imp": "pmm"}));
    let first = &summary["imputations"][0]["days_imp"]["mean"];
    let m0: Vec<f64> = per_imputation[0].iter().flatten().copied().collect();
    assert!((first.as_f64().unwrap() - m0.iter().sum::<f64>() / m0.len() as f64).abs() < 1e-9);

    // The same seed elsewhere: the same bytes. Another seed: other values.
    let again = t.exec(&["run", "pipelines/monthly.yaml", "--set", "out=out/again"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    for file in [
        "user_imp_m3.parquet",
        "imputed_long.parquet",
        "imputed_mean.parquet",
        "trace.parquet",
        "summaries/impute_summary.json",
    ] {
        assert_eq!(
            std::fs::read(out.join("imputed").join(file)).unwrap(),
            std::fs::read(t.path().join("out/again/imputed").join(file)).unwrap(),
            "{file}"
        );
    }
    let other = t.exec(&[
        "run",
        "pipelines/monthly.yaml",
        "--set",
        "out=out/other",
        "--set",
        "impute_days.seed=7",
    ]);
    assert_eq!(other.code, 0, "{}", other.stderr);
    assert_ne!(
        std::fs::read(out.join("imputed/imputed_long.parquet")).unwrap(),
        std::fs::read(t.path().join("out/other/imputed/imputed_long.parquet")).unwrap()
    );
}

/// `-v` says where a built-in's time went, step by step, for each stage that ran, and nothing of
/// it without `-v`.
#[test]
fn verbose_runs_time_each_step_of_a_builtin() {
    let t = common::monthly("");
    let quiet = t.exec(&["run", "pipelines/monthly.yaml", "-s", "clean_orders"]);
    assert_eq!(quiet.code, 0, "{}", quiet.stderr);
    assert!(!quiet.stderr.contains(" took "), "{}", quiet.stderr);
    let out = t.exec(&["-v", "run", "pipelines/monthly.yaml", "-f"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let steps: Vec<&str> = out
        .stderr
        .lines()
        .filter_map(|line| line.split_once(" DEBUG ").map(|(_, rest)| rest))
        .filter(|rest| rest.contains(" took ") && rest.ends_with(" ms"))
        .map(|rest| rest.split(" took ").next().unwrap_or_default())
        .collect();
    for step in [
        "clean: typed read",
        "clean: cast",
        "clean: dedup",
        "clean: write",
        "feature: compute",
    ] {
        assert!(
            steps.iter().any(|s| s.starts_with(step)),
            "no `{step}` among {steps:?}"
        );
    }
}
