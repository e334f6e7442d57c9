//! What a pipeline is once it is read: stages, ports, locations, checks and settings, the types
//! every layer above shares. Nothing here reads a file or prints.

pub mod location;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use imba_stages::checks::Check;
use serde_json::{json, Map, Value as Json};

use crate::diagnostic::Span;

pub use location::{Declared, Location};

/// A validated pipeline: every template rendered, every matrix expanded, every path parsed.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The pipeline file, as given on the command line.
    pub file: PathBuf,
    /// Directory that relative paths and commands are resolved in.
    pub workdir: PathBuf,
    pub desc: Option<String>,
    /// The resolved vars.
    pub vars: Map<String, Json>,
    /// In file order; matrix instances in expansion order.
    pub stages: Vec<Stage>,
    /// Run when a stage without its own `on_failure:` fails.
    pub on_failure: Option<Hook>,
    /// The `storage:` settings (S3 endpoint, region, addressing).
    pub storage: StorageSettings,
    /// The `cache:` settings (the run cache's size, its remote).
    pub cache: CacheSettings,
    /// The `--vars FILE` and `--set KEY=VALUE` arguments it was loaded with, in order, the
    /// value of a secret-looking key masked: what a run record keeps of how it was configured.
    pub overrides: Vec<String>,
    /// The `partitions:` sets, in file order.
    pub partitions: Vec<PartitionSet>,
    /// The `engines:` settings: how to reach each engine.
    pub engines: EngineSettings,
    /// The `executors:` stages may run on, by name.
    pub executors: BTreeMap<String, ExecutorSettings>,
}

/// What the pipeline's `engines:` section says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineSettings {
    pub spark: SparkSettings,
}

/// `engines.spark`: the Spark Connect address (no token in it) and the variable that holds the
/// token.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparkSettings {
    pub remote: Option<String>,
    pub token_env: Option<String>,
}

/// Where stages on an executor run (`executors: {NAME: {slurm: …}}`): somewhere other than
/// this process, as jobs that run `imba exec-stage`.
#[derive(Clone, Debug, PartialEq)]
pub enum ExecutorSettings {
    Slurm(SlurmSettings),
}

/// `executors.NAME.slurm`: what every job of the executor is submitted with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlurmSettings {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// More `sbatch` options, each one argument (`--qos=high`).
    pub extra: Vec<String>,
}

/// A named set of partition keys (`month`: `2017-01`, `2017-02`, …), in key order.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionSet {
    pub name: String,
    pub keys: Vec<String>,
    /// `discover:`: the keys are those of the paths that match this pattern.
    pub discover: Option<Discover>,
}

/// A `discover:` pattern: `raw/{month}/orders.csv`, where `{month}` (the set's name) is the key,
/// a part of one path segment, and `*` any part of one segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Discover {
    /// As rendered, vars in place.
    pub pattern: String,
    /// The part before the segment holding the key: the prefix listed (`raw/`, `s3://b/raw/`).
    pub prefix: String,
    /// What a listed path (relative to `prefix`) must look like: literal text, `*`, the key.
    pub parts: Vec<PatternPart>,
    pub span: Span,
}

/// One piece of a [`Discover`] pattern after its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternPart {
    Text(String),
    /// `*`: any characters but `/`, at least one.
    Any,
    /// The key: any characters but `/`, at least one.
    Key,
}

impl Discover {
    /// The key a path listed under the prefix stands for, if it matches.
    pub fn key_of(&self, listed: &str) -> Option<String> {
        self.locate(listed).map(|(key, _)| key)
    }

    /// The key a path listed under the prefix stands for, and where the path segment holding
    /// it ends (the paths of one key share everything before). The key takes as much of its
    /// segment as it can and a `*` as little, so that `{month}-*.csv` reads `2017-05` from
    /// `2017-05-orders.csv`.
    pub fn locate(&self, listed: &str) -> Option<(String, usize)> {
        fn matches(
            parts: &[PatternPart],
            text: &str,
            at: usize,
            key: &mut Option<(usize, usize)>,
        ) -> bool {
            let rest_of = &text[at..];
            match parts.split_first() {
                None => rest_of.is_empty(),
                Some((PatternPart::Text(t), rest)) => {
                    rest_of.starts_with(t.as_str()) && matches(rest, text, at + t.len(), key)
                }
                Some((part, rest)) => {
                    let segment = rest_of.find('/').unwrap_or(rest_of.len());
                    let mut ends: Vec<usize> = (1..=segment)
                        .filter(|&n| rest_of.is_char_boundary(n))
                        .collect();
                    if *part == PatternPart::Key {
                        ends.reverse();
                    }
                    ends.into_iter().any(|n| {
                        let before = *key;
                        if *part == PatternPart::Key {
                            *key = Some((at, at + n));
                        }
                        let found = matches(rest, text, at + n, key);
                        if !found {
                            *key = before;
                        }
                        found
                    })
                }
            }
        }
        let mut key = None;
        if !matches(&self.parts, listed, 0, &mut key) {
            return None;
        }
        let (start, end) = key?;
        let segment_end = listed[end..].find('/').map_or(listed.len(), |i| end + i);
        Some((listed[start..end].to_owned(), segment_end))
    }
}

