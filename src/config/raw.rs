//! The pipeline file as written: [`PipelineFile`] and [`StageSpec`], checked for shape only.
//!
//! This layer knows which keys exist and what kind of value each holds. It reports every unknown
//! key (with a suggestion), every value of the wrong kind and every stage that has both or
//! neither of `uses` and `cmd`, all at once. Templates, paths and params are left for
//! [`super::resolve`].

use crate::diagnostic::{did_you_mean, Diagnostic, Span};

use super::yaml::{Key, Node, Value};

/// Keys allowed at the top of a pipeline file. `docs/pipeline.schema.json` must list the same.
pub const PIPELINE_KEYS: &[&str] = &[
    "cache",
    "desc",
    "engine",
    "engines",
    "executors",
    "on_failure",
    "partitions",
    "stages",
    "storage",
    "vars",
    "workdir",
];

/// Keys allowed in a stage. `docs/pipeline.schema.json` must list the same.
pub const STAGE_KEYS: &[&str] = &[
    "argv",
    "checks",
    "cmd",
    "desc",
    "engine",
    "env",
    "executor",
    "foreach",
    "inputs",
    "keep",
    "matrix",
    "metrics",
    "on_failure",
    "outputs",
    "params",
    "resources",
    "retries",
    "timeout",
    "uses",
    "version",
];

/// A pipeline file whose shape is right.
#[derive(Debug, Clone)]
pub struct PipelineFile {
    pub root: Node,
    pub desc: Option<Node>,
    pub workdir: Option<Node>,
    /// The pipeline's `on_failure:` hook, for stages without their own.
    pub on_failure: Option<Node>,
    /// `storage:`, the S3 settings that are not secrets.
    pub storage: Option<Node>,
    /// `cache:`, the run cache's size and remote.
    pub cache: Option<Node>,
    /// `partitions:`, the sets partitioned stages expand over.
    pub partitions: Option<Node>,
    /// `engine:`, where built-in stages run unless they say.
    pub engine: Option<Node>,
    /// `engines:`, how to reach each engine.
    pub engines: Option<Node>,
    /// `executors:`, where stages may run other than here.
    pub executors: Option<Node>,
    /// In file order: later vars may use earlier ones.
    pub vars: Vec<(Key, Node)>,
    /// In file order.
    pub stages: Vec<StageSpec>,
    /// Stages with shape errors, as far as they could be read: only their outputs are resolved,
    /// so that `validate` can still check the graph of the others in the same round.
    pub flawed: Vec<StageSpec>,
    /// A stage could not be read even that far (not a map): its outputs are unknown.
    pub unreadable: bool,
    /// The `stages:` key, for errors about the pipeline as a whole.
    pub stages_key: Option<Key>,
}

/// What runs a stage.
#[derive(Debug, Clone)]
pub enum Action {
    /// `uses: <built-in>`.
    Uses(Node),
    /// `cmd:` a string, or a list of strings run one after another, each with `sh -c`.
    Cmd(Node),
    /// `argv:` a program and its arguments, run without a shell.
    Argv(Node),
}

/// One entry under `stages:`, before templates are rendered or matrices expanded.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: Key,
    pub node: Node,
    pub desc: Option<Node>,
    pub action: Action,
    pub inputs: Option<Node>,
    pub outputs: Option<Node>,
    pub params: Option<Node>,
    pub matrix: Option<Node>,
    pub foreach: Option<Node>,
    /// `checks:`, a list (or a template giving one).
    pub checks: Option<Node>,
    /// `metrics:`, a map of names to values to track.
    pub metrics: Option<Node>,
    pub on_failure: Option<Node>,
    /// `version: auto`: the stage's one output is versioned.
    pub version: Option<(Key, Node)>,
    /// `keep: N`: versions kept in place.
    pub keep: Option<(Key, Node)>,
    /// `env:` variables for the command: a map of names to values, or a list of names passed
    /// through from imba's environment.
    pub env: Option<Node>,
    /// `engine:` where a built-in stage runs: `local` (polars, the default) or `spark`.
    pub engine: Option<(Key, Node)>,
    /// `resources: {cpus, memory}`, what the stage asks of where it runs.
    pub resources: Option<Node>,
    /// `retries:`, attempts in all and the wait between them (or a number of re-tries).
    pub retries: Option<Node>,
    /// `timeout:`, the longest an attempt may run.
    pub timeout: Option<Node>,
    /// `executor:`, the executor the stage runs on (a name in `executors:`, or `local`).
    pub executor: Option<Node>,
}

