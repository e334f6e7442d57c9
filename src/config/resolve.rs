//! From [`PipelineFile`] to [`Pipeline`]: vars, templates, matrix expansion, paths and typed params.
//!
//! Everything a user can get wrong past the shape of the file is found here, and every problem is
//! collected before failing. What comes out is what the engine trusts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use imba_stages::Registry;
use serde_json::{Map, Value as Json};

use crate::diagnostic::{did_you_mean, Diagnostic, Span};
use crate::model::location::Declared;

use super::params::ParamsChecker;
use super::raw::{Action, PipelineFile, StageSpec};
use super::template::{Context, Templates};
use super::yaml::{Key, Node, Value};
use crate::model::{file_name, ports_json, Hook, Pipeline, Port, Stage, StageKind};

/// Resolves a shape-checked file. `file` is the path given by the user. With errors, the
/// pipeline holds the stages that resolved, and [`LeftOut`] says what the others write.
pub fn resolve(
    file: &Path,
    raw: &PipelineFile,
    registry: &Registry,
    discovered: &BTreeMap<String, Vec<String>>,
    engine: Option<crate::model::Engine>,
    executor: Option<&str>,
    diagnostics: &mut Vec<Diagnostic>,
) -> (Pipeline, LeftOut) {
    let before = diagnostics.len();
    let templates = Templates::for_file(file);
    let file_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let file_dir = if file_dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        file_dir
    };
    let base = std::path::absolute(&file_dir).unwrap_or(file_dir);
    // Vars, in order: each may use the ones before it.
    let mut vars = Map::new();
    // Vars whose templates failed: later errors about them are left out.
    let mut failed = Vec::new();
    for (key, node) in &raw.vars {
        let ctx = Context::new(&vars).with_failed(&failed);
        match templates.render_node(node, &ctx, diagnostics) {
            Some(rendered) => {
                vars.insert(key.name.clone(), rendered.to_json());
            }
            None => failed.push(key.name.clone()),
        }
    }
    // Which vars each var's template reads, to explain a change by the var it came from.
    let var_deps: BTreeMap<String, Vec<String>> = raw
        .vars
        .iter()
        .map(|(key, node)| {
            let mut read = BTreeSet::new();
            names_read(&templates, node, &mut read);
            let deps = read
                .into_iter()
                .filter(|n| vars.contains_key(n) && *n != key.name)
                .collect();
            (key.name.clone(), deps)
        })
        .collect();
    let ctx = Context::new(&vars).with_failed(&failed);
    let render = |node: &Option<Node>, diagnostics: &mut Vec<Diagnostic>| {
        node.as_ref()
            .and_then(|n| templates.render_node(n, &ctx, diagnostics))
            .and_then(|n| n.as_str().map(str::to_owned))
    };
    let workdir = match render(&raw.workdir, diagnostics) {
        Some(dir) => crate::model::location::normalize(&base.join(dir)),
        None => crate::model::location::normalize(&base),
    };
    let desc = render(&raw.desc, diagnostics);
    let on_failure = raw
        .on_failure
        .as_ref()
        .and_then(|node| render_hook(&templates, node, &ctx, diagnostics));
    let storage = raw
        .storage
        .as_ref()
        .and_then(|node| templates.render_node(node, &ctx, diagnostics))
        .map(|node| storage_settings(&node, diagnostics))
        .unwrap_or_default();
    let cache = raw
        .cache
        .as_ref()
        .and_then(|node| templates.render_node(node, &ctx, diagnostics))
        .map(|node| cache_settings(&node, &workdir, diagnostics))
        .unwrap_or_default();
    let engines = raw
        .engines
        .as_ref()
        .and_then(|node| templates.render_node(node, &ctx, diagnostics))
        .map(|node| engine_settings(&node, diagnostics))
        .unwrap_or_default();
    let executors = raw
        .executors
        .as_ref()
        .and_then(|node| templates.render_node(node, &ctx, diagnostics))
        .map(|node| super::executors::settings(&node, diagnostics))
        .unwrap_or_default();
    if let Some(name) = executor {
        super::executors::check_flag(name, &executors, diagnostics);
    }
    // `--engine`, else the pipeline's `engine:`.
    let engine = engine.or_else(|| {
        let node = raw.engine.as_ref()?;
        let rendered = templates.render_node(node, &ctx, diagnostics)?;
        match rendered.as_str() {
            Some("local") => Some(crate::model::Engine::Local),
            Some("spark") => Some(crate::model::Engine::Spark),
            _ => {
                diagnostics.push(super::raw::not_one_of(
                    "engine",
                    &rendered,
                    &["local", "spark"],
                ));
                None
            }
        }
    });

    let mut failed_sets = Vec::new();
    let partitions = raw
        .partitions
        .as_ref()
        .map(|node| {
            let found = super::partitions::Found {
                workdir: &workdir,
                paths: discovered,
            };
            super::partitions::resolve(
                node,
                &templates,
                &ctx,
                &vars,
                &found,
                &mut failed_sets,
                diagnostics,
            )
        })
        .unwrap_or_default();
    // Templates that use a var or a partition set that failed say nothing more about it.
    let failed: Vec<String> = failed.iter().cloned().chain(failed_sets).collect();
    // Every stage sees the sets' keys: `{{ partitions.month.all }}`.
    let mut stage_vars = vars.clone();
    if !partitions.is_empty() {
        let sets: Map<String, Json> = partitions
            .iter()
            .map(|set| (set.name.clone(), serde_json::json!({ "all": set.keys })))
            .collect();
        stage_vars.insert("partitions".into(), Json::Object(sets));
    }

    let mut resolver = StageResolver {
        templates: &templates,
        registry,
        checker: ParamsChecker::default(),
        workdir: &workdir,
        vars: &stage_vars,
        var_deps: &var_deps,
        partitions: &partitions,
        failed: &failed,
        engine,
        executor: executor.filter(|name| executors.contains_key(*name)),
        executors: &executors,
        diagnostics,
        left_out: LeftOut {
            unknown: raw.unreadable,
            ..LeftOut::default()
        },
    };
    let mut stages = Vec::new();
    for spec in &raw.stages {
        resolver.stage(spec, &mut stages);
    }
    for spec in &raw.flawed {
        resolver.flawed(spec);
    }
    let mut left_out = resolver.left_out;
    check_unique_names(&stages, diagnostics);

    let mut tail = diagnostics.split_off(before);
    dedup_vec(&mut tail);
    left_out.complete = tail.is_empty() && raw.flawed.is_empty() && !raw.unreadable;
    diagnostics.extend(tail);
    let pipeline = Pipeline {
        file: file.to_path_buf(),
        workdir,
        desc,
        vars,
        stages,
        on_failure,
        storage,
        cache,
        overrides: Vec::new(),
        partitions,
        engines,
        executors,
    };
    (pipeline, left_out)
}