/// Where a built-in stage runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Engine {
    /// In imba's process, with polars.
    #[default]
    Local,
    /// On a Spark cluster, through Spark Connect (`SPARK_REMOTE`).
    Spark,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Local => "local",
            Engine::Spark => "spark",
        }
    }
}

/// What a stage asks of where it runs, and how a failed or hanging attempt is handled
/// (`resources:`, `retries:`, `timeout:`). None of it is fingerprinted: it changes how a stage
/// runs, never what it writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// CPUs it uses (`resources.cpus`); `None`: one.
    pub cpus: Option<u32>,
    /// Bytes of memory it needs at most (`resources.memory`); `None`: a built-in's estimate from
    /// its inputs' sizes, else nothing reserved.
    pub memory: Option<u64>,
    pub retries: Retries,
    /// An attempt that runs longer is stopped as Ctrl-C stops it, and fails.
    pub timeout: Option<Duration>,
    /// Where `resources:` is written, for errors about it.
    pub resources_span: Option<Span>,
}

/// How often a stage is tried (`retries:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retries {
    /// Attempts in all, at least 1.
    pub attempts: u32,
    /// The wait before the second attempt; it doubles before each one after.
    pub backoff: Duration,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 1,
            backoff: Duration::ZERO,
        }
    }
}

impl Retries {
    /// The wait after failed attempt `attempt` (1-based): `backoff × 2^(attempt-1)`, at most
    /// an hour.
    pub fn wait_after(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.backoff
            .saturating_mul(factor)
            .min(Duration::from_secs(3600))
    }
}

/// Which partition a stage instance is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The set's name (`month`).
    pub set: String,
    /// The key (`2017-05`).
    pub key: String,
    /// The key before it in the set, if any (`2017-04`).
    pub previous: Option<String>,
}

impl Partition {
    /// The name of the same stage's instance for another key of the set: `clean@2017-04`
    /// beside `clean@2017-05`.
    pub fn sibling(&self, instance: &str, key: &str) -> String {
        format!("{}@{key}", self.base(instance))
    }

    /// The stage's name without its key: `clean` of `clean@2017-05`.
    pub fn base<'a>(&self, instance: &'a str) -> &'a str {
        instance
            .strip_suffix(self.key.as_str())
            .and_then(|base| base.strip_suffix('@'))
            .unwrap_or(instance)
    }
}

/// One stage, ready to plan and run.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Unique name: the spec's name, plus `@suffix` for a matrix or foreach instance.
    pub name: String,
    /// Where the stage is defined (its key in `stages:`).
    pub span: Span,
    pub desc: Option<String>,
    pub kind: StageKind,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    /// Template context of a `cmd` stage without its `inputs`/`outputs`: vars, `item`, `params`.
    /// The runner adds staging paths for `outputs` and renders the command again.
    pub context: Map<String, Json>,
    /// Where each param is in the pipeline file (or a `--set`), by JSON pointer: a map entry's
    /// key, a list item's value. Built-in stages name a param in their errors; this finds it.
    pub param_spans: std::collections::BTreeMap<String, Span>,
    /// Evaluated on the staged outputs before they are committed.
    pub checks: Vec<StageCheck>,
    /// Values tracked per partition (or run), measured on the outputs when they are committed.
    pub metrics: Vec<StageMetric>,
    /// Run when this stage fails (else the pipeline's).
    pub on_failure: Option<Hook>,
    /// `version: auto`: its one output holds immutable versions.
    pub versioning: Option<Versioning>,
    /// Variables set for a `cmd`/`argv` stage, sorted by name: a value, or `None` for a variable
    /// passed through from imba's environment (its name is fingerprinted, never its value).
    pub env: Vec<(String, Option<String>)>,
    /// A partitioned stage's set and key: it is one of the set's instances, named `NAME@KEY`.
    pub partition: Option<Partition>,
    /// Where a built-in stage runs.
    pub engine: Engine,
    /// Its resources, retries and timeout.
    pub limits: Limits,
    /// The executor it runs on (a name in `executors:`); `None`: in this process.
    pub executor: Option<String>,
    /// The pipeline's vars this stage's templates read, directly or through other vars, with
    /// their values (a secret-looking one by a hash of its value): the lock keeps them, so that
    /// a stale stage can say "var month changed: 2024-12 → 2024-06". Never fingerprinted: what
    /// a var changes is fingerprinted where it lands.
    pub vars: BTreeMap<String, Json>,
    /// For each var in `vars`, the vars its own template reads: a change explained by another
    /// var's is not reported twice.
    pub var_deps: BTreeMap<String, Vec<String>>,
    /// For each var in `vars`, the stage keys (`cmd`, `params`, `outputs`, …) it reaches,
    /// directly or through other vars: the differences a change of it explains.
    pub var_fields: BTreeMap<String, std::collections::BTreeSet<String>>,
}