/// Checks the shape of a parsed pipeline file, collecting every problem. The file that comes back
/// holds the stages that are well formed, so that later checks can still report on them.
pub fn check(root: Node, diagnostics: &mut Vec<Diagnostic>) -> Option<PipelineFile> {
    let errors_before = diagnostics.len();
    let entries = match &root.value {
        Value::Map(entries) => entries.clone(),
        Value::Null => {
            diagnostics.push(
                Diagnostic::error("the pipeline is empty")
                    .at(root.span, "no stages here")
                    .help("add a `stages:` map; see docs/pipeline-format.md"),
            );
            return None;
        }
        _ => {
            diagnostics.push(
                Diagnostic::error(format!(
                    "a pipeline file must be a map with `stages:`, found {}",
                    root.kind()
                ))
                .at(root.span, "expected a map"),
            );
            return None;
        }
    };

    let mut file = PipelineFile {
        root: root.clone(),
        desc: None,
        workdir: None,
        on_failure: None,
        storage: None,
        cache: None,
        partitions: None,
        engine: None,
        engines: None,
        executors: None,
        vars: Vec::new(),
        stages: Vec::new(),
        flawed: Vec::new(),
        unreadable: false,
        stages_key: None,
    };
    for (key, value) in entries {
        match key.name.as_str() {
            "desc" => file.desc = expect_string(&key, value, diagnostics),
            "workdir" => file.workdir = expect_string(&key, value, diagnostics),
            "on_failure" => file.on_failure = expect_string(&key, value, diagnostics),
            "cache" => match value.value {
                Value::Map(_) => file.cache = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(&key, &value, "a map of run-cache settings")),
            },
            "storage" => match value.value {
                Value::Map(_) => file.storage = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(&key, &value, "a map of S3 settings")),
            },
            "engine" => file.engine = expect_string(&key, value, diagnostics),
            "engines" => match value.value {
                Value::Map(_) => file.engines = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(&key, &value, "a map of engines (`spark:`)")),
            },
            "executors" => match value.value {
                Value::Map(_) => file.executors = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(
                    &key,
                    &value,
                    "a map of executor names to their settings (`hpc: {slurm: {partition: batch}}`)",
                )),
            },
            "partitions" => match value.value {
                Value::Map(_) => file.partitions = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(&key, &value, "a map of partition sets")),
            },
            "vars" => match value.value {
                Value::Map(vars) => file.vars = vars,
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(&key, &value, "a map of names to values")),
            },
            "stages" => {
                match &value.value {
                    Value::Map(stages) => {
                        for (name, stage) in stages {
                            match check_stage(name, stage, diagnostics) {
                                Checked::Sound(spec) => file.stages.push(*spec),
                                Checked::Flawed(spec) => file.flawed.push(*spec),
                                Checked::Unreadable => file.unreadable = true,
                            }
                        }
                    }
                    Value::Null => {}
                    _ => {
                        diagnostics.push(wrong_kind(&key, &value, "a map of stage names to stages"))
                    }
                }
                file.stages_key = Some(key);
            }
            _ => diagnostics.push(unknown_key(&key, PIPELINE_KEYS, "at the top of a pipeline")),
        }
    }

    let no_stages = match &file.stages_key {
        None => true,
        Some(_) => root
            .get("stages")
            .and_then(Node::as_map)
            .is_none_or(|s| s.is_empty()),
    };
    if no_stages && diagnostics.len() == errors_before {
        let diagnostic = Diagnostic::error("the pipeline has no stages");
        let diagnostic = match &file.stages_key {
            Some(key) => diagnostic.at(key.span, "this map is empty"),
            None => diagnostic.at(
                Span {
                    end: root.span.start,
                    ..root.span
                },
                "no `stages:` in this file",
            ),
        };
        diagnostics
            .push(diagnostic.help("add a stage under `stages:`, e.g. `hello: {cmd: echo hi}`"));
    }
    Some(file)
}

/// What checking a stage's shape found.
enum Checked {
    Sound(Box<StageSpec>),
    /// Read with errors: good enough to find its outputs, no more.
    Flawed(Box<StageSpec>),
    /// Not a map.
    Unreadable,
}

