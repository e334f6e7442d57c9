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
    for (doc, at_least) in [
        ("docs/pipeline-format.md", 5),
        ("docs/stages.md", 2),
        ("docs/partitions.md", 4),
    ] {
        let text = std::fs::read_to_string(common::repo().join(doc)).unwrap();
        let found = pipelines_in(&text);
        assert!(found.len() >= at_least, "{doc} shows whole pipelines");
        blocks.extend(found);
    }
    for block in blocks {
        // Instacart's orders: validate checks the columns the examples' params name.
        let orders = "order_id,user_id,eval_set,order_number,order_dow,order_hour_of_day,days_since_prior_order\n1,1,prior,1,0,8,\n";
        let mut t = Test::new().file("data/orders.csv", orders).file(
            "data/users.csv",
            "user_id,days_imp,frequency,age,region\n1,,3,34,north\n",
        );
        // Months for the examples that discover them.
        for month in ["2017-03", "2017-04", "2017-05"] {
            t = t.file(&format!("raw/{month}/orders.csv"), orders);
        }
        let out = t
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

/// `docs/errors.md`: every rendered error the snapshot tests pin down, exactly as a user sees
/// it, generated from `tests/snapshots/` so that the catalogue cannot drift.
#[test]
fn error_catalogue_is_up_to_date() {
    let path = common::repo().join("docs/errors.md");
    let generated = error_catalogue();
    if std::fs::read_to_string(&path).unwrap_or_default() != generated {
        if std::env::var_os("IMBA_UPDATE_DOCS").is_some() {
            std::fs::write(&path, generated).unwrap();
        } else {
            panic!(
                "docs/errors.md is out of date: run `IMBA_UPDATE_DOCS=1 cargo test --test docs`"
            );
        }
    }
}

fn error_catalogue() -> String {
    let sections = [
        (
            "validate",
            "Pipeline files (`imba validate`, and every command that reads a pipeline; exit 2)",
        ),
        ("params", "Params and `--set` (exit 2)"),
        ("cli", "The command line (exit 2)"),
        ("run", "Running (`imba run`; a failed stage exits 1)"),
        (
            "checks",
            "Checks (`checks:` and `on_failure`; a failed check exits 1)",
        ),
        ("monthly", "Built-in stages"),
        ("versions", "Versions"),
        ("s3", "S3 (a failed request fails its stage: exit 1)"),
        ("cache", "The run cache"),
        (
            "remote",
            "The remote run cache (a remote that fails is a warning: the run computes)",
        ),
        ("watch", "Watching (`imba watch`)"),
        (
            "partitions",
            "Partitions (`partitions:`, month-over-month checks, choosing partitions)",
        ),
        ("dag", "Drawing the graph"),
        ("ui", "The web page (`imba ui`; exit 2)"),
        (
            "safety",
            "Safety (confined outputs, stage names, shell quoting, bounded work; exit 2)",
        ),
        (
            "safety_input",
            "Unsafe input: hostile YAML, FIFOs, control characters",
        ),
        (
            "limits",
            "Resources, retries and timeouts (a timed-out stage fails: exit 1)",
        ),
        ("slurm", "Executors (`executor:`, `--executor`; Slurm)"),
        (
            "spark",
            "Spark (`engine: spark`; a failed Spark job fails its stage: exit 1)",
        ),
        (
            "spark_faults",
            "Spark faults: authentication, a lost server (exit 1)",
        ),
    ];
    let mut snapshots: Vec<(String, String)> =
        std::fs::read_dir(common::repo().join("tests/snapshots"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "snap"))
            .map(|p| {
                let name = p.file_stem().unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&p).unwrap();
                // The body: what follows the second `---` line of insta's header.
                let body = text
                    .splitn(3, "---\n")
                    .nth(2)
                    .unwrap_or_default()
                    .to_owned();
                (name, body)
            })
            .filter(|(_, body)| body.contains("error:") || body.contains("warning:"))
            .collect();
    snapshots.sort();
    for (name, _) in &snapshots {
        let prefix = name.split_once("__").map_or(name.as_str(), |(p, _)| p);
        assert!(
            sections.iter().any(|(p, _)| *p == prefix),
            "tests/{prefix}.rs has error snapshots but no section in the error catalogue"
        );
    }
    let mut out = String::from(
        "# Error catalogue\n\n\
         Every error and warning below is what imba prints, word for word, in the situation its title\n\
         describes. Generated from the snapshot tests in `tests/snapshots/` (`IMBA_UPDATE_DOCS=1\n\
         cargo test --test docs` rewrites this file; a test fails when it drifts). `[TMP]` stands for\n\
         the directory the test ran in, `[RUN]` for a run id, `[TIME]` for a duration.\n",
    );
    for (prefix, title) in sections {
        let mine: Vec<&(String, String)> = snapshots
            .iter()
            .filter(|(name, _)| name.starts_with(&format!("{prefix}__")))
            .collect();
        if mine.is_empty() {
            continue;
        }
        out.push_str(&format!("\n## {title}\n"));
        for (name, body) in mine {
            let heading = name
                .split_once("__")
                .map_or(name.as_str(), |(_, rest)| rest)
                .replace('_', " ");
            let mut heading = heading;
            if let Some(first) = heading.get(..1) {
                heading = first.to_uppercase() + &heading[1..];
            }
            out.push_str(&format!(
                "\n### {heading}\n\n```text\n{}\n```\n",
                body.trim_end()
            ));
        }
    }
    out
}

/// docs/README.md lists every page of docs/, so none is linked from nowhere.
#[test]
fn the_docs_index_lists_every_page() {
    let docs = common::repo().join("docs");
    let index = std::fs::read_to_string(docs.join("README.md")).unwrap();
    for entry in std::fs::read_dir(&docs).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") && name != "README.md" {
            assert!(
                index.contains(&format!("]({name})")),
                "docs/README.md does not list {name}"
            );
        }
    }
}