#[derive(Debug, Clone)]
pub enum StageKind {
    Builtin {
        name: String,
        version: u32,
        /// Normalised: every default filled in, keys sorted.
        params: Json,
    },
    Shell {
        /// Each command as written (a template), with its span.
        templates: Vec<(String, Span)>,
        /// Each command rendered with the declared paths.
        commands: Vec<String>,
        params: Json,
        /// `argv:` a program run without a shell: `templates` are its words.
        argv: bool,
        /// One per output: whether the command writes it at its declared path (it names it in no
        /// template, as DVC stages do) rather than at the staging path `{{ outputs.NAME }}`.
        in_place: Vec<bool>,
    },
}

impl StageKind {
    /// `clean`, `aggregate`…, or `cmd`.
    pub fn label(&self) -> &str {
        match self {
            StageKind::Builtin { name, .. } => name,
            StageKind::Shell { .. } => "cmd",
        }
    }
}

/// A declared input or output.
#[derive(Debug, Clone)]
pub struct Port {
    /// The name in an `inputs:`/`outputs:` map; `None` in a list.
    pub name: Option<String>,
    /// The path as written, after templates.
    pub text: String,
    pub declared: Declared,
    pub span: Span,
}

impl Port {
    /// How a command names this output, the `index`-th of its stage: `{{ outputs.NAME }}`, or
    /// `{{ outputs[i] }}` in a list.
    pub fn placeholder(&self, index: usize) -> String {
        match &self.name {
            Some(name) => format!("{{{{ outputs.{name} }}}}"),
            None => format!("{{{{ outputs[{index}] }}}}"),
        }
    }
}

/// The file name standing for a stage instance under `.imba/` (staging, logs, quarantine):
/// letters, digits, `_`, `-` and `.` as they are, every other byte as `%XX`, so that no two
/// names share a file (`r@a` is `r%40a`, `r_a` stays `r_a`). A name too long for a file name
/// keeps its first 160 bytes and gains the hash of the whole name (after `%~`, which no encoded
/// name holds).
pub fn file_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric()
            || matches!(byte, b'_' | b'-')
            || (byte == b'.' && !out.is_empty())
        {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    if out.len() > 200 {
        let mut cut = 160;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        let hash = blake3::hash(name.as_bytes()).to_hex();
        out = format!("{}%~{}", &out[..cut], &hash[..32]);
    }
    out
}

/// `inputs`/`outputs` as a template sees them: a map by name, or a list.
pub fn ports_json(ports: &[Port]) -> Json {
    if ports.iter().all(|p| p.name.is_some()) && !ports.is_empty() {
        Json::Object(
            ports
                .iter()
                .map(|p| {
                    (
                        p.name.clone().unwrap_or_default(),
                        Json::String(p.text.clone()),
                    )
                })
                .collect(),
        )
    } else {
        Json::Array(ports.iter().map(|p| Json::String(p.text.clone())).collect())
    }
}

pub use imba_stages::checks::Severity;

/// One check of one stage, resolved to the table it reads.
#[derive(Debug, Clone)]
pub struct StageCheck {
    pub check: Check,
    pub severity: Severity,
    /// `name:` if given, else the check's label (`not_null(user_id)`).
    pub name: String,
    /// The position of the checked output in the stage's outputs.
    pub output: usize,
    /// The file inside a directory output.
    pub file: Option<String>,
    /// The check's key (`rows:`…), where messages about the check point.
    pub span: Span,
    /// Each column the check names, where it is named.
    pub columns: Vec<(String, Span)>,
}

impl StageCheck {
    /// The check as written, for fingerprints and records.
    pub fn to_json(&self) -> Json {
        let mut value = self.check.to_json();
        if let Json::Object(map) = &mut value {
            map.insert("severity".into(), json!(self.severity));
            map.insert("output".into(), json!(self.output));
            if let Some(file) = &self.file {
                map.insert("file".into(), json!(file));
            }
        }
        value
    }
}

