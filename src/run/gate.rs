//! What happens between a stage writing its outputs and imba committing them: the stage's
//! `checks:`, the quarantine of outputs that failed them, and the `on_failure` hook.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use imba_stages::checks::{self, Status};
use serde_json::json;

use crate::model::{file_name, Hook, Port, Severity, Stage, StageCheck};
use crate::state::record::{CheckRecord, HookRecord, StageRecord};
use crate::store::Baseline;

use super::failure::StageFailure;
use super::{Context, Event};

/// How long an `on_failure` hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// The check gate: evaluates the stage's checks (its own `checks:`; a built-in's come with it
/// in `record`), warns of those that missed with `warn`, and, when one with `fail` missed, keeps
/// the staged outputs in quarantine instead of committing them. Gives how many checks passed.
///
/// `restored`: the outputs come from the run cache, and these are the stage's checks as they
/// were evaluated when it was computed. Every check is evaluated again on the restored outputs
/// but a `change` check, whose result is the one recorded then: it measured that computation
/// against the output it replaced, and a restore is not a new computation (docs/caching.md).
/// Month over month: the previous partition's instance, if this run has it, commits (or fails)
/// before a computed stage's checks, so that they compare with what it just computed. Whether
/// this stage has such an instance to wait for.
pub(super) fn waits_for_previous(ctx: &Context, index: usize) -> Option<usize> {
    ctx.dag
        .previous_partition(index)
        .filter(|previous| ctx.selected.contains(previous))
}

pub(super) async fn gate(
    ctx: &Arc<Context>,
    index: usize,
    staged: &[PathBuf],
    record: &mut StageRecord,
    restored: Option<Vec<CheckRecord>>,
    set_aside: Vec<(PathBuf, Option<PathBuf>)>,
) -> Result<usize, StageFailure> {
    let stage = ctx.dag.stage(index);
    if !stage.checks.is_empty() {
        let evaluated = {
            let ctx = ctx.clone();
            let staged = staged.to_vec();
            tokio::task::spawn_blocking(move || {
                let clock = std::time::Instant::now();
                let stage = ctx.dag.stage(index);
                // An output written in place: its previous content is where it was set aside.
                let kept_aside = |port: &Port| {
                    let target = port.declared.location.local_path()?;
                    set_aside.iter().find(|(t, _)| t == target).map(|(_, kept)| kept)
                };
                let baseline = |port: &Port| match (&restored, kept_aside(port)) {
                    (Some(_), _) => None,
                    (None, Some(kept)) => kept.clone().filter(|k| k.exists()),
                    (None, None) => baseline(&ctx, stage, port),
                };
                let previous = |output: usize| match &restored {
                    Some(_) => PreviousOutput::Missing("restored".to_owned()),
                    None => previous_output(&ctx, stage, output),
                };
                // Checks of a table Spark wrote just now run on the cluster; a restored one is
                // here already.
                let mut on_cluster = match (&restored, stage.engine) {
                    (None, crate::model::Engine::Spark) => super::execute::checks_on_cluster(
                        &ctx.dag.pipeline().engines.spark,
                        &stage.name,
                    ),
                    _ => None,
                };
                let mut records = evaluate(
                    stage,
                    &staged,
                    &ctx.dag.pipeline().workdir,
                    &baseline,
                    &previous,
                    on_cluster.as_mut(),
                );
                if let Some(recorded) = restored {
                    for ((check, record), then) in
                        stage.checks.iter().zip(records.iter_mut()).zip(recorded)
                    {
                        if matches!(check.check, checks::Check::Change { .. }) {
                            *record = then;
                        }
                    }
                }
                tracing::debug!(stage = %stage.name, elapsed = ?clock.elapsed(), "checks evaluated");
                records
            })
            .await
        };
        match evaluated {
            Ok(records) => record.checks.extend(records),
            Err(e) => return Err(StageFailure::Other(format!("internal error: {e}"))),
        }
    }
    for missed in record
        .checks
        .iter()
        .filter(|c| c.status != Status::Pass && !c.blocks())
    {
        ctx.events.event(Event::Warning(format!(
            "stage `{}`: {}",
            stage.name,
            describe(missed)
        )));
    }
    let blocking: Vec<String> = record
        .checks
        .iter()
        .filter(|c| c.blocks())
        .map(describe)
        .collect();
    if blocking.is_empty() {
        if !stage.metrics.is_empty() {
            let ctx2 = ctx.clone();
            let staged = staged.to_vec();
            let measured = tokio::task::spawn_blocking(move || {
                crate::plan::measure(ctx2.dag.stage(index), &staged)
            })
            .await;
            let (metrics, problems) = measured.unwrap_or_default();
            for problem in problems {
                ctx.events
                    .event(Event::Warning(format!("stage `{}`: {problem}", stage.name)));
            }
            record.metrics = metrics;
        }
        return Ok(record
            .checks
            .iter()
            .filter(|c| c.status == Status::Pass)
            .count());
    }
    let quarantine_dir = ctx
        .state
        .quarantine(&ctx.run_id)
        .join(file_name(&stage.name));
    let kept = quarantine(stage, staged, &ctx.dag.pipeline().workdir, &quarantine_dir);
    let count = if blocking.len() == 1 {
        "a check failed".to_owned()
    } else {
        format!("{} checks failed", blocking.len())
    };
    let mut error = format!(
        "{count}; the outputs were not committed\n  {}",
        blocking.join("\n  ")
    );
    if record
        .checks
        .iter()
        .any(|c| c.blocks() && c.check.get("change").is_some())
    {
        if stage.partition.is_some() {
            error.push_str(&format!(
                "\n  a `change` check compares with the output committed before: when the change is real, `imba accept {} {} --reason …` commits the quarantined outputs",
                ctx.run_id, stage.name
            ));
        } else {
            error.push_str("\n  a `change` check compares with the output committed at the same path: give a deliberately different run its own output folder (e.g. --set out=…), or relax the check");
        }
    }
    match kept {
        Ok(()) => {
            error.push_str(&format!(
                "\n  the new outputs are kept for inspection in {}",
                quarantine_dir.display()
            ));
            record.quarantine = Some(quarantine_dir.display().to_string());
        }
        Err(e) => error.push_str(&format!(
            "\n  the new outputs could not be kept in {} ({e}) and were discarded",
            quarantine_dir.display()
        )),
    }
    Err(StageFailure::Checks(error))
}