fn check_stage(name: &Key, node: &Node, diagnostics: &mut Vec<Diagnostic>) -> Checked {
    let errors_before = diagnostics.len();
    check_stage_name(name, diagnostics);
    let Some(entries) = node.as_map() else {
        diagnostics.push(
            Diagnostic::error(format!(
                "stage `{}` must be a map with `uses:` or `cmd:`, found {}",
                name.name,
                node.kind()
            ))
            .at(node.span, "expected a map")
            .also(name.span, "stage defined here"),
        );
        return Checked::Unreadable;
    };
    let mut uses = None;
    let mut cmd = None;
    let mut spec = StageSpec {
        name: name.clone(),
        node: node.clone(),
        desc: None,
        action: Action::Cmd(node.clone()),
        inputs: None,
        outputs: None,
        params: None,
        matrix: None,
        foreach: None,
        checks: None,
        metrics: None,
        on_failure: None,
        version: None,
        keep: None,
        env: None,
        engine: None,
        resources: None,
        retries: None,
        timeout: None,
        executor: None,
    };
    let mut argv = None;
    for (key, value) in entries {
        let value = value.clone();
        match key.name.as_str() {
            "desc" => spec.desc = expect_string(key, value, diagnostics),
            "uses" => uses = expect_string(key, value, diagnostics).map(|v| (key.clone(), v)),
            "cmd" => {
                let ok = match &value.value {
                    Value::String(_) => true,
                    Value::Seq(items) => {
                        let mut ok = !items.is_empty();
                        if items.is_empty() {
                            diagnostics.push(
                                Diagnostic::error("`cmd` is an empty list")
                                    .at(value.span, "no command here"),
                            );
                        }
                        for item in items {
                            if item.as_str().is_none() {
                                diagnostics.push(wrong_kind(
                                    key,
                                    item,
                                    "a string (a shell command)",
                                ));
                                ok = false;
                            }
                        }
                        ok
                    }
                    _ => {
                        diagnostics.push(wrong_kind(
                            key,
                            &value,
                            "a shell command, or a list of them",
                        ));
                        false
                    }
                };
                if ok {
                    cmd = Some((key.clone(), value));
                }
            }
            "argv" => match &value.value {
                Value::Seq(items) if !items.is_empty() => {
                    let mut ok = true;
                    for item in items {
                        if item.as_str().is_none() {
                            diagnostics.push(wrong_kind(
                                key,
                                item,
                                "a string (the program or one argument)",
                            ));
                            ok = false;
                        }
                    }
                    if ok {
                        argv = Some((key.clone(), value));
                    }
                }
                _ => diagnostics.push(wrong_kind(
                    key,
                    &value,
                    "a non-empty list: the program, then its arguments",
                )),
            },
            "env" => spec.env = check_env(key, value, diagnostics),
            "engine" => spec.engine = Some((key.clone(), value)),
            "executor" => spec.executor = expect_string(key, value, diagnostics),
            "resources" => match &value.value {
                Value::Map(_) | Value::String(_) => spec.resources = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(key, &value, "a map: `{cpus: 2, memory: 4G}`")),
            },
            "retries" => match &value.value {
                Value::Map(_) | Value::Int(_) | Value::String(_) => spec.retries = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(
                    key,
                    &value,
                    "a map `{attempts: 3, backoff: 10s}`, or a number of re-tries",
                )),
            },
            "timeout" => match &value.value {
                Value::String(_) => spec.timeout = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(key, &value, "a duration: `30m`, `90s`, `2h`")),
            },
            "inputs" => spec.inputs = check_paths(key, value, diagnostics),
            "checks" => match &value.value {
                Value::Seq(_) | Value::String(_) => spec.checks = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(key, &value, "a list of checks")),
            },
            "metrics" => match &value.value {
                Value::Map(_) => spec.metrics = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(key, &value, "a map of metric names to values")),
            },
            "on_failure" => spec.on_failure = expect_string(key, value, diagnostics),
            "version" => spec.version = Some((key.clone(), value)),
            "keep" => spec.keep = Some((key.clone(), value)),
            "outputs" => spec.outputs = check_paths(key, value, diagnostics),
            "params" => match &value.value {
                Value::Map(_) => spec.params = Some(value),
                Value::Null => {}
                _ => diagnostics.push(wrong_kind(key, &value, "a map of params")),
            },
            "matrix" => match &value.value {
                Value::Map(axes) if !axes.is_empty() => {
                    for (axis, values) in axes {
                        if !matches!(values.value, Value::Seq(_) | Value::String(_)) {
                            diagnostics.push(wrong_kind(
                                axis,
                                values,
                                "a list of values (or a `{{ var }}` holding one)",
                            ));
                        }
                    }
                    spec.matrix = Some(value);
                }
                _ => diagnostics.push(wrong_kind(key, &value, "a map of names to lists of values")),
            },
            "foreach" => match &value.value {
                Value::Seq(_) | Value::Map(_) | Value::String(_) => spec.foreach = Some(value),
                _ => diagnostics.push(wrong_kind(
                    key,
                    &value,
                    "a list or map to expand over (or a `{{ var }}` holding one)",
                )),
            },
            _ => diagnostics.push(unknown_key(key, STAGE_KEYS, "in a stage")),
        }
    }
    if let (Some((matrix_key, _)), Some((foreach_key, _))) =
        (node.entry("matrix"), node.entry("foreach"))
    {
        diagnostics.push(
            Diagnostic::error(format!(
                "stage `{}` has both `matrix` and `foreach`",
                name.name
            ))
            .at(foreach_key.span, "`foreach` here")
            .also(matrix_key.span, "`matrix` here")
            .help("use `matrix` with one axis instead of `foreach`"),
        );
    }
    let actions: Vec<(Span, String)> = [&uses, &cmd, &argv]
        .into_iter()
        .flatten()
        .map(|(key, _)| (key.span, key.name.clone()))
        .collect();
    match (uses, cmd, argv) {
        (Some((_, uses)), None, None) => spec.action = Action::Uses(uses),
        (None, Some((_, cmd)), None) => spec.action = Action::Cmd(cmd),
        (None, None, Some((_, argv))) => spec.action = Action::Argv(argv),
        (None, None, None) => {
            // Only complain when the keys are truly absent, not when they were malformed.
            if ["uses", "cmd", "argv"]
                .iter()
                .all(|k| node.get(k).is_none())
            {
                diagnostics.push(
                    Diagnostic::error(format!(
                        "stage `{}` has neither `uses` nor `cmd`",
                        name.name
                    ))
                    .at(name.span, "this stage does nothing")
                    .help("add `uses: <built-in stage>`, `cmd: <shell command>` or `argv: [program, args…]`"),
                )
            }
        }
        _ => {
            let (second, second_name) = &actions[1];
            let (first, first_name) = &actions[0];
            diagnostics.push(
                Diagnostic::error(format!(
                    "stage `{}` has both `{first_name}` and `{second_name}`",
                    name.name
                ))
                .at(*second, format!("`{second_name}` here"))
                .also(*first, format!("`{first_name}` here"))
                .help(
                    "a stage runs one of a built-in (`uses`), a shell command (`cmd`) or a program without a shell (`argv`)",
                ),
            )
        }
    }
    if spec.env.is_some() && matches!(spec.action, Action::Uses(_)) {
        if let Some((env_key, _)) = node.entry("env") {
            diagnostics.push(
                Diagnostic::error(format!(
                    "stage `{}`: `env` is for `cmd` and `argv` stages",
                    name.name
                ))
                .at(
                    env_key.span,
                    "a built-in stage runs inside imba and reads no variables",
                ),
            );
        }
    }
    if diagnostics.len() == errors_before {
        Checked::Sound(Box::new(spec))
    } else {
        Checked::Flawed(Box::new(spec))
    }
}

