//! The registry: maps a `uses:` name to a built-in stage's version, params schema and checker.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Serialize};

use crate::ports::{Inputs, Port};

/// A built-in stage, as its implementation declares it.
pub trait BuiltinStage: 'static {
    /// The name used in `uses:`.
    const NAME: &'static str;
    /// The implementation version. Bump it whenever the stage's output for the same inputs and
    /// params changes: it is part of every fingerprint, so bumping it re-runs every use.
    const VERSION: u32;
    /// One line for `imba stages` and the docs.
    const SUMMARY: &'static str;
    /// The typed `params:` of the stage.
    type Params: DeserializeOwned + Serialize + JsonSchema;
    /// What the stage reads: the names (or, for a list, the count) a pipeline must declare are
    /// checked against it at validate time.
    const INPUTS: Inputs;
    /// What the stage writes, each output once: [`StageIo::output`] and [`OutputColumns`] name
    /// them by these.
    const OUTPUTS: &'static [Port];

    /// Checks what the params type cannot say alone (a name in one param that must appear in
    /// another, say), at validate time: every problem, each at its param.
    fn check_params(params: &Self::Params) -> Vec<ParamsError> {
        let _ = params;
        Vec::new()
    }

    /// The columns of the tables the stage writes, where they follow from its params and the
    /// columns of its inputs (each `None` when unknown), so that checks naming a missing column
    /// fail at validate time. Only exact column lists: a table whose columns depend on the data is
    /// left out.
    fn output_columns(params: &Self::Params, inputs: &[Option<Vec<String>>]) -> Vec<OutputColumns> {
        let _ = (params, inputs);
        Vec::new()
    }

    /// The columns the stage's params name in its inputs, each with the param that names it, so
    /// that a source table lacking one is an error at that param at validate time, naming the
    /// file (the same columns the stage requires when it runs).
    fn input_columns(params: &Self::Params) -> Vec<InputColumn> {
        let _ = params;
        Vec::new()
    }

    /// The most memory the stage takes, in bytes, on these inputs (local paths, existing), from
    /// measurements (`scripts/bench`, docs/performance.md "Memory"): what the orchestrator
    /// reserves of its memory budget while the stage computes, unless the stage declares its own
    /// `resources.memory`. `None`: no estimate, nothing reserved.
    fn memory(params: &Self::Params, inputs: &[std::path::PathBuf]) -> Option<u64> {
        let _ = (params, inputs);
        None
    }

    /// Reads `io.inputs` and writes every path in `io.outputs` (staging paths: the orchestrator
    /// moves them into place once this returned `Ok`).
    fn run(params: &Self::Params, io: &StageIo) -> Result<StageReport, StageError>;
}

/// The paths a built-in stage reads and writes, by their names in the pipeline file.
#[derive(Debug, Clone, Default)]
pub struct StageIo {
    pub inputs: Vec<(Option<String>, std::path::PathBuf)>,
    pub outputs: Vec<(Option<String>, std::path::PathBuf)>,
    /// Set when the run is cancelled: a long stage looks at it and stops early.
    pub cancel: Cancel,
}

/// A cancellation flag the orchestrator sets and a stage polls (between MICE iterations, say).
#[derive(Debug, Clone, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The error of a stage that stopped because it was cancelled.
pub const CANCELLED: &str = "cancelled";

impl StageIo {
    /// The `index`-th input (of a stage that takes inputs in order or any one).
    pub fn input(&self, index: usize) -> Result<&std::path::Path, StageError> {
        self.inputs
            .get(index)
            .map(|(_, p)| p.as_path())
            .ok_or_else(|| StageError::new(format!("the stage needs an input #{}", index + 1)))
    }

    /// The output `port`: by its name, or (when outputs are a list) by its position.
    pub fn output(&self, port: Port) -> Result<&std::path::Path, StageError> {
        self.output_opt(port)
            .ok_or_else(|| StageError::new(format!("the stage needs an output `{}`", port.name)))
    }

    /// The input `port`: by its name, or (when inputs are a list) by its position.
    pub fn input_at(&self, port: Port) -> Result<&std::path::Path, StageError> {
        find(&self.inputs, port)
            .ok_or_else(|| StageError::new(format!("the stage needs an input `{}`", port.name)))
    }

    /// The output `port` when the pipeline declares it (an optional one).
    pub fn output_opt(&self, port: Port) -> Option<&std::path::Path> {
        find(&self.outputs, port)
    }

