//! Params of built-in stages are checked against the stage's params type, every error at once.
//!
//! imba's own built-ins arrive with later work; the mechanism is tested here with a stage
//! defined by the test, through the library, exactly as the CLI uses it.

use std::path::Path;

use imba::config::{self, LoadError, Overrides};
use imba::diagnostic::render_plain;
use imba::model::StageKind;
use imba_stages::{Builtin, BuiltinStage, Registry, StageError, StageIo, StageReport};
use insta::assert_snapshot;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct TrimParams {
    /// Columns to trim.
    columns: Vec<String>,
    #[serde(default)]
    iqr: Iqr,
    #[serde(default)]
    how: How,
}

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Iqr {
    #[serde(default = "default_k")]
    #[schemars(range(min = 0.0))]
    k: f64,
}

impl Default for Iqr {
    fn default() -> Self {
        Iqr { k: default_k() }
    }
}

fn default_k() -> f64 {
    1.5
}

#[derive(Deserialize, Serialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
enum How {
    #[default]
    Any,
    All,
}

struct Trim;

impl BuiltinStage for Trim {
    const NAME: &'static str = "trim";
    const VERSION: u32 = 3;
    const SUMMARY: &'static str = "trims outliers";
    type Params = TrimParams;
    const INPUTS: imba_stages::ports::Inputs = imba_stages::ports::Inputs::Named(&[]);
    const OUTPUTS: &'static [imba_stages::ports::Port] = &[];

    fn run(params: &TrimParams, io: &StageIo) -> Result<StageReport, StageError> {
        std::fs::write(&io.outputs[0].1, params.columns.join(","))
            .map_err(|e| StageError::new(e.to_string()))?;
        Ok(StageReport::default())
    }
}

fn load(yaml: &str, sets: &[&str]) -> Result<imba::model::Pipeline, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline.yaml");
    std::fs::write(&path, yaml).unwrap();
    let registry = Registry::with([Builtin::of::<Trim>()]);
    let overrides = Overrides {
        vars_files: Vec::new(),
        sets: sets.iter().map(|s| s.to_string()).collect(),
        ..Overrides::default()
    };
    let (sources, loaded) = config::load(Path::new(&path), &overrides, &registry);
    loaded.map_err(|error| match error {
        LoadError::Unreadable(message) => message,
        LoadError::Invalid(diagnostics) => {
            render_plain(&sources, &diagnostics).replace(&dir.path().display().to_string(), "[TMP]")
        }
    })
}

#[test]
fn params_are_normalised_with_defaults() {
    let pipeline = load("vars:\n  k: 2\nstages:\n  t:\n    uses: trim\n    params:\n      columns: [a]\n      iqr: {k: \"{{ k }}\"}\n", &[]).unwrap();
    let StageKind::Builtin {
        name,
        version,
        params,
    } = &pipeline.stages[0].kind
    else {
        panic!("builtin")
    };
    assert_eq!((name.as_str(), *version), ("trim", 3));
    assert_eq!(
        params.to_string(),
        r#"{"columns":["a"],"how":"any","iqr":{"k":2.0}}"#
    );
}

#[test]
fn every_params_error_at_once() {
    let err = load(
        "stages:\n  t:\n    uses: trim\n    params:\n      columns: a\n      iqr: {k: -1, kk: 2}\n      how: alll\n      colour: red\n",
        &[],
    )
    .unwrap_err();
    assert_snapshot!(err);
}

#[test]
fn a_missing_required_param() {
    assert_snapshot!(load("stages:\n  t:\n    uses: trim\n", &[]).unwrap_err());
}

#[test]
fn a_bad_override_points_at_the_command_line() {
    assert_snapshot!(load(
        "stages:\n  t:\n    uses: trim\n    params: {columns: [a]}\n",
        &["t.iqr.k=abc"]
    )
    .unwrap_err());
}

#[test]
fn an_override_sets_a_default_param() {
    let pipeline = load(
        "stages:\n  t:\n    uses: trim\n    params: {columns: [a]}\n",
        &["t.iqr.k=3", "t.how=all"],
    )
    .unwrap();
    let StageKind::Builtin { params, .. } = &pipeline.stages[0].kind else {
        panic!("builtin")
    };
    assert_eq!(
        params.to_string(),
        r#"{"columns":["a"],"how":"all","iqr":{"k":3.0}}"#
    );
}

#[test]
fn set_errors() {
    let yaml = "vars:\n  out: o\nstages:\n  t:\n    uses: trim\n    params: {columns: [a]}\n";
    let errors: Vec<String> = [
        &["otu=x"][..],
        &["out"][..],
        &["t=1"][..],
        &["out.x=1"][..],
        &["out=[1"][..],
    ]
    .iter()
    .map(|sets| load(yaml, sets).unwrap_err())
    .collect();
    assert_snapshot!(errors.join("\n"));
}
