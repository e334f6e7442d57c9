//! When Python with pandas is available, the seed's own `clean_orders` (tests/pandas/) and imba's
//! `clean` stage agree exactly on the shipped sample, and on the same file with a byte order
//! mark and CRLF line ends: every count and every IQR bound.
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
    let plain = std::fs::read(repo.join("examples/instacart/orders.csv")).unwrap();
    // The same file as Excel on Windows saves it: a UTF-8 byte order mark, CRLF line ends.
    let mut windows = b"\xef\xbb\xbf".to_vec();
    for line in plain.split_inclusive(|&b| b == b'\n') {
        match line.strip_suffix(b"\n") {
            Some(text) => {
                windows.extend_from_slice(text);
                windows.extend_from_slice(b"\r\n");
            }
            None => windows.extend_from_slice(line),
        }
    }
    let mut cleaned = Vec::new();
    for (name, bytes) in [("plain", &plain), ("BOM and CRLF", &windows)] {
        let t = Test::new()
            .file(
                "pipelines/monthly.yaml",
                std::fs::read(repo.join("pipelines/monthly.yaml")).unwrap(),
            )
            .file("examples/instacart/orders.csv", bytes.clone());
        let seed = std::process::Command::new("python3")
            .arg(repo.join("tests/pandas/seed_clean.py"))
            .arg(t.path().join("examples/instacart/orders.csv"))
            .output()
            .expect("run python3");
        assert!(
            seed.status.success(),
            "{}",
            String::from_utf8_lossy(&seed.stderr)
        );
        let expected: serde_json::Value = serde_json::from_slice(&seed.stdout).unwrap();
        let run = t.exec(&["run", "pipelines/monthly.yaml", "--stage", "clean_orders"]);
        assert_eq!(run.code, 0, "{name}: {}", run.stderr);
        let ours: serde_json::Value =
            serde_json::from_str(&t.read("out/monthly/cleaned/summaries/clean_summary.json"))
                .unwrap();
        for (key, value) in expected.as_object().unwrap() {
            assert_eq!(
                &ours[key], value,
                "{name}: `{key}`: imba {} vs pandas {value}",
                ours[key]
            );
        }
        cleaned.push(std::fs::read(t.path().join("out/monthly/cleaned/orders.parquet")).unwrap());
    }
    assert!(
        cleaned[0] == cleaned[1],
        "a BOM and CRLF line ends change the cleaned table"
    );
}
