//! The tables and texts of `status`, `log`, `show` and `checks`, and where a run's outputs are.

use imba_stages::checks::Status;

use super::table;
use crate::graph::Dag;
use crate::model::Severity;
use crate::plan::{FromCache, StageStatus};
use crate::state::record::{CheckRecord, Decision, RunRecord, StageRecord};

/// `imba status` (and `run --dry-run`): each stale stage with its reasons, then a count.
pub fn plan(statuses: &[StageStatus], verb: &str) -> String {
    let stale: Vec<&StageStatus> = statuses.iter().filter(|s| s.stale).collect();
    let mut out = String::new();
    for status in &stale {
        let cached = match status.from_cache {
            Some(FromCache::Held) => " (up to date in the run cache: its outputs hold it already)",
            Some(FromCache::Restore) => " (can be restored from the run cache)",
            None => "",
        };
        out.push_str(&format!("{}{cached}\n", status.name));
        for reason in &status.reasons {
            out.push_str(&format!("  - {reason}\n"));
        }
    }
    // Each changed var once, with the stages that read it (their downstream is stale too).
    let mut vars: Vec<(String, Vec<&str>)> = Vec::new();
    for status in &stale {
        for reason in &status.reasons {
            if let crate::plan::Reason::VarChanged { .. } = reason {
                let text = reason.to_string();
                match vars.iter_mut().find(|(t, _)| *t == text) {
                    Some((_, readers)) => readers.push(&status.name),
                    None => vars.push((text, vec![&status.name])),
                }
            }
        }
    }
    for (text, readers) in &vars {
        // Stale stages downstream of the readers, followed through "upstream X is stale".
        let mut reached: std::collections::BTreeSet<&str> = readers.iter().copied().collect();
        loop {
            let before = reached.len();
            for status in &stale {
                let upstream_reached = status.reasons.iter().any(|r| {
                    matches!(r, crate::plan::Reason::Upstream { stage } if reached.contains(stage.as_str()))
                });
                if upstream_reached {
                    reached.insert(&status.name);
                }
            }
            if reached.len() == before {
                break;
            }
        }
        let downstream = match reached.len() - readers.len() {
            0 => String::new(),
            1 => "; 1 more stage downstream".to_owned(),
            n => format!("; {n} more stages downstream"),
        };
        out.push_str(&format!(
            "{text}; read by {}{downstream}\n",
            readers.join(", ")
        ));
    }
    let restorable = stale.iter().filter(|s| s.from_cache.is_some()).count();
    if stale.is_empty() {
        out.push_str(&format!("all {} stages are up to date\n", statuses.len()));
    } else if restorable > 0 {
        out.push_str(&format!(
            "{} of {} stages {verb}; {restorable} from the run cache, without computing\n",
            stale.len(),
            statuses.len()
        ));
    } else {
        out.push_str(&format!(
            "{} of {} stages {verb}\n",
            stale.len(),
            statuses.len()
        ));
    }
    out
}

