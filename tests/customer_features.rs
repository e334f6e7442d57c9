//! `pipelines/customer_features.yaml` on hand-made customers, every feature against a value
//! worked out by hand, month by month; then the shipped sample, twelve months of it.

mod common;

use std::collections::BTreeMap;

use common::Test;

fn pipeline() -> Test {
    let repo = common::repo();
    Test::new().file(
        "pipelines/customer_features.yaml",
        std::fs::read(repo.join("pipelines/customer_features.yaml")).unwrap(),
    )
}

/// The features CSV of the latest version, by customer and column.
fn features(t: &Test, out: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let latest = t.read(&format!("{out}/features/LATEST"));
    let text = t.read(&format!("{out}/features/{}/features.csv", latest.trim()));
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let row: BTreeMap<String, String> = header
                .iter()
                .zip(&fields)
                .map(|(h, f)| (h.to_string(), f.to_string()))
                .collect();
            (row["customer_id"].clone(), row)
        })
        .collect()
}

/// The pipeline on the hand-made tables under `in/`, into `out/hand`.
fn run_hand_made(t: &Test, extra: &[&str]) -> common::Output {
    let mut args = vec![
        "run",
        "pipelines/customer_features.yaml",
        "--set",
        "base=in/base.csv",
        "--set",
        "behavior=in/behavior.csv",
        "--set",
        "out=out/hand",
    ];
    args.extend(extra);
    t.exec(&args)
}

fn number(row: &BTreeMap<String, String>, column: &str) -> f64 {
    row[column]
        .parse()
        .unwrap_or_else(|_| panic!("{column} = {:?}", row[column]))
}