    /// Writes a stage's JSON (a summary, a report) as people read it: pretty, one trailing
    /// newline.
    pub fn write_json(path: &std::path::Path, value: &impl Serialize) -> Result<(), StageError> {
        let mut text =
            serde_json::to_string_pretty(value).map_err(|e| StageError::new(e.to_string()))?;
        text.push('\n');
        std::fs::write(path, text)
            .map_err(|e| StageError::new(format!("cannot write `{}`: {e}", path.display())))
    }
}

fn find(ports: &[(Option<String>, std::path::PathBuf)], port: Port) -> Option<&std::path::Path> {
    if ports.iter().any(|(n, _)| n.is_some()) {
        ports
            .iter()
            .find(|(n, _)| n.as_deref() == Some(port.name))
            .map(|(_, p)| p.as_path())
    } else {
        ports.get(port.position).map(|(_, p)| p.as_path())
    }
}

/// A column a built-in stage's params name in one of its inputs (see
/// [`BuiltinStage::input_columns`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputColumn {
    /// The input by its name in the pipeline (`None`: the stage's one input).
    pub input: Option<String>,
    pub column: String,
    /// The param that names it, as a JSON pointer into the params (`/cast/user_id`).
    pub pointer: String,
}

impl InputColumn {
    /// Columns of the stage's one input, from `(column, pointer)` pairs.
    pub fn of_the_input<'a>(
        columns: impl IntoIterator<Item = (&'a str, String)>,
    ) -> Vec<InputColumn> {
        columns
            .into_iter()
            .map(|(column, pointer)| InputColumn {
                input: None,
                column: column.to_owned(),
                pointer,
            })
            .collect()
    }
}

/// The columns of one table a built-in stage writes (see [`BuiltinStage::output_columns`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputColumns {
    /// The output, one of the stage's [`BuiltinStage::OUTPUTS`].
    pub output: Port,
    /// The file inside a directory output; `None` for a file output.
    pub file: Option<String>,
    pub columns: Vec<String>,
}

/// What a built-in stage reports about its run (goes into the run record).
#[derive(Debug, Clone, Default)]
pub struct StageReport {
    pub summary: serde_json::Value,
    /// What the person running the stage should hear of, though the stage succeeded (a `warn`
    /// check that missed, say); printed by the orchestrator and kept in the run record.
    pub warnings: Vec<String>,
    /// Checks the stage evaluated itself; a `fail` one that did not pass fails the stage after
    /// it returned, and its outputs are quarantined rather than committed.
    pub checks: Vec<crate::checks::Reported>,
}

/// Why a built-in stage failed, in words for the person running it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    pub message: String,
    /// The param the problem is about, as a JSON pointer into the stage's params
    /// (`/cast/order_dow`), so that the orchestrator can point at it in the pipeline file.
    pub param: Option<String>,
}

impl StageError {
    pub fn new(message: impl Into<String>) -> Self {
        StageError {
            message: message.into(),
            param: None,
        }
    }

    /// The same error, about the param at `pointer`.
    pub fn at_param(mut self, pointer: impl Into<String>) -> Self {
        self.param = Some(pointer.into());
        self
    }
}

/// Why a stage's params do not fit its params type (after the schema check passed).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ParamsError {
    /// A JSON pointer into the params, when serde could tell where.
    pub pointer: String,
    pub message: String,
}

/// The object-safe face of a [`BuiltinStage`], as kept in the [`Registry`].
#[derive(Clone)]
pub struct Builtin {
    pub name: &'static str,
    pub version: u32,
    pub summary: &'static str,
    schema: fn() -> schemars::Schema,
    normalize: fn(&serde_json::Value) -> Result<serde_json::Value, ParamsError>,
    run: fn(&serde_json::Value, &StageIo) -> Result<StageReport, StageError>,
    check_ports: PortCheck,
    check_params: fn(&serde_json::Value) -> Vec<ParamsError>,
    output_columns: ColumnsOf,
    input_columns: fn(&serde_json::Value) -> Vec<InputColumn>,
    memory: fn(&serde_json::Value, &[std::path::PathBuf]) -> Option<u64>,
}

/// See [`BuiltinStage::output_columns`].
type ColumnsOf = fn(&serde_json::Value, &[Option<Vec<String>>]) -> Vec<OutputColumns>;

/// See [`Builtin::check_ports`].
type PortCheck = fn(&[Option<String>], &[Option<String>]) -> Result<(), crate::ports::PortError>;

