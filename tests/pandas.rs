//! When Python with pandas is available, the seed's own `clean_orders` (tests/pandas/) and imba's
//! `clean` stage agree exactly on the shipped sample: every count and every IQR bound.
//! Skipped, saying so, when pandas is missing.

mod common;

use common::Test;

#[test]
fn clean_matches_the_seed_pandas_code() {
    let has_pandas = std::process::Command::new("python3")
        .args(["-c", "import pandas"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_pandas {
        eprintln!("skipped: python3 with pandas is not installed (pip install pandas)");
        return;
    }
    let repo = common::repo();
    let sample = repo.join("examples/instacart/orders.csv");
    let seed = std::process::Command::new("python3")
        .arg(repo.join("tests/pandas/seed_clean.py"))
        .arg(&sample)
        .output()
        .expect("run python3");
    assert!(
        seed.status.success(),
        "{}",
        String::from_utf8_lossy(&seed.stderr)
    );
    let expected: serde_json::Value = serde_json::from_slice(&seed.stdout).unwrap();

    let t = Test::new()
        .file(
            "pipelines/monthly.yaml",
            std::fs::read(repo.join("pipelines/monthly.yaml")).unwrap(),
        )
        .file(
            "examples/instacart/orders.csv",
            std::fs::read(&sample).unwrap(),
        );
    let run = t.exec(&["run", "pipelines/monthly.yaml", "--stage", "clean_orders"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let ours: serde_json::Value =
        serde_json::from_str(&t.read("out/monthly/cleaned/summaries/clean_summary.json")).unwrap();
    for (key, value) in expected.as_object().unwrap() {
        assert_eq!(
            &ours[key], value,
            "`{key}`: imba {} vs pandas {value}",
            ours[key]
        );
    }
}