/// Keys of `engines:` and of `engines.spark`.
pub const ENGINES_KEYS: &[&str] = &["spark"];
pub const SPARK_KEYS: &[&str] = &["remote", "token_env"];

/// The `engines:` section: how to reach Spark. A token is never written here: `token_env`
/// names the variable that holds it.
fn engine_settings(node: &Node, diagnostics: &mut Vec<Diagnostic>) -> crate::model::EngineSettings {
    let mut settings = crate::model::EngineSettings::default();
    for (key, value) in node.as_map().unwrap_or_default() {
        if key.name != "spark" {
            diagnostics.push(super::raw::unknown_key(key, ENGINES_KEYS, "in `engines`"));
            continue;
        }
        let Some(entries) = value.as_map() else {
            if !matches!(value.value, Value::Null) {
                diagnostics.push(super::raw::wrong_kind(
                    key,
                    value,
                    "a map: `remote`, `token_env`",
                ));
            }
            continue;
        };
        for (key, value) in entries {
            match (key.name.as_str(), value.as_str()) {
                ("remote", Some(remote)) => {
                    let remote = remote.trim();
                    let params = remote.split_once(";").map(|(_, p)| p).unwrap_or_default();
                    if !remote.starts_with("sc://") {
                        diagnostics.push(
                            Diagnostic::error("`engines.spark.remote` is not a Spark Connect address")
                                .at(value.span, "not `sc://…`")
                                .help("`sc://host:15002`, with parameters after `/;` (`sc://host:443/;use_ssl=true`)"),
                        );
                    } else if params
                        .split(';')
                        .any(|p| p.trim().to_ascii_lowercase().starts_with("token="))
                    {
                        diagnostics.push(
                            Diagnostic::error("a token is never written in a pipeline file")
                                .at(value.span, "holds a token")
                                .help("put the token in an environment variable and name it: `token_env: SPARK_TOKEN`"),
                        );
                    } else {
                        settings.spark.remote = Some(remote.to_owned());
                    }
                }
                ("token_env", Some(name))
                    if !name.is_empty()
                        && !name.starts_with(|c: char| c.is_ascii_digit())
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                {
                    settings.spark.token_env = Some(name.to_owned());
                }
                ("token_env", _) => diagnostics.push(
                    Diagnostic::error(
                        "`engines.spark.token_env` is not the name of an environment variable",
                    )
                    .at(value.span, "here")
                    .help("the variable's name, e.g. `SPARK_TOKEN`, never the token itself"),
                ),
                ("remote", None) => {
                    diagnostics.push(super::raw::wrong_kind(key, value, "an `sc://` address"))
                }
                _ => diagnostics.push(super::raw::unknown_key(
                    key,
                    SPARK_KEYS,
                    "in `engines.spark`",
                )),
            }
        }
    }
    settings
}

/// Keys of `cache:`.
pub const CACHE_KEYS: &[&str] = &["max_size", "push", "remote"];

/// The `cache:` section: how big the local run cache may grow, and the remote a team shares.
fn cache_settings(
    node: &Node,
    workdir: &std::path::Path,
    diagnostics: &mut Vec<Diagnostic>,
) -> crate::model::CacheSettings {
    let mut settings = crate::model::CacheSettings::default();
    for (key, value) in node.as_map().unwrap_or_default() {
        match key.name.as_str() {
            "max_size" => {
                let text = match &value.value {
                    Value::Int(n) if *n >= 0 => Some(n.to_string()),
                    _ => value.as_str().map(str::to_owned),
                };
                match text.map(|t| t.trim().parse::<bytesize::ByteSize>()) {
                    Some(Ok(size)) => settings.max_size = Some(size.as_u64()),
                    Some(Err(_)) | None => diagnostics.push(
                        Diagnostic::error("`cache.max_size` is not a size")
                            .at(value.span, "not a size")
                            .help("bytes, or a number and a unit: `500MB`, `10GB`, `2GiB`"),
                    ),
                }
            }
            "remote" => match value.as_str() {
                Some(text) if !text.trim().is_empty() => {
                    match crate::model::Declared::parse(text, workdir) {
                        Ok(declared) => settings.remote = Some(declared.location),
                        Err(e) => diagnostics.push(
                            Diagnostic::error(format!("`cache.remote` is not a location: {e}"))
                                .at(value.span, "here")
                                .help("an S3 prefix such as `s3://team-bucket/imba-cache`, or a shared folder"),
                        ),
                    }
                }
                _ => diagnostics.push(super::raw::wrong_kind(key, value, "an s3:// URL or a path")),
            },
            "push" => match value.as_str() {
                Some("auto") => settings.push = crate::model::Push::Auto,
                Some("manual") => settings.push = crate::model::Push::Manual,
                _ => diagnostics.push(
                    Diagnostic::error("`cache.push` must be `auto` or `manual`")
                        .at(value.span, "here")
                        .help("`auto`: every run pushes what it computed; `manual` (the default): only `imba push` does"),
                ),
            },
            _ => diagnostics.push(super::raw::unknown_key(key, CACHE_KEYS, "in `cache`")),
        }
    }
    settings
}

/// `version: auto` and `keep: N`, on a stage with one directory output (local or S3).
/// Which outputs a command writes at their declared paths: those its templates never name
/// (`{{ outputs }}` as a whole names them all, `{{ outputs.NAME }}` one).
fn in_place(templates: &Templates, commands: &[(String, Span)], outputs: &[Port]) -> Vec<bool> {
    let names: std::collections::BTreeSet<String> = commands
        .iter()
        .flat_map(|(text, _)| templates.names(text))
        .collect();
    let all = names.contains("outputs");
    outputs
        .iter()
        .map(|port| {
            let named = port
                .name
                .as_ref()
                .is_some_and(|n| names.contains(&format!("outputs.{n}")));
            !(all || named)
        })
        .collect()
}

