//! `imba dag` in each format, `--files`, and DOT that Graphviz accepts.

mod common;

use common::Test;
use insta::assert_snapshot;

const PIPELINE: &str = r#"
vars:
  out: out
stages:
  clean:
    cmd: cp {{ inputs.raw }} {{ outputs.table }}
    inputs: {raw: data/orders.csv}
    outputs: {table: "{{ out }}/cleaned/orders.csv"}
  per_user:
    desc: Orders per user.
    cmd: cut -d, -f2 {{ inputs[0] }} | sort | uniq -c > {{ outputs[0] }}
    inputs: ["{{ out }}/cleaned/orders.csv"]
    outputs: ["{{ out }}/agg/per_user.txt"]
  per_dow:
    cmd: cut -d, -f5 {{ inputs[0] }} | sort | uniq -c > {{ outputs[0] }}
    inputs: ["{{ out }}/cleaned/orders.csv"]
    outputs: ["{{ out }}/agg/per_dow.txt"]
  report:
    matrix:
      fmt: [txt, "md"]
    cmd: cat {{ inputs | join(" ") }} > {{ outputs[0] }}
    inputs: ["{{ out }}/agg/per_user.txt", "{{ out }}/agg/per_dow.txt"]
    outputs: ["{{ out }}/report.{{ item.fmt }}"]
"#;

fn dag(args: &[&str]) -> common::Output {
    let mut all = vec!["dag", "pipeline.yaml"];
    all.extend_from_slice(args);
    Test::new()
        .file("data/orders.csv", "id\n1\n")
        .pipeline(PIPELINE)
        .args(&all)
        .run()
}

#[test]
fn text() {
    assert_snapshot!(dag(&[]).all());
}

#[test]
fn dot() {
    assert_snapshot!(dag(&["--dot"]).all());
}

#[test]
fn dot_with_files() {
    assert_snapshot!(dag(&["--dot", "--files"]).all());
}

#[test]
fn mermaid() {
    assert_snapshot!(dag(&["--mermaid"]).all());
}

#[test]
fn mermaid_with_files() {
    assert_snapshot!(dag(&["--mermaid", "--files"]).all());
}

#[test]
fn json() {
    assert_snapshot!(dag(&["--json"]).all());
}

#[test]
fn formats_are_exclusive() {
    let out = dag(&["--dot", "--json"]);
    assert_eq!(out.code, 2);
    assert_snapshot!(out.all());
}

#[test]
fn the_same_pipeline_draws_the_same_every_time() {
    let first = dag(&["--dot", "--files"]).stdout;
    for _ in 0..3 {
        assert_eq!(dag(&["--dot", "--files"]).stdout, first);
    }
}

#[test]
fn graphviz_renders_the_dot_output() {
    let Ok(status) = std::process::Command::new("dot").arg("-V").output() else {
        eprintln!("skipped: Graphviz `dot` is not installed");
        return;
    };
    assert!(status.status.success());
    for args in [&["--dot"][..], &["--dot", "--files"][..]] {
        let out = dag(args);
        let mut child = std::process::Command::new("dot")
            .arg("-Tsvg")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn dot");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(out.stdout.as_bytes())
            .unwrap();
        let rendered = child.wait_with_output().unwrap();
        assert!(
            rendered.status.success(),
            "dot rejected the output: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let svg = String::from_utf8_lossy(&rendered.stdout);
        assert!(svg.contains("report@md"), "every stage is drawn");
        assert!(
            rendered.stderr.is_empty(),
            "dot warned: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
    }
}

#[test]
fn overrides_change_the_drawing() {
    let out = Test::new()
        .file("data/orders.csv", "id\n1\n")
        .file("prod.yaml", "out: build\n")
        .pipeline(PIPELINE)
        .args(&[
            "dag",
            "pipeline.yaml",
            "--vars",
            "prod.yaml",
            "--set",
            "report.extra=1",
        ])
        .run();
    assert_snapshot!(out.all());
}

/// With `--files`, a file inside a directory output hangs from that directory (and so from the
/// stage that writes it), in the text view and in DOT.
#[test]
fn files_inside_a_directory_output_come_from_its_stage() {
    let t = Test::new().file("in.csv", "a\n1\n").pipeline(
        "stages:\n  split:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}/part.csv\n    inputs: [in.csv]\n    outputs: [parts/]\n  use:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [parts/part.csv]\n    outputs: [used.csv]\n",
    );
    let text = t.exec(&["dag", "pipeline.yaml", "--files"]);
    let dot = t.exec(&["dag", "pipeline.yaml", "--files", "--dot"]);
    insta::assert_snapshot!(format!("{}\n{}", text.all(), dot.all()));
}