impl std::fmt::Debug for Builtin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builtin")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Builtin {
    /// The descriptor of `S`.
    pub fn of<S: BuiltinStage>() -> Self {
        Builtin {
            name: S::NAME,
            version: S::VERSION,
            summary: S::SUMMARY,
            schema: || schemars::schema_for!(S::Params),
            normalize: normalize::<S::Params>,
            run: run::<S>,
            check_ports: check_ports::<S>,
            check_params: check_params::<S>,
            output_columns: output_columns::<S>,
            input_columns: |params| match serde_json::from_value::<S::Params>(params.clone()) {
                Ok(params) => S::input_columns(&params),
                Err(_) => Vec::new(),
            },
            memory: memory::<S>,
        }
    }

    /// See [`BuiltinStage::memory`], for normalised `params`.
    pub fn memory(&self, params: &serde_json::Value, inputs: &[std::path::PathBuf]) -> Option<u64> {
        (self.memory)(params, inputs)
    }

    /// The problems [`BuiltinStage::check_params`] finds in normalised `params`.
    pub fn check_params(&self, params: &serde_json::Value) -> Vec<ParamsError> {
        (self.check_params)(params)
    }

    /// The columns of the tables the stage writes, where they are knowable (see
    /// [`BuiltinStage::output_columns`]), for normalised `params`.
    pub fn output_columns(
        &self,
        params: &serde_json::Value,
        inputs: &[Option<Vec<String>>],
    ) -> Vec<OutputColumns> {
        (self.output_columns)(params, inputs)
    }

    /// The columns its params name in its inputs (see [`BuiltinStage::input_columns`]), for
    /// normalised `params`.
    pub fn input_columns(&self, params: &serde_json::Value) -> Vec<InputColumn> {
        (self.input_columns)(params)
    }

    /// Checks the stage's input and output names against its [`BuiltinStage::INPUTS`] and
    /// [`BuiltinStage::OUTPUTS`].
    pub fn check_ports(
        &self,
        inputs: &[Option<String>],
        outputs: &[Option<String>],
    ) -> Result<(), crate::ports::PortError> {
        (self.check_ports)(inputs, outputs)
    }

    /// Runs the stage with normalised `params`.
    pub fn run(&self, params: &serde_json::Value, io: &StageIo) -> Result<StageReport, StageError> {
        (self.run)(params, io)
    }

    /// The JSON Schema of the stage's params.
    pub fn params_schema(&self) -> schemars::Schema {
        (self.schema)()
    }

    /// Checks `params` against the params type and returns them in canonical form: every
    /// default filled in, keys sorted. This is what fingerprints hash.
    pub fn normalize_params(
        &self,
        params: &serde_json::Value,
    ) -> Result<serde_json::Value, ParamsError> {
        (self.normalize)(params)
    }
}

fn normalize<P: DeserializeOwned + Serialize>(
    value: &serde_json::Value,
) -> Result<serde_json::Value, ParamsError> {
    let typed: P = serde_path_to_error::deserialize(value).map_err(|e| ParamsError {
        pointer: pointer_of(e.path()),
        message: e.inner().to_string(),
    })?;
    serde_json::to_value(&typed).map_err(|e| ParamsError {
        pointer: String::new(),
        message: e.to_string(),
    })
}

fn check_ports<S: BuiltinStage>(
    inputs: &[Option<String>],
    outputs: &[Option<String>],
) -> Result<(), crate::ports::PortError> {
    crate::ports::check(S::INPUTS, S::OUTPUTS, inputs, outputs)
}

fn check_params<S: BuiltinStage>(params: &serde_json::Value) -> Vec<ParamsError> {
    match serde_json::from_value::<S::Params>(params.clone()) {
        Ok(params) => S::check_params(&params),
        Err(_) => Vec::new(),
    }
}

fn output_columns<S: BuiltinStage>(
    params: &serde_json::Value,
    inputs: &[Option<Vec<String>>],
) -> Vec<OutputColumns> {
    match serde_json::from_value::<S::Params>(params.clone()) {
        Ok(params) => S::output_columns(&params, inputs),
        Err(_) => Vec::new(),
    }
}

fn memory<S: BuiltinStage>(
    params: &serde_json::Value,
    inputs: &[std::path::PathBuf],
) -> Option<u64> {
    let params = serde_json::from_value::<S::Params>(params.clone()).ok()?;
    S::memory(&params, inputs)
}