fn check_stage_name(name: &Key, diagnostics: &mut Vec<Diagnostic>) {
    let valid = !name.name.is_empty()
        && name
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid {
        diagnostics.push(
            Diagnostic::error(format!("invalid stage name `{}`", name.name))
                .at(name.span, "not a valid stage name")
                .help("stage names use letters, digits, `_`, `-` and `.`"),
        );
    }
}

/// `inputs:`/`outputs:` are a map of name to path, or a list of paths.
fn check_paths(key: &Key, value: Node, diagnostics: &mut Vec<Diagnostic>) -> Option<Node> {
    let what = format!("a path (under `{}`)", key.name);
    let mut ok = true;
    match &value.value {
        Value::Map(entries) => {
            for (name, path) in entries {
                if path.as_str().is_none() {
                    diagnostics.push(wrong_kind(name, path, &what));
                    ok = false;
                }
            }
        }
        Value::Seq(items) => {
            for item in items {
                if item.as_str().is_none() {
                    diagnostics.push(wrong_kind(key, item, &what));
                    ok = false;
                }
            }
        }
        Value::Null => return None,
        _ => {
            diagnostics.push(wrong_kind(
                key,
                &value,
                "a map of names to paths, or a list of paths",
            ));
            ok = false;
        }
    }
    ok.then_some(value)
}

