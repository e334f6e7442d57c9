//! The checked-in JSON Schema of pipeline files cannot drift from the code.

mod common;

use imba::config::raw::{PIPELINE_KEYS, STAGE_KEYS};

fn generated() -> serde_json::Value {
    serde_json::from_str(&imba::config::schema::pipeline_schema_json()).unwrap()
}

fn keys(schema: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

#[test]
fn docs_schema_is_up_to_date() {
    let path = common::repo().join("docs/pipeline.schema.json");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != imba::config::schema::pipeline_schema_json() {
        if std::env::var_os("IMBA_UPDATE_SCHEMA").is_some() {
            std::fs::write(&path, imba::config::schema::pipeline_schema_json()).unwrap();
        } else {
            panic!("docs/pipeline.schema.json is out of date: run `IMBA_UPDATE_SCHEMA=1 cargo test --test schema`");
        }
    }
}

#[test]
fn the_schema_and_the_validator_know_the_same_keys() {
    let schema = generated();
    assert_eq!(keys(&schema), PIPELINE_KEYS);
    assert_eq!(keys(&schema["$defs"]["StageSchema"]), STAGE_KEYS);
    let mut check_keys: Vec<&str> = imba::config::checks::CHECK_KINDS
        .iter()
        .chain(imba::config::checks::CHECK_OPTIONS)
        .copied()
        .collect();
    check_keys.sort();
    assert_eq!(keys(&schema["$defs"]["CheckSchema"]), check_keys);
    assert_eq!(
        keys(&schema["$defs"]["StorageSchema"]),
        imba::config::resolve::STORAGE_KEYS
    );
}

#[test]
fn every_shipped_pipeline_fits_the_schema() {
    let schema = generated();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut checked = 0;
    for dir in ["pipelines", "examples"] {
        for entry in walk(&common::repo().join(dir)) {
            if entry.extension().is_some_and(|e| e == "yaml")
                && std::fs::read_to_string(&entry).unwrap().contains("stages:")
            {
                let text = std::fs::read_to_string(&entry).unwrap();
                let mut sources = imba::diagnostic::Sources::default();
                let id = sources.add("x", text.as_str());
                let json = imba::config::yaml::parse(id, &text).unwrap().to_json();
                let errors: Vec<String> = validator
                    .iter_errors(&json)
                    .map(|e| e.to_string())
                    .collect();
                assert!(errors.is_empty(), "{}: {errors:?}", entry.display());
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no pipeline was checked");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