/// `imba log`: one line per run, newest first.
pub fn runs(runs: &[RunRecord]) -> String {
    let mut out = format!(
        "{:<25} {:<20} {:<11} {:>4} {:>8} {:>4} {:>6} {:>9}  SET\n",
        "RUN", "STARTED", "STATUS", "RAN", "RESTORED", "SKIP", "FAILED", "DURATION"
    );
    for run in runs {
        let count = |d| run.count(d);
        let line = format!(
            "{:<25} {:<20} {:<11} {:>4} {:>8} {:>4} {:>6} {:>8.2}s  {}",
            run.id,
            run.started,
            run.status,
            count(Decision::Ran),
            count(Decision::Restored),
            count(Decision::Skipped) + count(Decision::Cached),
            count(Decision::Failed),
            run.duration_ms as f64 / 1000.0,
            overrides(run)
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `imba show`: a run, each stage's decision, reasons, checks, error and hook.
pub fn run(run: &RunRecord) -> String {
    let mut out = format!(
        "run {} of {}: {} ({:.2}s, started {})\n",
        run.id,
        run.pipeline,
        run.status,
        run.duration_ms as f64 / 1000.0,
        run.started
    );
    if !run.overrides.is_empty() {
        out.push_str(&format!("set: {}\n", overrides(run)));
    }
    if !run.vars.is_empty() {
        let vars: Vec<String> = run
            .vars
            .iter()
            .map(|(name, value)| match value {
                serde_json::Value::String(s) => format!("{name}={s}"),
                other => format!("{name}={other}"),
            })
            .collect();
        out.push_str(&format!("vars: {}\n", vars.join(" ")));
    }
    for stage in &run.stages {
        out.push_str(&format!("{:<10} {}", stage.decision, stage.name));
        if matches!(stage.decision, Decision::Ran | Decision::Restored) {
            out.push_str(&format!(
                " ({:.2}s{})",
                stage.duration_ms as f64 / 1000.0,
                if stage.unchanged {
                    ", outputs unchanged"
                } else {
                    ""
                }
            ));
        }
        out.push('\n');
        for reason in &stage.reasons {
            out.push_str(&format!("           - {reason}\n"));
        }
        for check in &stage.checks {
            let result = check_result(check, true);
            out.push_str(&format!(
                "           check {result:<5} {}: {}\n",
                check.name, check.detail
            ));
        }
        if let Some(error) = &stage.error {
            for line in error.lines() {
                out.push_str(&format!("           ! {line}\n"));
            }
        }
        if let Some(accepted) = &stage.accepted {
            out.push_str(&format!(
                "           accepted by hand {}: {}\n",
                accepted.at, accepted.reason
            ));
        }
        if let Some(hook) = &stage.hook {
            let how = hook.error.as_deref().unwrap_or("ok");
            out.push_str(&format!(
                "           on_failure: {how} (log {})\n",
                hook.log
            ));
        }
    }
    out
}

/// `imba checks`: each stage with checks and its newest evaluated ones (`None`: never yet).
pub fn checks(latest: &[(&str, Option<(&str, &StageRecord)>)]) -> String {
    let mut rows: Vec<[String; 6]> = vec![[
        "STAGE".into(),
        "CHECK".into(),
        "SEVERITY".into(),
        "RESULT".into(),
        "RUN".into(),
        "DETAIL".into(),
    ]];
    for (name, found) in latest {
        match found {
            None => rows.push([
                (*name).to_owned(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "not evaluated yet".into(),
            ]),
            Some((run, stage)) => {
                for check in &stage.checks {
                    let result = check_result(check, false);
                    let severity = match check.severity {
                        Severity::Warn => "warn",
                        Severity::Fail => "fail",
                    };
                    rows.push([
                        (*name).to_owned(),
                        check.name.clone(),
                        severity.into(),
                        result.into(),
                        (*run).to_owned(),
                        match &stage.accepted {
                            Some(accepted) if check.blocks() => {
                                format!("accepted by hand ({}): {}", accepted.reason, check.detail)
                            }
                            _ => check.detail.clone(),
                        },
                    ]);
                }
            }
        }
    }
    table(&rows)
}

/// How a check's result reads: in a table (`imba checks`), or in a run's details (`imba
/// show`), where the column is narrower.
fn check_result(check: &CheckRecord, narrow: bool) -> &'static str {
    match (check.status, check.severity, narrow) {
        (Status::Pass, _, _) => "pass",
        (Status::Error, _, false) => "ERROR",
        (Status::Error, _, true) => "error",
        (Status::Undefined, _, false) => "undefined",
        (Status::Undefined, _, true) => "undef",
        (Status::Fail, Severity::Warn, false) => "WARN",
        (Status::Fail, Severity::Warn, true) => "warn",
        (Status::Fail, Severity::Fail, _) => "FAIL",
    }
}

/// "outputs:" and the paths the run's stages wrote (or found up to date); past a dozen, only the
/// final ones (those no stage reads).
pub fn outputs(dag: &Dag, record: &RunRecord) -> String {
    let workdir = &dag.pipeline().workdir;
    let names: std::collections::BTreeSet<&str> = record
        .stages
        .iter()
        .filter(|s| s.decision.succeeded())
        .map(|s| s.name.as_str())
        .collect();
    let mut all = Vec::new();
    let mut finals = Vec::new();
    for &index in dag.order() {
        let stage = dag.stage(index);
        if !names.contains(stage.name.as_str()) {
            continue;
        }
        let read = !dag.dependents(index).is_empty();
        for port in &stage.outputs {
            let path =
                port.declared.location.display(workdir) + if port.declared.dir { "/" } else { "" };
            if !read {
                finals.push(path.clone());
            }
            all.push(path);
        }
    }
    let (shown, head) = if all.len() <= 12 {
        (all, "outputs:".to_owned())
    } else {
        let total = all.len();
        (
            finals.into_iter().take(12).collect(),
            format!("{total} outputs; the final ones:"),
        )
    };
    let mut out = head;
    for path in shown {
        out.push_str("\n  ");
        out.push_str(&path);
    }
    out
}

fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).to_string()
}

fn when(at: Option<std::time::SystemTime>) -> String {
    at.map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "never".to_owned())
}