/// An output written in place must be a local, unversioned one: imba moves the previous one
/// aside before the command runs and back if it fails, which S3 and versions cannot do.
fn in_place_fits(
    spec: &StageSpec,
    outputs: &[Port],
    in_place: &[bool],
    versioned: bool,
    diagnostics: &mut Vec<Diagnostic>,
) {
    for (i, (port, _)) in outputs
        .iter()
        .zip(in_place)
        .enumerate()
        .filter(|(_, (_, &in_place))| in_place)
    {
        let shown = port.placeholder(i);
        let why = if port.declared.location.is_remote() {
            "an S3 output"
        } else if versioned {
            "a versioned output"
        } else {
            continue;
        };
        diagnostics.push(
            Diagnostic::error(format!(
                "stage `{}`: the command never names the output `{}`, and {why} cannot be written in place",
                spec.name.name, port.text
            ))
            .at(port.span, "declared here")
            .help(format!(
                "write it to `{shown}`: a staging path that imba commits ({})",
                if versioned { "as a new version" } else { "uploads" }
            )),
        );
    }
}

fn versioning(
    spec: &StageSpec,
    outputs: Option<&[Port]>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<crate::model::Versioning> {
    let Some((key, value)) = &spec.version else {
        if let Some((keep, _)) = &spec.keep {
            diagnostics.push(
                Diagnostic::error("`keep` needs `version: auto`")
                    .at(keep.span, "versions are kept only when there are versions"),
            );
        }
        return None;
    };
    let before = diagnostics.len();
    if value.as_str() != Some("auto") {
        diagnostics.push(
            Diagnostic::error("`version` must be `auto`")
                .at(value.span, "expected `auto`")
                .help("`version: auto` makes a new version of the output whenever its content changes"),
        );
    }
    let keep = match &spec.keep {
        None => None,
        Some((_, node)) => match node.value {
            Value::Int(n) if n >= 1 => Some(n as u32),
            _ => {
                diagnostics.push(
                    Diagnostic::error("`keep` must be a whole number ≥ 1")
                        .at(node.span, "how many versions stay in place"),
                );
                None
            }
        },
    };
    if let Some(outputs) = outputs {
        let fits = matches!(outputs, [one] if one.declared.dir);
        if let [one] = outputs {
            // Old versions move to `archive/` beside the output: it cannot be that folder.
            if one.text.trim_end_matches('/').rsplit('/').next() == Some("archive") {
                diagnostics.push(
                    Diagnostic::error(format!(
                        "stage `{}` is versioned, and its output is called `archive`, the folder its old versions move to",
                        spec.name.name
                    ))
                    .at(one.span, "versions of this output would be archived into it")
                    .help("give the output another name, e.g. `features/`"),
                );
            }
        }
        if !fits {
            diagnostics.push(
                Diagnostic::error(format!(
                    "stage `{}` is versioned, so it needs exactly one output, a directory (ending in `/`) that holds the versions",
                    spec.name.name
                ))
                .at(key.span, "versioned here")
                .help("e.g. `outputs: {features: \"{{ out }}/features/\"}`: versions go to features/features_v1/, features_v2/, …"),
            );
        }
    }
    (diagnostics.len() == before).then_some(crate::model::Versioning { keep })
}

/// Keys of `storage:`.
pub const STORAGE_KEYS: &[&str] = &[
    "connect_timeout",
    "endpoint",
    "path_style",
    "region",
    "retries",
    "timeout",
];

/// The `storage:` section: S3 settings, never secrets.
fn storage_settings(
    node: &Node,
    diagnostics: &mut Vec<Diagnostic>,
) -> crate::model::StorageSettings {
    let mut settings = crate::model::StorageSettings::default();
    for (key, value) in node.as_map().unwrap_or_default() {
        let lower = key.name.to_ascii_lowercase();
        if ["key", "secret", "token", "password", "credential"]
            .iter()
            .any(|s| lower.contains(s))
        {
            diagnostics.push(
                Diagnostic::error(format!(
                    "`storage.{}` looks like a secret, and secrets never go in a pipeline file",
                    key.name
                ))
                .at(key.span, "remove this")
                .masking(value.span)
                .help("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the environment, or use a profile of ~/.aws/credentials (AWS_PROFILE)"),
            );
            continue;
        }
        match key.name.as_str() {
            "endpoint" | "region" => match value.as_str() {
                Some(text) if !text.trim().is_empty() => {
                    if key.name == "endpoint" {
                        if !(text.starts_with("http://") || text.starts_with("https://")) {
                            diagnostics.push(
                                Diagnostic::error(
                                    "`storage.endpoint` must be an http:// or https:// URL",
                                )
                                .at(value.span, "not a URL"),
                            );
                        }
                        settings.endpoint = Some(text.trim_end_matches('/').to_owned());
                    } else {
                        settings.region = Some(text.to_owned());
                    }
                }
                _ => diagnostics.push(super::raw::wrong_kind(key, value, "a string")),
            },
            "path_style" => match value.value {
                Value::Bool(b) => settings.path_style = Some(b),
                _ => diagnostics.push(super::raw::wrong_kind(key, value, "`true` or `false`")),
            },
            "retries" => match value.value {
                Value::Int(n) if (0..=20).contains(&n) => settings.retries = Some(n as usize),
                Value::Int(n) => diagnostics.push(
                    Diagnostic::error(format!("`storage.retries` must be from 0 to 20, found {n}"))
                        .at(value.span, "out of range"),
                ),
                _ => diagnostics.push(super::raw::wrong_kind(key, value, "a number from 0 to 20")),
            },
            "timeout" | "connect_timeout" => {
                match value
                    .as_str()
                    .map(|text| humantime::parse_duration(text.trim()))
                {
                    Some(Ok(duration)) if !duration.is_zero() => {
                        if key.name == "timeout" {
                            settings.timeout = Some(duration);
                        } else {
                            settings.connect_timeout = Some(duration);
                        }
                    }
                    Some(Ok(_)) => diagnostics.push(
                        Diagnostic::error(format!("`storage.{}` must be longer than 0s", key.name))
                            .at(value.span, "zero"),
                    ),
                    Some(Err(e)) => diagnostics.push(
                        Diagnostic::error(format!("`storage.{}` is not a duration: {e}", key.name))
                            .at(value.span, "not a duration")
                            .help("a number and a unit: `500ms`, `30s`, `2m`"),
                    ),
                    None => diagnostics.push(super::raw::wrong_kind(
                        key,
                        value,
                        "a duration such as `30s`",
                    )),
                }
            }
            _ => diagnostics.push(super::raw::unknown_key(key, STORAGE_KEYS, "in `storage`")),
        }
    }
    settings
}

/// A matrix stage reports the same template error once per instance; keep one.
fn dedup_vec(diagnostics: &mut Vec<Diagnostic>) {
    let mut seen = Vec::new();
    diagnostics.retain(|d| {
        let key = (d.message.clone(), d.labels.first().map(|l| l.span));
        if seen.contains(&key) {
            false
        } else {
            seen.push(key);
            true
        }
    });
}

fn check_unique_names(stages: &[Stage], diagnostics: &mut Vec<Diagnostic>) {
    let mut by_name: std::collections::HashMap<&str, &Stage> = std::collections::HashMap::new();
    // Names whose files (staging, logs) would be one on a case-insensitive file system.
    let mut by_file: std::collections::HashMap<String, &Stage> = std::collections::HashMap::new();
    for stage in stages {
        if let Some(first) = by_name.insert(&stage.name, stage) {
            let diagnostic = if first.span == stage.span {
                Diagnostic::error(format!("this stage expands to `{}` twice", stage.name))
                    .at(stage.span, "two expansions get the same name")
                    .help("give each `foreach`/`matrix` value a distinct name")
            } else {
                Diagnostic::error(format!("two stages are named `{}`", stage.name))
                    .at(stage.span, "this expands to the same name")
                    .also(first.span, "as this")
            };
            diagnostics.push(diagnostic);
            continue;
        }
        let folded = file_name(&stage.name).to_lowercase();
        if let Some(first) = by_file.insert(folded, stage) {
            diagnostics.push(
                Diagnostic::error(format!(
                    "stages `{}` and `{}` differ only in case",
                    first.name, stage.name
                ))
                .at(stage.span, format!("`{}` is defined here", stage.name))
                .also(first.span, format!("`{}` here", first.name))
                .help("their logs and staging directories would be one on a case-insensitive file system (macOS, Windows): rename one"),
            );
        }
    }
}

struct StageResolver<'a> {
    templates: &'a Templates,
    registry: &'a Registry,
    checker: ParamsChecker,
    workdir: &'a Path,
    vars: &'a Map<String, Json>,
    var_deps: &'a BTreeMap<String, Vec<String>>,
    partitions: &'a [crate::model::PartitionSet],
    failed: &'a [String],
    /// `--engine`: for built-in stages that can run on it and name no engine themselves.
    engine: Option<crate::model::Engine>,
    /// `--executor`, when the pipeline declares it: for stages that name no executor.
    executor: Option<&'a str>,
    executors: &'a BTreeMap<String, crate::model::ExecutorSettings>,
    diagnostics: &'a mut Vec<Diagnostic>,
    left_out: LeftOut,
}