fn run<S: BuiltinStage>(
    params: &serde_json::Value,
    io: &StageIo,
) -> Result<StageReport, StageError> {
    let params: S::Params = serde_json::from_value(params.clone())
        .map_err(|e| StageError::new(format!("params of `{}` do not fit: {e}", S::NAME)))?;
    S::run(&params, io)
}

fn pointer_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        out.push('/');
        match segment {
            Segment::Seq { index } => out.push_str(&index.to_string()),
            Segment::Map { key } => out.push_str(&crate::pointer::escape(key)),
            Segment::Enum { variant } => out.push_str(variant),
            Segment::Unknown => out.push('?'),
        }
    }
    out
}

/// The built-in stages by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    builtins: BTreeMap<&'static str, Builtin>,
}

impl Registry {
    /// The stages that ship with imba.
    pub fn standard() -> Self {
        Registry::with([
            Builtin::of::<crate::clean::Clean>(),
            Builtin::of::<crate::aggregate::Aggregate>(),
            Builtin::of::<crate::impute::Impute>(),
            Builtin::of::<crate::diagnose::Diagnose>(),
            Builtin::of::<crate::feature::FeatureStage>(),
        ])
    }

    /// A registry holding exactly `builtins` (tests and embedders use this).
    pub fn with(builtins: impl IntoIterator<Item = Builtin>) -> Self {
        Registry {
            builtins: builtins.into_iter().map(|b| (b.name, b)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Builtin> {
        self.builtins.get(name)
    }

    /// All built-ins, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Builtin> {
        self.builtins.values()
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.builtins.keys().copied()
    }

    /// The memory estimate of built-in `name` (see [`BuiltinStage::memory`]).
    pub fn memory(
        &self,
        name: &str,
        params: &serde_json::Value,
        inputs: &[std::path::PathBuf],
    ) -> Option<u64> {
        self.get(name)?.memory(params, inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Serialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct EchoParams {
        word: String,
        #[serde(default = "three")]
        times: u32,
    }
    fn three() -> u32 {
        3
    }
    struct Echo;
    impl BuiltinStage for Echo {
        const NAME: &'static str = "echo";
        const VERSION: u32 = 2;
        const SUMMARY: &'static str = "repeats a word";
        type Params = EchoParams;
        const INPUTS: Inputs = Inputs::Named(&[]);
        const OUTPUTS: &'static [Port] = &[Port::required("text", 0)];

        fn run(params: &EchoParams, io: &StageIo) -> Result<StageReport, StageError> {
            let text = vec![params.word.as_str(); params.times as usize].join(" ");
            std::fs::write(&io.outputs[0].1, text).map_err(|e| StageError::new(e.to_string()))?;
            Ok(StageReport::default())
        }
    }

    #[test]
    fn run_gets_typed_params() {
        let dir = std::env::temp_dir().join(format!("imba-echo-{}", std::process::id()));
        let io = StageIo {
            inputs: Vec::new(),
            outputs: vec![(None, dir.clone())],
            ..StageIo::default()
        };
        Builtin::of::<Echo>()
            .run(&serde_json::json!({"word": "hi", "times": 2}), &io)
            .expect("runs");
        assert_eq!(std::fs::read_to_string(&dir).unwrap(), "hi hi");
        let _ = std::fs::remove_file(dir);
    }

    #[test]
    fn normalize_fills_defaults_and_sorts_keys() {
        let registry = Registry::with([Builtin::of::<Echo>()]);
        let echo = registry.get("echo").expect("registered");
        assert_eq!(echo.version, 2);
        let params = serde_json::json!({"word": "hi"});
        let normal = echo.normalize_params(&params).expect("valid");
        assert_eq!(normal.to_string(), r#"{"times":3,"word":"hi"}"#);
    }

    #[test]
    fn normalize_reports_the_path_of_a_bad_value() {
        let echo = Builtin::of::<Echo>();
        let err = echo
            .normalize_params(&serde_json::json!({"word": "hi", "times": -1}))
            .expect_err("negative times");
        assert_eq!(err.pointer, "/times");
        assert!(err.message.contains("invalid value"), "{}", err.message);
    }

    #[test]
    fn the_schema_names_the_params() {
        let schema = serde_json::to_value(Builtin::of::<Echo>().params_schema()).unwrap();
        assert_eq!(schema["required"], serde_json::json!(["word"]));
    }
}