/// The committed content a `change` check of `port` compares with: the latest version of a
/// versioned output, else what imba committed there (not what was changed since by hand).
fn baseline(ctx: &Context, stage: &Stage, port: &Port) -> Option<PathBuf> {
    if stage.versioning.is_some() {
        return ctx.store.latest_version(&port.declared);
    }
    let key = port.declared.location.display(&ctx.dag.pipeline().workdir);
    let recorded = ctx
        .locked(&stage.name)
        .and_then(|s| s.outputs.get(&key).map(|h| h.hash.clone()));
    match ctx.store.baseline(&port.declared, recorded.as_deref()) {
        Baseline::Found(path) => Some(path),
        Baseline::None => None,
        Baseline::Modified => {
            ctx.events.event(Event::Warning(format!(
                "`{key}` was changed after imba committed it: the `change` checks of stage `{}` have no baseline this run",
                stage.name
            )));
            None
        }
    }
}

/// What `change: {against: previous}` compares with: the same output of the previous
/// partition's instance as committed now (by an earlier run, or earlier in this one), or why
/// there is none.
#[derive(Debug, Clone)]
pub enum PreviousOutput {
    Table {
        path: PathBuf,
        then: String,
        now: String,
    },
    Missing(String),
}

fn previous_output(ctx: &Context, stage: &Stage, output: usize) -> PreviousOutput {
    let Some(partition) = &stage.partition else {
        return PreviousOutput::Missing("the stage is not partitioned".to_owned());
    };
    let Some(key) = &partition.previous else {
        return PreviousOutput::Missing(format!(
            "{} is the first partition of `{}`",
            partition.key, partition.set
        ));
    };
    let name = partition.sibling(&stage.name, key);
    let index = ctx.dag.index_of(&name);
    // What the month before committed earlier is not what it is now: no baseline.
    let why = match index.and_then(|i| ctx.ended(i)) {
        Some(super::Ended::Failed) => Some(format!("`{name}` failed in this run")),
        Some(super::Ended::NotRun) => Some(format!("`{name}` did not run in this run")),
        _ => None,
    };
    if let Some(why) = why {
        ctx.events.event(Event::Warning(format!(
            "stage `{}`: its month-over-month check has no baseline: {why}; once {key} is committed, `--stage {} --force` checks it",
            stage.name, stage.name
        )));
        return PreviousOutput::Missing(why);
    }
    let sibling = index.map(|i| ctx.dag.stage(i));
    let Some(port) = sibling.and_then(|s| s.outputs.get(output)) else {
        return PreviousOutput::Missing(format!("{key} has no stage `{name}`"));
    };
    if ctx.locked(&name).is_none() {
        return PreviousOutput::Missing(format!("{key} has not run"));
    }
    match sibling.and_then(|sibling| baseline(ctx, sibling, port)) {
        Some(path) => PreviousOutput::Table {
            path,
            then: key.clone(),
            now: partition.key.clone(),
        },
        None => PreviousOutput::Missing(format!("{key} has no committed output")),
    }
}

