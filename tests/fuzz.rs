//! No input makes the parser or validator panic: property tests over arbitrary and mutated files.
//!
//! Cases per property default to proptest's 256 per run; `PROPTEST_CASES=100000` runs longer.

use std::path::Path;

use imba::config::{self, Overrides};
use imba_stages::Registry;
use proptest::prelude::*;

fn check(text: &[u8], sets: Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(&path, text).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/in.csv"), "a\n").unwrap();
    let overrides = Overrides {
        vars_files: Vec::new(),
        sets,
        ..Overrides::default()
    };
    let (sources, loaded) = config::load(Path::new(&path), &overrides, &Registry::standard());
    match loaded {
        Ok(pipeline) => {
            if let Err(diagnostics) = imba::graph::dag::build(pipeline, Default::default()) {
                let _ = imba::diagnostic::render_plain(&sources, &diagnostics);
            }
        }
        Err(config::LoadError::Invalid(diagnostics)) => {
            assert!(!diagnostics.is_empty());
            let rendered = imba::diagnostic::render_plain(&sources, &diagnostics);
            assert!(rendered.contains("error"), "{rendered}");
        }
        Err(config::LoadError::Unreadable(_)) => {}
    }
}

const SEED: &str = r#"vars:
  out: out
  months: ["01", "02"]
stages:
  a:
    cmd: cp {{ inputs.x }} {{ outputs.y }}
    inputs: {x: data/in.csv}
    outputs: {y: "{{ out }}/a.csv"}
  b:
    matrix:
      m: "{{ months }}"
    cmd: cat {{ inputs[0] }} > {{ outputs[0] }}
    inputs: ["{{ out }}/a.csv"]
    outputs: ["{{ out }}/b-{{ item.m }}.csv"]
  c:
    foreach: [p, q]
    cmd: echo {{ item }}
    params: {k: 1}
    outputs: [out/c/]
"#;

/// Tokens that YAML and templates give meaning to.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(": ".to_owned()),
        Just("\n".to_owned()),
        Just("  ".to_owned()),
        Just("- ".to_owned()),
        Just("{{ ".to_owned()),
        Just(" }}".to_owned()),
        Just("{%".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just(",".to_owned()),
        Just("&a ".to_owned()),
        Just("*a".to_owned()),
        Just("<<: ".to_owned()),
        Just("'".to_owned()),
        Just("\"".to_owned()),
        Just("stages".to_owned()),
        Just("cmd".to_owned()),
        Just("uses".to_owned()),
        Just("inputs".to_owned()),
        Just("outputs".to_owned()),
        Just("matrix".to_owned()),
        Just("foreach".to_owned()),
        Just("vars".to_owned()),
        Just("item".to_owned()),
        Just("s3://".to_owned()),
        Just("../".to_owned()),
        Just("é".to_owned()),
        Just("---\n".to_owned()),
        Just("!!str ".to_owned()),
        "[a-z0-9_./@-]{0,6}",
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        check(&bytes, Vec::new());
    }

    #[test]
    fn yaml_shaped_text_never_panics(tokens in proptest::collection::vec(token(), 0..80)) {
        check(tokens.concat().as_bytes(), Vec::new());
    }

    #[test]
    fn mutated_pipelines_never_panic(
        cut in 0..SEED.len(),
        len in 0..40usize,
        insert in proptest::collection::vec(token(), 0..6),
        sets in proptest::collection::vec("[+a-z.]{0,8}=[a-z0-9\\[\\]{}:, ]{0,8}", 0..3),
    ) {
        let mut text = SEED.as_bytes().to_vec();
        let end = (cut + len).min(text.len());
        text.splice(cut..end, insert.concat().into_bytes());
        check(&text, sets);
    }
}

#[test]
fn the_seed_pipeline_is_valid() {
    check(SEED.as_bytes(), Vec::new());
}