/// `env:`: a map of variable names to values (a `null` value passes the variable through from
/// imba's environment), or a list of names to pass through.
fn check_env(key: &Key, value: Node, diagnostics: &mut Vec<Diagnostic>) -> Option<Node> {
    let before = diagnostics.len();
    let name_ok = |name: &str, span: Span, diagnostics: &mut Vec<Diagnostic>| {
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            diagnostics.push(
                Diagnostic::error(format!("`{name}` is not a variable name"))
                    .at(span, "letters, digits and `_`, not starting with a digit"),
            );
        } else if name.starts_with("IMBA_") {
            diagnostics.push(
                Diagnostic::error(format!("`{name}` is set by imba itself"))
                    .at(span, "variables starting with `IMBA_` are imba's"),
            );
        }
    };
    match &value.value {
        Value::Map(entries) => {
            for (name, v) in entries {
                name_ok(&name.name, name.span, diagnostics);
                if !matches!(
                    v.value,
                    Value::String(_)
                        | Value::Int(_)
                        | Value::Float(_)
                        | Value::Bool(_)
                        | Value::Null
                ) {
                    diagnostics.push(wrong_kind(
                        name,
                        v,
                        "a value, or `null` to pass the variable through",
                    ));
                }
            }
        }
        Value::Seq(items) => {
            for item in items {
                match item.as_str() {
                    Some(name) => name_ok(name, item.span, diagnostics),
                    None => diagnostics.push(wrong_kind(key, item, "a variable name")),
                }
            }
        }
        Value::Null => return None,
        _ => diagnostics.push(wrong_kind(
            key,
            &value,
            "a map of variable names to values, or a list of names to pass through",
        )),
    }
    (diagnostics.len() == before).then_some(value)
}

fn expect_string(key: &Key, value: Node, diagnostics: &mut Vec<Diagnostic>) -> Option<Node> {
    if value.as_str().is_some() {
        Some(value)
    } else {
        diagnostics.push(wrong_kind(key, &value, "a string"));
        None
    }
}

/// "`key` must be X, found Y", pointing at the value.
pub fn wrong_kind(key: &Key, value: &Node, expected: &str) -> Diagnostic {
    Diagnostic::error(format!(
        "`{}` must be {expected}, found {}",
        key.name,
        value.kind()
    ))
    .at(value.span, format!("expected {expected}"))
}

/// "unknown key", with the closest known key as a suggestion.
pub fn unknown_key(key: &Key, known: &[&str], place: &str) -> Diagnostic {
    let diagnostic = Diagnostic::error(format!("unknown key `{}` {place}", key.name));
    match did_you_mean(&key.name, known.iter().copied()) {
        Some(suggestion) => diagnostic.at(key.span, format!("did you mean `{suggestion}`?")),
        None => diagnostic
            .at(key.span, "unknown key")
            .help(format!("expected one of {}", list(known))),
    }
}

/// A value that must be one of a few words: "`engine` must be `local` or `spark`, found
/// `sprak`", with "did you mean" when one is close.
pub fn not_one_of(name: &str, node: &Node, choices: &[&str]) -> Diagnostic {
    let given = node.as_str();
    let found = match given {
        Some(text) => format!("`{}`", imba_stages::safe::escape(text)),
        None => format!("a {}", node.kind()),
    };
    let label = match given.and_then(|t| did_you_mean(t, choices.iter().copied())) {
        Some(s) => format!("did you mean `{s}`?"),
        None => format!("expected {}", list(choices)),
    };
    Diagnostic::error(format!("`{name}` must be {}, found {found}", list(choices)))
        .at(node.span, label)
}

/// "`a`, `b` or `c`".
pub fn list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}