/// Runs the `on_failure` hook of a failed stage (or the pipeline's), and records it.
pub(super) async fn after_failure(
    ctx: &Context,
    stage: &Stage,
    mut record: StageRecord,
) -> StageRecord {
    let pipeline = ctx.dag.pipeline();
    let Some(hook) = stage.on_failure.as_ref().or(pipeline.on_failure.as_ref()) else {
        return record;
    };
    let payload = hook_payload(&pipeline.file, &ctx.run_id, &record);
    let log = ctx
        .state
        .logs(&ctx.run_id)
        .join(format!("{}.on_failure.log", file_name(&stage.name)));
    let pipeline_file = pipeline.file.display().to_string();
    let env = [
        ("IMBA_STAGE", stage.name.as_str()),
        ("IMBA_RUN", ctx.run_id.as_str()),
        ("IMBA_PIPELINE", pipeline_file.as_str()),
    ];
    let hook_record = run_hook(hook, &payload, &pipeline.workdir, &env, &log).await;
    if let Some(error) = &hook_record.error {
        ctx.events.event(Event::Warning(format!(
            "the on_failure hook of stage `{}` failed too ({error}): {}\n  its log: {}",
            stage.name, hook.command, hook_record.log
        )));
    }
    record.hook = Some(hook_record);
    record
}

/// Evaluates the stage's checks on its staged outputs (`staged`, in output order), each table
/// read once, against what is committed at the final locations (`committed` gives a local copy
/// of a committed S3 output, only asked for when a `change` check needs it). Records come back
/// in the order the checks are written. `previous` gives the previous partition's output of the
/// same position, for `change: {against: previous}`. `on_cluster` evaluates them on Spark instead,
/// for a Parquet table a Spark stage wrote.
pub fn evaluate(
    stage: &Stage,
    staged: &[PathBuf],
    workdir: &Path,
    committed: &dyn Fn(&crate::model::Port) -> Option<PathBuf>,
    previous: &dyn Fn(usize) -> PreviousOutput,
    mut on_cluster: Option<&mut super::execute::ClusterChecks>,
) -> Vec<CheckRecord> {
    // Checks of the same table, together.
    let mut tables: BTreeMap<(usize, Option<&str>), Vec<usize>> = BTreeMap::new();
    for (i, check) in stage.checks.iter().enumerate() {
        tables
            .entry((check.output, check.file.as_deref()))
            .or_default()
            .push(i);
    }
    let mut records: Vec<Option<CheckRecord>> = vec![None; stage.checks.len()];
    for ((output, file), indices) in tables {
        let port = &stage.outputs[output];
        let mut shown = port.declared.location.display(workdir);
        let mut table = staged[output].clone();
        let compares = |against: checks::Against| {
            indices.iter().any(|&i| {
                matches!(stage.checks[i].check, checks::Check::Change { against: a, .. } if a == against)
            })
        };
        let mut committed = if compares(checks::Against::Committed) {
            committed(port)
        } else {
            None
        };
        let mut previous = if compares(checks::Against::Previous) {
            previous(output)
        } else {
            PreviousOutput::Missing(String::new())
        };
        if let Some(file) = file {
            shown = format!("{}/{file}", shown.trim_end_matches('/'));
            table = table.join(file);
            committed = committed.map(|c| c.join(file));
            if let PreviousOutput::Table { path, .. } = &mut previous {
                *path = path.join(file);
            }
        }
        let list: Vec<checks::Check> = indices
            .iter()
            .map(|&i| stage.checks[i].check.clone())
            .collect();
        let verdicts = if table.is_file() {
            let previous = match &previous {
                PreviousOutput::Table { path, then, now } if path.is_file() => {
                    checks::Previous::Table {
                        path,
                        then: then.clone(),
                        now: now.clone(),
                    }
                }
                PreviousOutput::Table { then, .. } => {
                    checks::Previous::Missing(format!("{then} has no committed output"))
                }
                PreviousOutput::Missing(why) => checks::Previous::Missing(why.clone()),
            };
            let baselines = checks::Baselines {
                committed: committed.as_deref().filter(|c| c.is_file()),
                previous,
            };
            match on_cluster.as_mut() {
                Some(on_cluster) if !imba_stages::io::table::is_csv(&table) => {
                    on_cluster(&list, &table, &baselines)
                }
                _ => checks::evaluate(&list, &table, &baselines),
            }
        } else {
            let detail = format!("the stage did not write `{shown}`");
            list.iter()
                .map(|_| checks::Verdict {
                    status: Status::Error,
                    value: serde_json::Value::Null,
                    detail: detail.clone(),
                })
                .collect()
        };
        for (&i, verdict) in indices.iter().zip(verdicts) {
            records[i] = Some(record_of(&stage.checks[i], &shown, verdict));
        }
    }
    records.into_iter().flatten().collect()
}