/// What a pipeline with errors lacks: where its left-out stages write, as far as known.
#[derive(Debug, Default)]
pub struct LeftOut {
    /// Whether every stage resolved, and nothing else failed.
    pub complete: bool,
    /// The outputs of stages left out for their errors.
    pub outputs: Vec<crate::model::Location>,
    /// Some left-out stage's outputs could not be worked out.
    pub unknown: bool,
}

/// The root names the templates anywhere in `node` read (`month` of `{{ month }}`, `outputs`
/// of `{{ outputs.model }}`).
fn names_read(templates: &Templates, node: &Node, out: &mut BTreeSet<String>) {
    match &node.value {
        Value::String(s) => {
            out.extend(templates.names(&s.text).into_iter().map(
                |name| match name.split_once('.') {
                    Some((root, _)) => root.to_owned(),
                    None => name,
                },
            ))
        }
        Value::Seq(items) => items.iter().for_each(|n| names_read(templates, n, out)),
        Value::Map(entries) => entries
            .iter()
            .for_each(|(_, n)| names_read(templates, n, out)),
        Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_) => {}
    }
}

impl StageResolver<'_> {
    /// Whether a var looks secret, or is built from one that does.
    fn secret(&self, name: &str) -> bool {
        let mut todo = vec![name.to_owned()];
        let mut seen = BTreeSet::new();
        while let Some(name) = todo.pop() {
            if super::looks_secret(&name) {
                return true;
            }
            if seen.insert(name.clone()) {
                todo.extend(self.var_deps.get(&name).cloned().unwrap_or_default());
            }
        }
        false
    }

    /// The vars a stage reads, directly or through other vars, with their values as the lock
    /// keeps them (`***` for a secret-looking one, one built from it, or one the command's
    /// environment reads), what each reads, and the stage keys each reaches.
    fn vars_read(&self, spec: &StageSpec) -> VarsRead {
        let mut read = VarsRead::default();
        // Only what is fingerprinted: a description or a hook changes nothing that runs.
        for (key, node) in spec.node.as_map().unwrap_or_default() {
            if matches!(key.name.as_str(), "desc" | "on_failure") {
                continue;
            }
            let mut direct = BTreeSet::new();
            names_read(self.templates, node, &mut direct);
            let mut todo: Vec<String> = direct
                .into_iter()
                .filter(|n| self.vars.contains_key(n))
                .collect();
            while let Some(name) = todo.pop() {
                let fields = read.fields.entry(name.clone()).or_default();
                if fields.insert(key.name.clone()) {
                    todo.extend(self.var_deps.get(&name).cloned().unwrap_or_default());
                }
            }
        }
        // What a command's environment reads may be a credential (a database URL).
        let mut in_env = BTreeSet::new();
        if let Some(env) = &spec.env {
            names_read(self.templates, env, &mut in_env);
        }
        for name in read.fields.keys() {
            let value = match self.secret(name) || in_env.contains(name) {
                true => Json::String("***".to_owned()),
                false => self.vars.get(name).cloned().unwrap_or(Json::Null),
            };
            read.values.insert(name.clone(), value);
            let deps = self.var_deps.get(name).cloned().unwrap_or_default();
            read.deps.insert(name.clone(), deps);
        }
        read
    }
}

