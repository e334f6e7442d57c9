//! The build itself: `--features spark` must not change the features of any crate the default
//! build already has, or CI (which builds both) would build polars twice and double its time.

use std::collections::BTreeMap;

/// Package id → its enabled features, as cargo resolves them with these arguments.
fn features(extra: &[&str]) -> BTreeMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    // Only this machine's platform: crates for other targets (Android's, Windows') are never
    // needed here. Not `--offline`: on a fresh machine the default build has not fetched the
    // Spark client's crates yet, and cargo fetches them from the registry once.
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("run rustc -vV");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names its host");
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", &host])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| {
            let features = node["features"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_owned())
                .collect();
            (node["id"].as_str().unwrap().to_owned(), features)
        })
        .collect()
}

#[test]
fn the_spark_feature_adds_crates_without_changing_shared_ones() {
    let default = features(&[]);
    let spark = features(&["--features", "spark"]);
    let changed: Vec<String> = default
        .iter()
        .filter(|(id, f)| !id.contains("#imba@") && spark.get(*id).is_some_and(|s| s != *f))
        .map(|(id, f)| format!("{id}: {f:?} → {:?}", spark[id]))
        .collect();
    assert!(
        changed.is_empty(),
        "turn these features on in Cargo.toml's unification block:\n{}",
        changed.join("\n")
    );
}
