//! The docs cannot drift: the CLI reference is generated, and every YAML example in the format
//! reference is a pipeline that validates.

mod common;

use common::Test;

#[test]
fn cli_reference_is_up_to_date() {
    let path = common::repo().join("docs/cli.md");
    let generated = imba::cli::reference_markdown();
    if std::fs::read_to_string(&path).unwrap_or_default() != generated {
        if std::env::var_os("IMBA_UPDATE_DOCS").is_some() {
            std::fs::write(&path, generated).unwrap();
        } else {
            panic!("docs/cli.md is out of date: run `IMBA_UPDATE_DOCS=1 cargo test --test docs`");
        }
    }
}

/// The ```yaml blocks of a markdown file that are whole pipelines (they have `stages:`).
fn pipelines_in(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                if block.contains("stages:") {
                    blocks.push(block.clone());
                }
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn every_pipeline_in_the_docs_is_valid() {
    let mut blocks = Vec::new();
    for (doc, at_least) in [("docs/pipeline-format.md", 5), ("docs/stages.md", 2)] {
        let text = std::fs::read_to_string(common::repo().join(doc)).unwrap();
        let found = pipelines_in(&text);
        assert!(found.len() >= at_least, "{doc} shows whole pipelines");
        blocks.extend(found);
    }
    for block in blocks {
        let out = Test::new()
            .file("data/orders.csv", "order_id\n1\n")
            .file("data/users.csv", "user_id\n1\n")
            .pipeline(&block)
            .args(&["validate", "pipeline.yaml"])
            .run();
        assert_eq!(
            out.code, 0,
            "this example does not validate:\n{block}\n{}",
            out.stderr
        );
    }
}

#[test]
fn the_format_reference_covers_every_key() {
    let doc = std::fs::read_to_string(common::repo().join("docs/pipeline-format.md")).unwrap();
    for key in imba::config::raw::PIPELINE_KEYS
        .iter()
        .chain(imba::config::raw::STAGE_KEYS)
    {
        assert!(
            doc.contains(&format!("### `{key}`")),
            "docs/pipeline-format.md has no section for `{key}`"
        );
    }
}