#[test]
fn every_feature_matches_a_value_worked_out_by_hand() {
    // Customer 1: all of 2024; balance 1,000 × month number, deposits 100, withdrawals 50 until
    // June then 80, transactions month % 3, two products from October, 5 logins a month.
    // Customer 2: signed up in November 2024; two months. Customer 3 signs up after the month.
    let mut behavior = String::from(
        "customer_id,month,balance,deposits,withdrawals,transactions,products_held,digital_logins\n",
    );
    for m in 1..=12 {
        behavior.push_str(&format!(
            "1,2024-{m:02},{},100,{},{},{},5\n",
            1000 * m,
            if m <= 6 { 50 } else { 80 },
            m % 3,
            if m >= 10 { 2 } else { 1 }
        ));
    }
    behavior.push_str("2,2024-11,60000,10,20,1,3,6\n2,2024-12,70000,10,20,1,3,6\n");
    let t = pipeline()
        .file(
            "in/base.csv",
            "customer_id,signup_date,age,region,segment,income_band\n1,2023-05-10,40,north,mass,<25k\n2,2024-11-03,30,south,affluent,50-100k\n3,2025-01-01,50,east,private,>200k\n",
        )
        .file("in/behavior.csv", behavior);
    let out = run_hand_made(&t, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows = features(&t, "out/hand/2024-12");
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        ["1", "2"],
        "customer 3 is not a customer yet"
    );
    let (one, two) = (&rows["1"], &rows["2"]);

    assert_eq!(
        (
            one["age"].as_str(),
            one["region"].as_str(),
            one["segment"].as_str(),
            one["income_band"].as_str()
        ),
        ("40", "north", "mass", "<25k")
    );
    // 2024-12 is month 24,300; 2023-05 is 24,281.
    assert_eq!(number(one, "tenure_months"), 19.0);
    assert_eq!(number(two, "tenure_months"), 1.0);
    let expected_one = [
        ("balance_avg_3m", 11000.0), // Oct–Dec: 10, 11, 12 thousand
        ("deposits_3m", 300.0),
        ("withdrawals_3m", 240.0),
        ("transactions_avg_3m", 1.0), // 10 % 3, 11 % 3, 12 % 3 = 1, 2, 0
        ("logins_3m", 15.0),
        ("balance_avg_6m", 9500.0), // Jul–Dec: 7 … 12 thousand
        ("deposits_6m", 600.0),
        ("balance_avg_12m", 6500.0),
        ("balance_max_12m", 12000.0),
        ("balance_min_12m", 1000.0),
        ("deposits_12m", 1200.0),
        ("withdrawals_12m", 780.0), // 6 × 50 + 6 × 80
        ("active_months_12m", 8.0), // all but months 3, 6, 9, 12
        ("products_held", 2.0),
        ("net_flow_3m", 60.0),
        ("balance_trend", 11000.0 / 6500.0),
    ];
    let expected_two = [
        ("balance_avg_3m", 65000.0),
        ("deposits_3m", 20.0),
        ("withdrawals_3m", 40.0),
        ("transactions_avg_3m", 1.0),
        ("logins_3m", 12.0),
        ("balance_avg_6m", 65000.0),
        ("deposits_6m", 20.0),
        ("balance_avg_12m", 65000.0),
        ("balance_max_12m", 70000.0),
        ("balance_min_12m", 60000.0),
        ("deposits_12m", 20.0),
        ("withdrawals_12m", 40.0),
        ("active_months_12m", 2.0),
        ("products_held", 3.0),
        ("net_flow_3m", -20.0),
        ("balance_trend", 1.0),
    ];
    for (row, expected) in [(one, &expected_one), (two, &expected_two)] {
        for (column, value) in expected.iter() {
            let got = number(row, column);
            // Sums and means of a few exact decimals: 1e-9 relative covers their rounding.
            assert!(
                (got - value).abs() <= 1e-9 * value.abs().max(1.0),
                "customer {}: {column} = {got}, expected {value}",
                row["customer_id"]
            );
        }
    }
    assert_eq!(
        (one["high_value"].as_str(), one["digital_active"].as_str()),
        ("false", "true")
    );
    assert_eq!(
        (two["high_value"].as_str(), two["digital_active"].as_str()),
        ("true", "true")
    );

    // As of June, the windows move and customer 2 is not a customer yet: June's partition.
    let rows = features(&t, "out/hand/2024-06");
    assert_eq!(rows.keys().collect::<Vec<_>>(), ["1"]);
    assert_eq!(number(&rows["1"], "balance_avg_3m"), 5000.0); // Apr–Jun: 4, 5, 6 thousand
    assert_eq!(number(&rows["1"], "tenure_months"), 13.0);
    // A month more: only January 2025 runs (customer 3 signs up then).
    let january = run_hand_made(&t, &["--set", "last_month=2025-01"]);
    assert_eq!(january.code, 0, "{}", january.stderr);
    assert!(
        january.stderr.contains("1 ran, 12 up to date"),
        "{}",
        january.stderr
    );
    let rows = features(&t, "out/hand/2025-01");
    assert_eq!(rows.keys().collect::<Vec<_>>(), ["1", "2", "3"]);
}

#[test]
fn the_shipped_sample_gives_twenty_odd_features_for_ten_thousand_customers() {
    let repo = common::repo();
    let t = pipeline()
        .file(
            "examples/customers/customer_base.csv",
            std::fs::read(repo.join("examples/customers/customer_base.csv")).unwrap(),
        )
        .file(
            "examples/customers/customer_behavior_assets.csv",
            std::fs::read(repo.join("examples/customers/customer_behavior_assets.csv")).unwrap(),
        );
    let out = t.exec(&["run", "pipelines/customer_features.yaml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows = features(&t, "out/customers/2024-12");
    assert_eq!(rows.len(), 10_000);
    assert_eq!(rows["1"].len(), 24, "the id and 23 features");
    let meta: serde_json::Value =
        serde_json::from_str(&t.read("out/customers/2024-12/features/features_v1/_meta.json"))
            .unwrap();
    assert_eq!(
        meta["report"]["descriptions"]["balance_avg_3m"],
        "Mean month-end balance"
    );
    let again = t.exec(&["run", "pipelines/customer_features.yaml"]);
    assert!(
        again.stderr.contains("0 ran, 12 up to date"),
        "{}",
        again.stderr
    );
}