/// One of a stage's `metrics:`: a value measured on one of its outputs.
#[derive(Debug, Clone)]
pub struct StageMetric {
    pub name: String,
    pub measure: imba_stages::checks::Measure,
    /// The position of the measured output in the stage's outputs.
    pub output: usize,
    /// The file inside a directory output.
    pub file: Option<String>,
    pub span: Span,
}

impl StageMetric {
    /// What it measures, on which output, in canonical JSON: a value recorded under another
    /// definition is not this metric's.
    pub fn definition(&self) -> Json {
        json!({"measure": self.measure.to_json(), "output": self.output, "file": self.file})
    }
}

/// A shell command run when a stage fails, with the failure as JSON on stdin.
#[derive(Debug, Clone, PartialEq)]
pub struct Hook {
    pub command: String,
    pub span: Span,
}

/// A stage's `version:` settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioning {
    /// Keep this many versions in place; older ones move to `archive/`.
    pub keep: Option<u32>,
}

/// What the pipeline's `storage:` section says (secrets never: they come from the environment).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StorageSettings {
    /// An S3-compatible endpoint (MinIO, a test server); else `AWS_ENDPOINT_URL`, else AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), as MinIO and most S3-compatible stores need.
    pub path_style: Option<bool>,
    /// Tries of a request that failed on the network or was throttled (default 4).
    pub retries: Option<usize>,
    /// `storage.connect_timeout`: the longest wait for a connection to the endpoint (TCP, and
    /// TLS for https) before the try counts as failed (default [`CONNECT_TIMEOUT`]).
    pub connect_timeout: Option<Duration>,
    /// `storage.timeout`: the longest an S3 request may go without an answer: from its start
    /// to the response's headers (an upload's body included), then between two chunks of the
    /// response's body (default [`TIMEOUT`]). A transfer that keeps moving is never cut off;
    /// a server that stops answering fails the request, and no new try starts after this long
    /// either, so a stalled server fails an operation after about this long.
    pub timeout: Option<Duration>,
}

/// What the pipeline's `cache:` section says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheSettings {
    /// `cache.max_size`: after a run, least recently used entries go until the blobs take at
    /// most this many bytes.
    pub max_size: Option<u64>,
    /// `cache.remote`: where a team shares its run cache (an S3 prefix, or a shared folder).
    pub remote: Option<Location>,
    /// `cache.push`: whether a run pushes what it computed.
    pub push: Push,
}

/// When computed results go to the remote cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Push {
    /// Only `imba push` pushes (as DVC: a local run does not publish by itself).
    #[default]
    Manual,
    /// Every run pushes what it computed, and takes a lease on what it computes.
    Auto,
}

/// Default of [`StorageSettings::connect_timeout`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`StorageSettings::timeout`].
pub const TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(parts: Vec<PatternPart>) -> Discover {
        Discover {
            pattern: String::new(),
            prefix: "raw/".into(),
            parts,
            span: Span::default(),
        }
    }

    #[test]
    fn a_discover_pattern_finds_the_key_in_one_segment() {
        use PatternPart::{Any, Key, Text};
        let plain = pattern(vec![Key, Text("/orders.csv".into())]);
        assert_eq!(
            plain.key_of("2017-05/orders.csv").as_deref(),
            Some("2017-05")
        );
        assert_eq!(plain.key_of("2017-05/other.csv"), None);
        assert_eq!(
            plain.key_of("a/2017-05/orders.csv"),
            None,
            "one segment only"
        );
        assert_eq!(plain.key_of("/orders.csv"), None, "never empty");
        let hive = pattern(vec![
            Text("year=".into()),
            Any,
            Text("/month=".into()),
            Key,
            Text("/part-".into()),
            Any,
            Text(".csv".into()),
        ]);
        assert_eq!(
            hive.key_of("year=2017/month=2017-05/part-0001.csv")
                .as_deref(),
            Some("2017-05")
        );
        assert_eq!(hive.key_of("year=2017/month=2017-05/part-.csv"), None);
        // The key takes what it can, a `*` what is left.
        let dashed = pattern(vec![Key, Text("-".into()), Any, Text(".csv".into())]);
        assert_eq!(
            dashed.locate("2017-05-orders.csv"),
            Some(("2017-05".to_owned(), 18))
        );
        // Non-ASCII names are matched by character, never split inside one.
        assert_eq!(plain.key_of("März/orders.csv").as_deref(), Some("März"));
        assert_eq!(plain.key_of("Résumé.pdf"), None);
        assert_eq!(
            plain.locate("2017-05/orders.csv"),
            Some(("2017-05".to_owned(), 7))
        );
        let inside = pattern(vec![Text("orders_".into()), Key, Text(".csv".into())]);
        assert_eq!(
            inside.key_of("orders_2017-05.csv").as_deref(),
            Some("2017-05")
        );
    }
}