/// `imba cache`: how big the run cache is, and how recently it was used.
pub fn cache(root: &std::path::Path, usage: &crate::store::cache::Usage) -> String {
    let rows = [
        ["run cache".to_owned(), root.display().to_string()],
        ["entries".to_owned(), usage.entries.to_string()],
        [
            "blobs".to_owned(),
            format!("{} ({})", usage.blobs, size(usage.bytes)),
        ],
        ["folders".to_owned(), usage.trees.to_string()],
        ["last used".to_owned(), when(usage.newest_use)],
        ["oldest use".to_owned(), when(usage.oldest_use)],
    ];
    table(&rows)
}

/// `imba cache --json`.
pub fn cache_json(usage: &crate::store::cache::Usage) -> serde_json::Value {
    let at = |t: Option<std::time::SystemTime>| {
        t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
    };
    serde_json::json!({
        "entries": usage.entries,
        "blobs": usage.blobs,
        "bytes": usage.bytes,
        "folders": usage.trees,
        "last_used": at(usage.newest_use),
        "oldest_use": at(usage.oldest_use),
    })
}

/// `imba gc`: what went (or, with `--dry-run`, would go).
pub fn removed(removed: &crate::store::cache::Removed, dry_run: bool) -> String {
    let verb = if dry_run { "would remove" } else { "removed" };
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "{verb} {}, {} ({}), {}\n",
        plural(removed.entries, "entry", "entries"),
        plural(removed.blobs, "blob", "blobs"),
        size(removed.bytes),
        plural(removed.trees, "folder manifest", "folder manifests"),
    )
}

/// `imba push`: what went to the remote.
pub fn pushed(pushed: &crate::run::housekeeping::Pushed) -> String {
    let moved = &pushed.moved;
    format!(
        "pushed {} {} to {}: {} {} ({}), {} already there",
        moved.entries,
        if moved.entries == 1 {
            "entry"
        } else {
            "entries"
        },
        pushed.remote,
        moved.blobs,
        if moved.blobs == 1 { "blob" } else { "blobs" },
        size(moved.bytes),
        moved.present
    )
}

