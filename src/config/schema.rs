//! The JSON Schema of a pipeline file, for editors (`imba schema`, `docs/pipeline.schema.json`).
//!
//! These types describe the file for schemars only; [`crate::config::raw`] reads it, with spans
//! and better messages. A test keeps the two in step.

#![allow(dead_code)]

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

/// An imba pipeline: stages that read and write files, run when their inputs change.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "imba pipeline")]
pub struct PipelineSchema {
    /// What the pipeline is for.
    desc: Option<String>,
    /// The directory that relative paths and commands resolve against, relative to this file.
    /// Default: the directory of this file.
    workdir: Option<String>,
    /// Values for `{{ name }}` templates in any string. A var may use the vars above it.
    /// `--set name=value` and `--vars FILE` override them.
    vars: Option<BTreeMap<String, serde_json::Value>>,
    /// The stages, by name (letters, digits, `_`, `-`, `.`).
    stages: BTreeMap<String, StageSchema>,
    /// A shell command run when a stage without its own `on_failure` fails, with the failure as
    /// JSON on stdin (stage, error, checks, quarantine folder, log).
    on_failure: Option<String>,
    /// S3 settings for `s3://` inputs and outputs. Credentials never go here: they come from
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) in the environment.
    storage: Option<StorageSchema>,
    /// The run cache (docs/caching.md): how big it may grow here, and the remote a team
    /// shares it through.
    cache: Option<CacheSchema>,
    /// Named sets of partition keys (`month: {range: {from: 2017-01, to: 2017-12}}`). A stage
    /// whose templates read a set's name (`{{ month }}`) runs once per key, as `NAME@KEY`;
    /// every stage sees the keys as `{{ partitions.month.all }}`.
    partitions: Option<BTreeMap<String, PartitionSetSchema>>,
    /// Where built-in stages run unless they say (`engine:` on the stage) or `--engine` does:
    /// `local` (the default) or `spark`, for every built-in stage that can run there.
    engine: Option<EngineSchema>,
    /// How to reach each engine (docs/engines.md).
    engines: Option<EnginesSchema>,
    /// Where stages may run as jobs, by name (docs/executors.md): `hpc: {slurm: {partition:
    /// batch}}`. A stage names one with `executor:`; `imba run --executor NAME` puts every stage
    /// there.
    executors: Option<BTreeMap<String, ExecutorSchema>>,
}