fn record_of(check: &StageCheck, output: &str, verdict: checks::Verdict) -> CheckRecord {
    CheckRecord {
        name: check.name.clone(),
        check: check.check.to_json(),
        severity: check.severity,
        output: output.to_owned(),
        status: verdict.status,
        value: verdict.value,
        expected: check.check.expected(),
        detail: verdict.detail,
    }
}

/// One line for a check that did not pass: `rows: 3 rows, expected ≥ 1000`.
pub fn describe(record: &CheckRecord) -> String {
    let status = match (record.status, record.severity) {
        (Status::Error, _) => " could not be evaluated",
        (Status::Undefined, _) => " is undefined",
        (_, Severity::Warn) => " missed (warn)",
        _ => "",
    };
    format!(
        "check `{}`{status} on {}: {}",
        record.name, record.output, record.detail
    )
}

/// Moves the staged outputs under `quarantine/`, each at its path relative to the workdir (so
/// `out/cleaned/orders.parquet` lands at `quarantine/out/cleaned/orders.parquet`).
pub fn quarantine(
    stage: &Stage,
    staged: &[PathBuf],
    workdir: &Path,
    quarantine: &Path,
) -> std::io::Result<()> {
    for (i, (port, path)) in stage.outputs.iter().zip(staged).enumerate() {
        if !path.exists() {
            continue;
        }
        let target = quarantine_path(port, i, workdir, quarantine);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(path, &target)?;
    }
    Ok(())
}

/// Where the `i`-th output `port` of a stage is kept in its quarantine folder: at its path
/// relative to the workdir, or (an S3 output, one outside the workdir) `i/NAME`.
pub fn quarantine_path(port: &Port, i: usize, workdir: &Path, quarantine: &Path) -> PathBuf {
    let relative = port
        .declared
        .location
        .relative_path(workdir)
        .unwrap_or_else(|| Path::new(&i.to_string()).join(output_name(port)));
    quarantine.join(relative)
}

/// The file name an output is staged (and quarantined) under: the last segment of its
/// declared path.
pub(super) fn output_name(port: &Port) -> &str {
    port.text
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .unwrap_or("output")
}

/// What a hook is told, as JSON on its stdin.
pub fn hook_payload(pipeline: &Path, run: &str, record: &StageRecord) -> serde_json::Value {
    json!({
        "event": "stage_failed",
        "pipeline": pipeline.display().to_string(),
        "run": run,
        "stage": record.name,
        "error": record.error,
        "reasons": record.reasons,
        "checks": record.checks,
        "quarantine": record.quarantine,
        "log": record.log,
    })
}

/// Runs `hook` in `workdir` with `payload` on stdin, its output appended to `log`. Never fails:
/// what went wrong comes back in the record, to be reported next to the failure it was for.
pub async fn run_hook(
    hook: &Hook,
    payload: &serde_json::Value,
    workdir: &Path,
    env: &[(&str, &str)],
    log: &Path,
) -> HookRecord {
    use tokio::io::AsyncWriteExt;
    let mut record = HookRecord {
        command: hook.command.clone(),
        exit_status: None,
        error: None,
        log: log.display().to_string(),
    };
    let open = || {
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        Ok::<_, std::io::Error>((file.try_clone()?, file))
    };
    let (stdout, stderr) = match open() {
        Ok(files) => files,
        Err(e) => {
            record.error = Some(format!("cannot open its log {}: {e}", log.display()));
            return record;
        }
    };
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(&hook.command)
        .current_dir(workdir)
        .stdin(std::process::Stdio::piped())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            record.error = Some(format!("cannot start `sh`: {e}"));
            return record;
        }
    };
    let pid = child.id();
    if let Some(mut stdin) = child.stdin.take() {
        let mut text = payload.to_string();
        text.push('\n');
        // A hook that does not read its stdin closes the pipe early; that is its business.
        let _ = stdin.write_all(text.as_bytes()).await;
    }
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            record.exit_status = status.code();
            if !status.success() {
                record.error = Some(match (status.code(), status.signal()) {
                    (Some(code), _) => format!("exit status {code}"),
                    (None, Some(signal)) => format!("killed by signal {signal}"),
                    _ => "failed".to_owned(),
                });
            }
        }
        Ok(Err(e)) => record.error = Some(format!("cannot wait for it: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                // The whole process group: the shell and whatever it started.
                unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
            }
            let _ = child.wait().await;
            record.error = Some(format!(
                "timed out after {} s and was killed",
                HOOK_TIMEOUT.as_secs()
            ));
        }
    }
    record
}