/// `imba stages NAME`: a built-in's params from its schema: name, type, default (or
/// `required`), and the first line of its description.
pub fn builtin(builtin: &imba_stages::Builtin) -> String {
    let schema = serde_json::to_value(builtin.params_schema()).unwrap_or_default();
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let mut rows = vec![[
        "PARAM".to_owned(),
        "TYPE".to_owned(),
        "DEFAULT".to_owned(),
        "MEANING".to_owned(),
    ]];
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            let default = if required.contains(&name.as_str()) {
                "required".to_owned()
            } else {
                match property.get("default") {
                    Some(serde_json::Value::Null) | None => "-".to_owned(),
                    Some(value) => value.to_string(),
                }
            };
            // The first sentence, its lines joined.
            let text = property["description"]
                .as_str()
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            let end = text
                .match_indices(". ")
                .map(|(i, _)| i)
                .find(|&i| !(text[..i].ends_with("e.g") || text[..i].ends_with("i.e")));
            let meaning = match end {
                Some(end) => text[..=end].to_owned(),
                None => text,
            };
            rows.push([name.clone(), type_of(property), default, meaning]);
        }
    }
    format!(
        "{} v{}: {}\n\n{}\nEvery param with an example: docs/stages.md#{}\n",
        builtin.name,
        builtin.version,
        builtin.summary,
        table(&rows),
        builtin.name
    )
}

/// A schema's type in a word or two: `integer`, `list of string`, `Cast` (a definition).
fn type_of(schema: &serde_json::Value) -> String {
    if let Some(reference) = schema["$ref"].as_str() {
        return reference.rsplit('/').next().unwrap_or(reference).to_owned();
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(variants) = schema[key].as_array() {
            let names: Vec<String> = variants
                .iter()
                .map(type_of)
                .filter(|t| t != "null")
                .collect();
            return names.join(" or ");
        }
    }
    match &schema["type"] {
        serde_json::Value::String(t) if t == "array" => {
            format!("list of {}", type_of(&schema["items"]))
        }
        serde_json::Value::String(t) if t == "object" => match schema.get("additionalProperties") {
            Some(values) if values.is_object() => format!("map of {}", type_of(values)),
            _ => "map".to_owned(),
        },
        serde_json::Value::String(t) => t.clone(),
        serde_json::Value::Array(ts) => ts
            .iter()
            .filter_map(|t| t.as_str())
            .filter(|t| *t != "null")
            .map(|t| {
                let mut one = schema.clone();
                one["type"] = serde_json::Value::String(t.to_owned());
                type_of(&one)
            })
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".to_owned(),
    }
}

/// A run's `--set`/`--vars` arguments in a line: `out=out/a --vars month.yaml`.
fn overrides(run: &RunRecord) -> String {
    run.overrides
        .iter()
        .map(|o| o.strip_prefix("--set ").unwrap_or(o))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `imba gc --quarantine`: what went (or would go).
pub fn released(released: &crate::run::housekeeping::Released, dry_run: bool) -> String {
    let verb = if dry_run { "would remove" } else { "removed" };
    format!(
        "{verb} the quarantine of {} run{} ({})\n",
        released.runs,
        if released.runs == 1 { "" } else { "s" },
        size(released.bytes)
    )
}

/// One stage's outputs held in quarantine.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Held {
    pub run: String,
    pub stage: String,
    pub folder: String,
    pub bytes: u64,
    /// The checks that kept them out, described.
    pub failed: Vec<String>,
}

/// What checks hold in quarantine now, newest run first: from the run records, for the folders
/// still there.
pub fn quarantined(runs: &[RunRecord]) -> Vec<Held> {
    let mut held = Vec::new();
    for run in runs {
        for stage in &run.stages {
            let Some(folder) = &stage.quarantine else {
                continue;
            };
            let path = std::path::Path::new(folder);
            if !path.is_dir() {
                continue;
            }
            let bytes = crate::store::fs::size_of(path);
            held.push(Held {
                run: run.id.clone(),
                stage: stage.name.clone(),
                folder: folder.clone(),
                bytes,
                failed: stage
                    .checks
                    .iter()
                    .filter(|c| c.blocks())
                    .map(crate::run::gate::describe)
                    .collect(),
            });
        }
    }
    held
}

/// `imba quarantine`: one block per held stage.
pub fn quarantine(held: &[Held]) -> String {
    let mut out = String::new();
    for h in held {
        out.push_str(&format!(
            "{} {} ({}): {}\n",
            h.run,
            h.stage,
            size(h.bytes),
            h.folder
        ));
        for failed in &h.failed {
            out.push_str(&format!("  {failed}\n"));
        }
    }
    out
}