/// One executor: its kind and settings.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ExecutorSchema {
    /// A Slurm cluster, through `sbatch`, `scontrol` and `scancel` on this machine (the cluster
    /// `SLURM_CONF` names). Each stage is one job running `imba exec-stage`.
    slurm: Option<SlurmSchema>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SlurmSchema {
    /// `--partition` of every job.
    partition: Option<String>,
    /// `--account` of every job.
    account: Option<String>,
    /// More `sbatch` options, one per item: `[--qos=high, --constraint=ssd]`.
    extra: Option<Vec<String>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct EnginesSchema {
    /// The Spark cluster, through Spark Connect.
    spark: Option<SparkSchema>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SparkSchema {
    /// The Spark Connect address, `sc://host:15002` (parameters after `/;`, never a token).
    /// `SPARK_REMOTE` in the environment overrides it.
    remote: Option<String>,
    /// The environment variable that holds the token (`SPARK_TOKEN`): its value is sent as the
    /// address's `token` parameter, and never written anywhere.
    token_env: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct PartitionSetSchema {
    /// The keys (letters, digits, `.`, `_`, `-`); months (`2017-01`) or days (`2017-01-31`)
    /// are checked and ordered by date, others keep their order.
    values: Option<Vec<serde_json::Value>>,
    /// Every month or day from `from` to `to`, both included.
    range: Option<RangeSchema>,
    /// A path pattern, local or `s3://`, with the set's name in braces where the key is
    /// (`"{{ raw }}/{month}/orders.csv"`; `*` is any part of a segment): a key per path found.
    discover: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RangeSchema {
    /// The first key: a month (`2017-01`) or a day (`2017-01-01`).
    from: String,
    /// The last key, of the same kind as `from`.
    to: String,
    /// `month` or `day`; follows from `from` and `to`.
    every: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CacheSchema {
    /// After each run, the least recently used entries are removed until the cache's blobs
    /// take at most this much: bytes, or `500MB`, `10GB`, `2GiB`.
    max_size: Option<SizeSchema>,
    /// Where a team shares results: an S3 prefix (`s3://bucket/imba-cache`, through the same
    /// settings and credentials as data) or a shared folder. Also `--remote` and `IMBA_REMOTE`.
    remote: Option<String>,
    /// `auto`: every run pushes what it computed to the remote, and takes a lease on a stage
    /// before computing it, so that two machines never compute it both. `manual` (default):
    /// only `imba push` pushes.
    push: Option<PushSchema>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum SizeSchema {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum PushSchema {
    Auto,
    Manual,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct StorageSchema {
    /// An S3-compatible endpoint such as MinIO, e.g. `http://127.0.0.1:9000`. Default:
    /// `AWS_ENDPOINT_URL`, else AWS.
    endpoint: Option<String>,
    /// The region. Default: `AWS_REGION` or `AWS_DEFAULT_REGION`.
    region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`). Default: on with a custom endpoint, off
    /// for AWS.
    path_style: Option<bool>,
    /// How many times a request that failed on the network or was throttled is retried, with
    /// exponential backoff (default 4).
    retries: Option<u8>,
    /// How long opening a connection may take, e.g. `5s` (default 5s).
    connect_timeout: Option<String>,
    /// How long a request may go without a byte from the server before it fails, e.g. `60s`
    /// (default 60s). A large transfer that keeps moving is never cut off.
    timeout: Option<String>,
}

/// One stage: a built-in (`uses`) or a shell command (`cmd`), with what it reads and writes.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageSchema {
    /// What the stage does, for `imba dag` and the docs.
    desc: Option<String>,
    /// A built-in stage, e.g. `clean`. Exclusive with `cmd`.
    uses: Option<String>,
    /// A shell command (`sh -c`), or a list of commands run in order, in `workdir`. Templates may
    /// use `{{ inputs.NAME }}`, `{{ outputs.NAME }}` and `{{ params.NAME }}`; every value they
    /// insert is shell-quoted for where it lands (`{{ flags | safe }}` inserts a shell fragment
    /// as it is). Exclusive with `uses` and `argv`.
    cmd: Option<Command>,
    /// A program and its arguments, run without a shell; each item is one argument (an item
    /// that is exactly `{{ list }}` gives one argument per element). Exclusive with `uses` and
    /// `cmd`.
    argv: Option<Vec<String>>,
    /// Variables for the command: a map of names to values (fingerprinted), where `null` passes
    /// the variable through from imba's environment, or a list of names to pass through. A
    /// variable passed through is fingerprinted by its name only, so a secret never lands in the
    /// lock file or the run records.
    env: Option<Env>,
    /// What the stage reads: a map of name to path, or a list of paths. A path is local
    /// (relative to `workdir`) or `s3://bucket/key`; a trailing `/` marks a directory.
    inputs: Option<Paths>,
    /// What the stage writes, as for `inputs`. Each path has one writer.
    outputs: Option<Paths>,
    /// Params: typed by the built-in named in `uses`, free for `cmd` stages.
    params: Option<BTreeMap<String, serde_json::Value>>,
    /// Expands the stage once per combination of values: `{month: [01, 02], model: [a, b]}`
    /// gives `NAME@01-a`, `NAME@01-b`, …; templates see `{{ item.month }}`.
    matrix: Option<BTreeMap<String, Axis>>,
    /// Expands the stage once per list item (`{{ item }}`) or map entry (`{{ key }}`, `{{ item }}`).
    foreach: Option<Foreach>,
    /// Data checks on the stage's table outputs, evaluated before they are committed. A failed
    /// `fail` check fails the stage and keeps its outputs out of place, in `.imba/quarantine/`.
    checks: Option<Vec<CheckSchema>>,
    /// Where a built-in stage runs: `local` (polars, in imba; the default) or `spark` (on the
    /// Spark cluster at `SPARK_REMOTE` or `engines.spark.remote`, through Spark Connect:
    /// `clean`, `aggregate`, `feature`).
    engine: Option<EngineSchema>,
    /// The executor the stage runs on, as a job (a name in `executors:`), or `local` (in imba,
    /// the default). Not fingerprinted: a stage gives the same outputs wherever it runs.
    executor: Option<String>,
    /// What the stage asks of where it runs: the local scheduler admits stages within its CPU
    /// and memory budget (`--cpus`, `--memory`). Not fingerprinted.
    resources: Option<ResourcesSchema>,
    /// How often a failed attempt is tried again: `{attempts: 3, backoff: 10s}` (attempts in
    /// all; the wait doubles each time), or a number of re-tries (`retries: 2` is three attempts).
    /// A failed command, a timeout, a lost or refused job or a built-in's run-time error is retried; a
    /// config error, a missing input or output and a failed check are not. Not fingerprinted.
    retries: Option<RetriesSchema>,
    /// The longest one attempt may run (`30m`, `90s`, `2h`): then it is stopped as Ctrl-C stops
    /// it (SIGTERM to the command's process group, then SIGKILL; a built-in's cancel flag) and
    /// fails, or is retried. Not fingerprinted.
    timeout: Option<String>,
    /// Values to follow across partitions (`imba metrics`), measured on the outputs when they
    /// are committed: `rows`, `mean(COLUMN)`, `null_fraction(COLUMN)` of the stage's table, or a
    /// map with `sql` (one value over a table) or `json` (a pointer into a JSON output).
    metrics: Option<BTreeMap<String, MetricSchema>>,
    /// A shell command run when this stage fails (instead of the pipeline's `on_failure`), with
    /// the failure as JSON on stdin.
    on_failure: Option<String>,
    /// `auto`: the stage's one output, a directory (local or `s3://…/`), holds immutable versions
    /// `NAME_v1/`, `NAME_v2/`, … with `_meta.json` each and a `LATEST` pointer; a new version is
    /// made only when the content differs from the latest.
    version: Option<VersionSchema>,
    /// With `version: auto`: how many versions stay in place; older ones move to `archive/`
    /// beside the output. Default: all stay.
    keep: Option<u32>,
}

/// `resources:` of a stage.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ResourcesSchema {
    /// CPUs the stage uses (default 1).
    #[schemars(range(min = 1, max = 4096))]
    cpus: Option<u32>,
    /// The most memory it needs, with a unit: `512M`, `4G` (10⁹ bytes), `4GiB` (2³⁰). Default: a
    /// built-in's estimate from its inputs' sizes; nothing for a command.
    memory: Option<String>,
}

/// `retries:` of a stage.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum RetriesSchema {
    /// Re-tries after the first attempt.
    Count(#[schemars(range(max = 99))] u32),
    Policy(RetryPolicySchema),
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RetryPolicySchema {
    /// Attempts in all, the first included (default 1).
    #[schemars(range(min = 1, max = 100))]
    attempts: Option<u32>,
    /// The wait before the second attempt (`10s`); it doubles before each one after, up to an
    /// hour. Default `0s`.
    backoff: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum VersionSchema {
    Auto,
}

/// One check: exactly one of `rows`, `change`, `not_null`, `unique`, `range`, `sql`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CheckSchema {
    /// The row count lies within `min` and `max` (either may be left out).
    rows: Option<RowsSchema>,
    /// A metric moved by at most `max_pct` percent from its value on the output committed at the
    /// same place, or (`against: previous`) on the previous partition's (no baseline: passes).
    change: Option<ChangeSchema>,
    /// No missing value (null, or NaN in a float column) in these columns.
    not_null: Option<Columns>,
    /// These columns together identify a row: no two rows share their values.
    unique: Option<Columns>,
    /// Column → `[lo, hi]`, inclusive; `null` leaves an end open. Missing values are ignored.
    range: Option<BTreeMap<String, [Option<Number>; 2]>>,
    /// A polars SQL query over the table `self` whose every value must be `true`, e.g.
    /// `SELECT count(*) > 0 FROM self WHERE days IS NULL`.
    sql: Option<String>,
    /// `fail` (the default) fails the stage; `warn` prints and records.
    severity: Option<SeveritySchema>,
    /// The output checked: its name (or path as written), or `NAME/FILE` for a table inside a
    /// directory output. Default: the stage's only table file.
    output: Option<String>,
    /// A name for the check in messages, records and `imba checks`.
    name: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RowsSchema {
    min: Option<Count>,
    max: Option<Count>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum Count {
    Number(u64),
    /// A `{{ var }}` holding a number.
    Template(String),
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum Number {
    Number(f64),
    /// A `{{ var }}` holding a number.
    Template(String),
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum EngineSchema {
    Local,
    Spark,
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum MetricSchema {
    /// `rows`, `mean(COLUMN)` or `null_fraction(COLUMN)` of the stage's only table.
    Table(String),
    Map(MetricMapSchema),
}

/// One metric, with the output it reads.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct MetricMapSchema {
    /// `rows`, `mean(COLUMN)` or `null_fraction(COLUMN)`.
    metric: Option<String>,
    /// A polars SQL query over the table `self` giving one value.
    sql: Option<String>,
    /// A JSON pointer into a JSON output (`/rows`).
    json: Option<String>,
    /// The output read: its name, or `NAME/FILE` in a directory output.
    output: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ChangeSchema {
    /// `rows` (the default), `mean(COLUMN)` or `null_fraction(COLUMN)`.
    metric: Option<String>,
    /// The largest change allowed, in percent of the baseline.
    max_pct: Number,
    /// The baseline: `committed` (the default), the output committed at the same place; or
    /// `previous`, the same output of the previous partition (month over month).
    against: Option<AgainstSchema>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum AgainstSchema {
    Committed,
    Previous,
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum Columns {
    Many(Vec<String>),
    One(String),
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum SeveritySchema {
    Warn,
    Fail,
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum Command {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum Env {
    Values(BTreeMap<String, Option<EnvValue>>),
    PassThrough(Vec<String>),
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum EnvValue {
    Text(String),
    Number(f64),
    Bool(bool),
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum Paths {
    Named(BTreeMap<String, String>),
    List(Vec<String>),
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum Axis {
    Values(Vec<serde_json::Value>),
    /// A `{{ var }}` holding a list.
    Template(String),
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum Foreach {
    List(Vec<serde_json::Value>),
    Map(BTreeMap<String, serde_json::Value>),
    /// A `{{ var }}` holding a list or map.
    Template(String),
}

/// The schema, pretty-printed with a trailing newline, as checked in under `docs/`: the file's
/// structure, and for each built-in stage the schema of its `params` (applied when `uses` names it).
pub fn pipeline_schema_json() -> String {
    let mut schema =
        serde_json::to_value(schemars::schema_for!(PipelineSchema)).unwrap_or_default();
    let mut conditions = Vec::new();
    for builtin in imba_stages::Registry::standard().iter() {
        let mut params = serde_json::to_value(builtin.params_schema()).unwrap_or_default();
        let prefix = format!("{}.", builtin.name);
        rewrite_refs(&mut params, &prefix);
        if let Some(defs) = params.as_object_mut().and_then(|p| p.remove("$defs")) {
            for (name, def) in defs.as_object().cloned().unwrap_or_default() {
                schema["$defs"][format!("{prefix}{name}")] = def;
            }
        }
        if let Some(object) = params.as_object_mut() {
            object.remove("$schema");
        }
        schema["$defs"][format!("{prefix}params")] = params;
        conditions.push(serde_json::json!({
            "if": {"properties": {"uses": {"const": builtin.name}}, "required": ["uses"]},
            "then": {"properties": {"params": {"$ref": format!("#/$defs/{prefix}params")}}},
        }));
    }
    if !conditions.is_empty() {
        schema["$defs"]["StageSchema"]["allOf"] = serde_json::Value::Array(conditions);
    }
    serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
}

/// Points a built-in's `#/$defs/X` references at `#/$defs/PREFIX X`, where they are merged.
fn rewrite_refs(value: &mut serde_json::Value, prefix: &str) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                if key == "$ref" {
                    if let Some(target) = item.as_str().and_then(|r| r.strip_prefix("#/$defs/")) {
                        *item = serde_json::Value::String(format!("#/$defs/{prefix}{target}"));
                    }
                } else {
                    rewrite_refs(item, prefix);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| rewrite_refs(i, prefix)),
        _ => {}
    }
}