/// What [`StageResolver::vars_read`] finds.
#[derive(Default)]
struct VarsRead {
    values: BTreeMap<String, Json>,
    deps: BTreeMap<String, Vec<String>>,
    fields: BTreeMap<String, BTreeSet<String>>,
}

/// One expansion of a stage: its name suffix and the `item`/`key` it sees.
#[derive(Clone)]
struct Instance {
    suffix: Option<String>,
    bindings: Map<String, Json>,
    /// The partition of a partitioned stage's instance.
    partition: Option<crate::model::Partition>,
}

impl StageResolver<'_> {
    fn stage(&mut self, spec: &StageSpec, out: &mut Vec<Stage>) {
        let instances = self.instances(spec);
        if instances.is_empty() {
            // A matrix or foreach that failed: where its instances write is unknown.
            self.left_out.unknown = true;
        }
        for instance in instances {
            match self.instance(spec, instance.clone()) {
                Some(stage) => out.push(stage),
                None => self.leave_out(spec, instance),
            }
        }
    }

    /// A stage with shape errors: only where it writes is worked out, silently (its errors
    /// were reported), so that the graph of the others can be checked.
    fn flawed(&mut self, spec: &StageSpec) {
        let before = self.diagnostics.len();
        let instances = self.instances(spec);
        self.diagnostics.truncate(before);
        // Without readable `outputs:` (missing, misspelt, malformed) it may write anything.
        if instances.is_empty() || spec.outputs.is_none() {
            self.left_out.unknown = true;
        }
        for instance in instances {
            self.leave_out(spec, instance);
        }
    }

    /// Records the outputs of a stage instance that is left out of the pipeline, without
    /// reporting anything again.
    fn leave_out(&mut self, spec: &StageSpec, instance: Instance) {
        let before = self.diagnostics.len();
        let mut context = self.vars.clone();
        context.extend(instance.bindings);
        let ctx = Context::new(&context).with_failed(self.failed);
        let ports = self.ports(spec.outputs.as_ref(), &ctx);
        self.diagnostics.truncate(before);
        match ports {
            Some(ports) => self
                .left_out
                .outputs
                .extend(ports.into_iter().map(|p| p.declared.location)),
            None => self.left_out.unknown = true,
        }
    }

    fn base_context(&self) -> Context {
        Context::new(self.vars).with_failed(self.failed)
    }

    /// The partition set a stage's templates read the key of, if any (one at most).
    fn partitioned_by(&mut self, spec: &StageSpec) -> Result<Option<usize>, ()> {
        if self.partitions.is_empty() {
            return Ok(None);
        }
        let mut read = BTreeSet::new();
        for (key, node) in spec.node.as_map().unwrap_or_default() {
            if !matches!(key.name.as_str(), "desc" | "on_failure") {
                names_read(self.templates, node, &mut read);
            }
        }
        let sets: Vec<usize> = (0..self.partitions.len())
            .filter(|&i| read.contains(&self.partitions[i].name))
            .collect();
        let problem = match (sets.as_slice(), &spec.matrix, &spec.foreach) {
            ([], _, _) => return Ok(None),
            ([one], None, None) => return Ok(Some(*one)),
            ([_], _, _) => {
                "it also has `matrix` or `foreach`; partition it, or expand it, not both".to_owned()
            }
            (many, _, _) => format!(
                "it reads the keys of {}; a stage is partitioned by one set",
                many.iter()
                    .map(|&i| format!("`{}`", self.partitions[i].name))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        };
        self.diagnostics.push(
            Diagnostic::error(format!(
                "stage `{}` cannot be partitioned: {problem}",
                spec.name.name
            ))
            .at(spec.name.span, "this stage"),
        );
        Err(())
    }

    fn instances(&mut self, spec: &StageSpec) -> Vec<Instance> {
        let single = || {
            vec![Instance {
                suffix: None,
                bindings: Map::new(),
                partition: None,
            }]
        };
        match self.partitioned_by(spec) {
            Err(()) => return Vec::new(),
            Ok(Some(i)) => {
                let set = &self.partitions[i];
                return set
                    .keys
                    .iter()
                    .enumerate()
                    .map(|(i, key)| Instance {
                        suffix: Some(key.clone()),
                        bindings: Map::from_iter([(set.name.clone(), Json::String(key.clone()))]),
                        partition: Some(crate::model::Partition {
                            set: set.name.clone(),
                            key: key.clone(),
                            previous: i.checked_sub(1).map(|p| set.keys[p].clone()),
                        }),
                    })
                    .collect();
            }
            Ok(None) => {}
        }
        let ctx = self.base_context();
        if let Some(matrix) = &spec.matrix {
            let mut axes: Vec<(String, Vec<Json>, Span)> = Vec::new();
            for (axis, values) in matrix.as_map().unwrap_or_default() {
                let Some(values) = self.list_of(axis, values, &ctx) else {
                    return Vec::new();
                };
                axes.push((axis.name.clone(), values, axis.span));
            }
            let mut combos: Vec<(Vec<String>, Map<String, Json>)> = vec![(Vec::new(), Map::new())];
            for (axis, values, _) in &axes {
                let mut next = Vec::with_capacity(combos.len() * values.len());
                for (suffix, item) in &combos {
                    for (index, value) in values.iter().enumerate() {
                        let mut suffix = suffix.clone();
                        suffix.push(suffix_of(value, index));
                        let mut item = item.clone();
                        item.insert(axis.clone(), value.clone());
                        next.push((suffix, item));
                    }
                }
                combos = next;
            }
            return combos
                .into_iter()
                .map(|(suffix, item)| {
                    let mut bindings = Map::new();
                    bindings.insert("item".into(), Json::Object(item));
                    Instance {
                        suffix: Some(suffix.join("-")),
                        bindings,
                        partition: None,
                    }
                })
                .collect();
        }
        if let Some(foreach) = &spec.foreach {
            let key = Key {
                name: "foreach".into(),
                span: foreach.span,
            };
            let rendered = match self.templates.render_node(foreach, &ctx, self.diagnostics) {
                Some(node) => node,
                None => return Vec::new(),
            };
            return match rendered.to_json() {
                Json::Array(items) if !items.is_empty() => items
                    .into_iter()
                    .enumerate()
                    .map(|(index, item)| {
                        let mut bindings = Map::new();
                        let suffix = suffix_of(&item, index);
                        bindings.insert("item".into(), item);
                        Instance {
                            suffix: Some(suffix),
                            bindings,
                            partition: None,
                        }
                    })
                    .collect(),
                Json::Object(map) if !map.is_empty() => map
                    .into_iter()
                    .map(|(k, item)| {
                        let mut bindings = Map::new();
                        bindings.insert("key".into(), Json::String(k.clone()));
                        bindings.insert("item".into(), item);
                        Instance {
                            suffix: Some(k),
                            bindings,
                            partition: None,
                        }
                    })
                    .collect(),
                other => {
                    let found = Node::from_json(&other, rendered.span);
                    let what = if matches!(other, Json::Array(_) | Json::Object(_)) {
                        "empty".to_owned()
                    } else {
                        found.kind().to_owned()
                    };
                    self.diagnostics.push(
                        Diagnostic::error(format!(
                            "`foreach` of stage `{}` must be a non-empty list or map, found {what}",
                            spec.name.name
                        ))
                        .at(key.span, "nothing to expand over"),
                    );
                    Vec::new()
                }
            };
        }
        single()
    }

    /// A matrix axis: a list, or a template that renders to one.
    fn list_of(&mut self, axis: &Key, values: &Node, ctx: &Context) -> Option<Vec<Json>> {
        let rendered = self.templates.render_node(values, ctx, self.diagnostics)?;
        match rendered.to_json() {
            Json::Array(items) if !items.is_empty() => Some(items),
            other => {
                let found = if other.as_array().is_some() {
                    "an empty list".to_owned()
                } else {
                    rendered.kind().to_owned()
                };
                self.diagnostics.push(
                    Diagnostic::error(format!(
                        "matrix axis `{}` must be a non-empty list, found {found}",
                        axis.name
                    ))
                    .at(values.span, "expected a list of values"),
                );
                None
            }
        }
    }

    fn instance(&mut self, spec: &StageSpec, instance: Instance) -> Option<Stage> {
        let before = self.diagnostics.len();
        let name = match &instance.suffix {
            Some(suffix) => format!("{}@{suffix}", spec.name.name),
            None => spec.name.name.clone(),
        };
        let mut context = self.vars.clone();
        context.extend(instance.bindings);
        let ctx = Context::new(&context).with_failed(self.failed);

        let desc = spec
            .desc
            .as_ref()
            .and_then(|d| self.templates.render_node(d, &ctx, self.diagnostics))
            .and_then(|d| d.as_str().map(str::to_owned));
        let inputs = self.ports(spec.inputs.as_ref(), &ctx);
        let outputs = self.ports(spec.outputs.as_ref(), &ctx);
        let params_node = spec
            .params
            .as_ref()
            .and_then(|p| self.templates.render_node(p, &ctx, self.diagnostics))
            .unwrap_or_else(|| Node::new(spec.name.span, Value::Map(Vec::new())));

        let mut param_spans = std::collections::BTreeMap::new();
        collect_spans(&params_node, String::new(), &mut param_spans);
        let kind = match &spec.action {
            Action::Uses(uses) => {
                let uses = self.templates.render_node(uses, &ctx, self.diagnostics)?;
                let Some(uses_name) = uses.as_str() else {
                    self.diagnostics.push(
                        Diagnostic::error("`uses` must name a built-in stage")
                            .at(uses.span, format!("found {}", uses.kind())),
                    );
                    return None;
                };
                let Some(builtin) = self.registry.get(uses_name) else {
                    self.diagnostics
                        .push(unknown_builtin(uses_name, uses.span, self.registry));
                    return None;
                };
                if let (Some(ins), Some(outs)) = (&inputs, &outputs) {
                    let names =
                        |ports: &[Port]| ports.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
                    if let Err(problem) = builtin.check_ports(&names(ins), &names(outs)) {
                        let place = if problem.outputs {
                            &spec.outputs
                        } else {
                            &spec.inputs
                        };
                        let at = place.as_ref().map_or(uses.span, |n| n.span);
                        self.diagnostics.push(
                            Diagnostic::error(format!(
                                "stage `{}`: `{}` {}",
                                spec.name.name, builtin.name, problem.message
                            ))
                            .at(at, "here")
                            .also(uses.span, format!("`{}` is used here", builtin.name)),
                        );
                    }
                }
                let params = self.checker.check(
                    builtin,
                    &spec.name.name,
                    &params_node,
                    uses.span,
                    self.diagnostics,
                )?;
                StageKind::Builtin {
                    name: builtin.name.to_owned(),
                    version: builtin.version,
                    params,
                }
            }
            Action::Cmd(cmd) | Action::Argv(cmd) => {
                let argv = matches!(spec.action, Action::Argv(_));
                let params = params_node.to_json();
                let mut full = context.clone();
                full.insert("params".into(), params.clone());
                full.insert(
                    "inputs".into(),
                    ports_json(inputs.as_deref().unwrap_or_default()),
                );
                full.insert(
                    "outputs".into(),
                    ports_json(outputs.as_deref().unwrap_or_default()),
                );
                // Paths that did not parse were reported; the command cannot say more about them.
                let mut failed = self.failed.to_vec();
                if inputs.is_none() {
                    failed.push("inputs".into());
                }
                if outputs.is_none() {
                    failed.push("outputs".into());
                }
                let full_ctx = Context::new(&full).with_failed(&failed);
                let lines: Vec<&Node> = match &cmd.value {
                    Value::Seq(items) => items.iter().collect(),
                    _ => vec![cmd],
                };
                let mut templates = Vec::new();
                let mut words = Vec::new();
                for line in lines {
                    let Value::String(s) = &line.value else {
                        continue;
                    };
                    let rendered = if argv {
                        self.templates
                            .render_string(s, line.span, &full_ctx)
                            .map(|node| argv_words(&node))
                    } else {
                        self.templates
                            .render_shell(s, line.span, &full_ctx)
                            .map(|command| vec![command])
                    };
                    match rendered {
                        Ok(rendered) => words.extend(rendered),
                        Err(errors) => self.diagnostics.extend(errors),
                    }
                    templates.push((s.text.clone(), line.span));
                }
                // The fingerprint and the lock show a program run without a shell as one line,
                // each word quoted as `sh` would need it.
                let commands = if argv {
                    vec![words
                        .iter()
                        .map(|w| super::shell::quote(w))
                        .collect::<Vec<_>>()
                        .join(" ")]
                } else {
                    words
                };
                context.insert("params".into(), params.clone());
                let in_place = in_place(
                    self.templates,
                    &templates,
                    outputs.as_deref().unwrap_or_default(),
                );
                StageKind::Shell {
                    templates,
                    commands,
                    params,
                    argv,
                    in_place,
                }
            }
        };
        let checks = match (&spec.checks, &outputs) {
            (Some(node), Some(outputs)) => self
                .templates
                .render_node(node, &ctx, self.diagnostics)
                .map(|node| super::checks::parse(&spec.name.name, &node, outputs, self.diagnostics))
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let metrics = match (&spec.metrics, &outputs) {
            (Some(node), Some(outputs)) => self
                .templates
                .render_node(node, &ctx, self.diagnostics)
                .map(|node| {
                    super::metrics::parse(&spec.name.name, &node, outputs, self.diagnostics)
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let on_failure = spec
            .on_failure
            .as_ref()
            .and_then(|node| render_hook(self.templates, node, &ctx, self.diagnostics));
        let env = spec
            .env
            .as_ref()
            .map(|node| self.env(node, &ctx))
            .unwrap_or_default();
        let versioning = versioning(spec, outputs.as_deref(), self.diagnostics);
        if let (StageKind::Shell { in_place, .. }, Some(outputs)) = (&kind, &outputs) {
            in_place_fits(
                spec,
                outputs,
                in_place,
                versioning.is_some(),
                self.diagnostics,
            );
        }
        let engine = self.engine(spec, &kind, &param_spans);
        let executor = self.executor(spec, &ctx, engine);
        let limits = {
            let mut render = |node: &Option<Node>| {
                node.as_ref()
                    .and_then(|n| self.templates.render_node(n, &ctx, self.diagnostics))
            };
            let (resources, retries, timeout) = (
                render(&spec.resources),
                render(&spec.retries),
                render(&spec.timeout),
            );
            super::limits::parse(
                resources.as_ref(),
                retries.as_ref(),
                timeout.as_ref(),
                self.diagnostics,
            )
        };
        if instance.partition.is_none() {
            for check in &checks {
                if let imba_stages::checks::Check::Change {
                    against: imba_stages::checks::Against::Previous,
                    ..
                } = check.check
                {
                    self.diagnostics.push(
                        Diagnostic::error(format!(
                            "stage `{}` is not partitioned: its `change` check has no previous partition to compare with",
                            spec.name.name
                        ))
                        .at(check.span, "`against: previous`")
                        .help(
                            "a stage is partitioned when its templates read a set's key, e.g. `{{ month }}` of `partitions: {month: …}`; else use `against: committed`",
                        ),
                    );
                }
            }
        }
        if self.diagnostics.len() > before {
            return None;
        }
        let read = self.vars_read(spec);
        Some(Stage {
            engine,
            limits,
            executor,
            partition: instance.partition,
            vars: read.values,
            var_deps: read.deps,
            var_fields: read.fields,
            name,
            span: spec.name.span,
            desc,
            kind,
            inputs: inputs?,
            outputs: outputs?,
            context,
            param_spans,
            checks,
            metrics,
            on_failure,
            versioning,
            env,
        })
    }

    /// Where the stage runs: its `executor:` (`local`: here), else `--executor`, else here. A
    /// stage on Spark runs its driver side here whatever `--executor` says.
    fn executor(
        &mut self,
        spec: &StageSpec,
        ctx: &Context,
        engine: crate::model::Engine,
    ) -> Option<String> {
        let on_spark = engine == crate::model::Engine::Spark;
        let Some(node) = &spec.executor else {
            return self.executor.filter(|_| !on_spark).map(str::to_owned);
        };
        let rendered = self.templates.render_node(node, ctx, self.diagnostics)?;
        let Some(name) = rendered.as_str().map(str::trim) else {
            self.diagnostics.push(
                Diagnostic::error(format!(
                    "`executor` must be the name of an executor, found {}",
                    rendered.kind()
                ))
                .at(rendered.span, "expected a name in `executors:`"),
            );
            return None;
        };
        if name == "local" {
            return None;
        }
        if !self.executors.contains_key(name) {
            self.diagnostics.push(super::executors::unknown(
                name,
                rendered.span,
                self.executors,
            ));
            return None;
        }
        if on_spark {
            self.diagnostics.push(
                Diagnostic::error(format!(
                    "stage `{}` runs on Spark: it cannot also run on executor `{name}`",
                    spec.name.name
                ))
                .at(rendered.span, "`executor` here")
                .help("a stage on Spark computes on the cluster; leave out one of `engine: spark` and `executor`"),
            );
            return None;
        }
        Some(name.to_owned())
    }

    /// Where the stage runs: its `engine:`, else `--engine` when it can run there, else local.
    /// `engine: spark` on a stage that cannot run on Spark (a command, a built-in without a
    /// Spark implementation, a param with no exact equivalent there) is an error at the cause.
    fn engine(
        &mut self,
        spec: &StageSpec,
        kind: &StageKind,
        param_spans: &BTreeMap<String, Span>,
    ) -> crate::model::Engine {
        use crate::model::Engine;
        let spark_query = |kind: &StageKind| match kind {
            StageKind::Builtin { name, params, .. } => {
                Some(imba_stages::spark::supports(name, params))
            }
            StageKind::Shell { .. } => None,
        };
        let Some((key, node)) = &spec.engine else {
            return match (self.engine, spark_query(kind)) {
                (Some(Engine::Spark), Some(Ok(_))) => Engine::Spark,
                _ => Engine::Local,
            };
        };
        let engine = match node.as_str() {
            Some("local") => return Engine::Local,
            Some("spark") => Engine::Spark,
            _ => {
                self.diagnostics
                    .push(super::raw::not_one_of("engine", node, &["local", "spark"]));
                return Engine::Local;
            }
        };
        match spark_query(kind) {
            None => self.diagnostics.push(
                Diagnostic::error(format!(
                    "stage `{}` runs a command: `engine` is for built-in stages",
                    spec.name.name
                ))
                .at(key.span, "not for `cmd` or `argv`")
                .help(format!(
                    "built-in stages that run on Spark: {}",
                    imba_stages::spark::BUILTINS
                        .iter()
                        .map(|b| format!("`{b}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            ),
            Some(Err(unsupported)) => {
                let span = param_spans
                    .get(&unsupported.param)
                    .copied()
                    .filter(|_| !unsupported.param.is_empty());
                let message = match &span {
                    Some(_) => format!(
                        "stage `{}` cannot run on Spark: param `{}` has no exact equivalent there",
                        spec.name.name,
                        imba_stages::pointer::dotted(&unsupported.param)
                    ),
                    None => format!("stage `{}` cannot run on Spark", spec.name.name),
                };
                let diagnostic = Diagnostic::error(message)
                    .at(span.unwrap_or(node.span), unsupported.why.clone());
                self.diagnostics.push(match span {
                    Some(_) => diagnostic.also(node.span, "`engine: spark`"),
                    None => diagnostic,
                });
            }
            Some(Ok(_)) => {}
        }
        engine
    }

    /// `env:` rendered: each variable with its value, or `None` to pass it through.
    fn env(&mut self, node: &Node, ctx: &Context) -> Vec<(String, Option<String>)> {
        let mut env = Vec::new();
        match &node.value {
            Value::Map(entries) => {
                for (name, value) in entries {
                    let value = match &value.value {
                        Value::Null => None,
                        _ => self
                            .templates
                            .render_node(value, ctx, self.diagnostics)
                            .map(|v| match v.to_json() {
                                Json::String(s) => s,
                                other => other.to_string(),
                            }),
                    };
                    env.push((name.name.clone(), value));
                }
            }
            Value::Seq(items) => {
                for item in items {
                    if let Some(name) = item.as_str() {
                        env.push((name.to_owned(), None));
                    }
                }
            }
            _ => {}
        }
        env.sort();
        env.dedup_by(|a, b| a.0 == b.0);
        env
    }

    /// `inputs:` or `outputs:`, rendered and parsed.
    fn ports(&mut self, node: Option<&Node>, ctx: &Context) -> Option<Vec<Port>> {
        let Some(node) = node else {
            return Some(Vec::new());
        };
        let entries: Vec<(Option<&Key>, &Node)> = match &node.value {
            Value::Map(entries) => entries.iter().map(|(k, v)| (Some(k), v)).collect(),
            Value::Seq(items) => items.iter().map(|v| (None, v)).collect(),
            _ => return Some(Vec::new()),
        };
        let mut ports = Vec::new();
        let mut ok = true;
        for (key, value) in entries {
            let Some(rendered) = self.templates.render_node(value, ctx, self.diagnostics) else {
                ok = false;
                continue;
            };
            // A list item that renders to a list of paths (`{{ expand(…) }}`) is each of them.
            let texts: Vec<&str> = match (&rendered.value, key) {
                (Value::Seq(items), None) if items.iter().all(|i| i.as_str().is_some()) => {
                    items.iter().filter_map(Node::as_str).collect()
                }
                _ => match rendered.as_str() {
                    Some(text) => vec![text],
                    None => {
                        self.diagnostics.push(
                            Diagnostic::error(format!(
                                "a path must be a string, this template gives {}",
                                rendered.kind()
                            ))
                            .at(value.span, "not a path"),
                        );
                        ok = false;
                        continue;
                    }
                },
            };
            for text in texts {
                ok &= self.port(key, text, value.span, &mut ports);
            }
        }
        ok.then_some(ports)
    }

    /// Parses one path of `inputs:`/`outputs:` into `ports`; false when it is not a path.
    fn port(&mut self, key: Option<&Key>, text: &str, span: Span, ports: &mut Vec<Port>) -> bool {
        match Declared::parse(text, self.workdir) {
            Ok(declared) => {
                ports.push(Port {
                    name: key.map(|k| k.name.clone()),
                    text: text.to_owned(),
                    declared,
                    span,
                });
                true
            }
            Err(error) => {
                self.diagnostics.push(
                    Diagnostic::error(format!("invalid path `{text}`: {error}"))
                        .at(span, error.to_string()),
                );
                false
            }
        }
    }
}

/// Every node under `node`, by JSON pointer: the key's span for a map entry, the value's for a
/// list item.
fn collect_spans(node: &Node, pointer: String, out: &mut std::collections::BTreeMap<String, Span>) {
    match &node.value {
        Value::Map(entries) => {
            for (key, value) in entries {
                let child = format!("{pointer}/{}", imba_stages::pointer::escape(&key.name));
                out.insert(child.clone(), key.span);
                collect_spans(value, child, out);
            }
        }
        Value::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let child = format!("{pointer}/{i}");
                out.insert(child.clone(), item.span);
                collect_spans(item, child, out);
            }
        }
        _ => {}
    }
}

/// The words an `argv:` item gives: one, or each item of a list it evaluates to.
fn argv_words(node: &Node) -> Vec<String> {
    let word = |json: Json| match json {
        Json::String(s) => s,
        other => other.to_string(),
    };
    match node.to_json() {
        Json::Array(items) => items.into_iter().map(word).collect(),
        other => vec![word(other)],
    }
}

/// An `on_failure:` hook: a shell command, with every inserted value escaped.
fn render_hook(
    templates: &Templates,
    node: &Node,
    ctx: &Context,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Hook> {
    let rendered = match &node.value {
        Value::String(s) => match templates.render_shell(s, node.span, ctx) {
            Ok(command) => Node::string(node.span, command),
            Err(errors) => {
                diagnostics.extend(errors);
                return None;
            }
        },
        _ => node.clone(),
    };
    super::checks::hook(&rendered, diagnostics)
}

fn suffix_of(value: &Json, index: usize) -> String {
    match value {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        Json::Bool(b) => b.to_string(),
        Json::Null => "null".into(),
        Json::Array(_) | Json::Object(_) => index.to_string(),
    }
}

fn unknown_builtin(name: &str, span: Span, registry: &Registry) -> Diagnostic {
    let names: Vec<&str> = registry.names().collect();
    let diagnostic = Diagnostic::error(format!("unknown built-in stage `{name}`"));
    let diagnostic = match did_you_mean(name, names.iter().copied()) {
        Some(s) => diagnostic.at(span, format!("did you mean `{s}`?")),
        None => diagnostic.at(span, "no built-in stage has this name"),
    };
    if names.is_empty() {
        diagnostic
            .help("this build of imba has no built-in stages; use `cmd:` to run a shell command")
    } else {
        diagnostic.help(format!(
            "the built-in stages are {}; `imba stages` describes them",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}
