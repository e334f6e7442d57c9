//! Running a pipeline: the scheduler, shell and built-in stages, staging and commit.
//!
//! Stages run on tokio, at most `jobs` at a time, each as soon as what it needs is done. When a
//! stage becomes ready its inputs are hashed and its fingerprint compared with the lock file, so a
//! stage whose upstream re-ran but wrote identical bytes is skipped (early cutoff). A running
//! stage writes only to staging paths under `.imba/staging/`; its outputs are moved into place
//! only after it succeeded and its `fail` checks passed (else they go to quarantine, see
//! [`crate::checks`]), and its lock entry is written only after that. Hashing, commits and
//! built-in stages run on blocking threads, never on the runtime's workers.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imba_stages::{Registry, StageIo};
use serde_json::{Map, Value as Json};
use tokio::sync::watch;

use crate::config::resolve::{file_name, ports_json};
use crate::config::{Port, Stage, StageKind};
use crate::dag::Dag;
use crate::hash::{ContentHash, StatCache};
use crate::interrupt::Stop;
use crate::lock::{self, LockFile, LockedStage};
use crate::plan::{self, Reason, Selection};
use crate::record::{self, RunRecord, StageRecord};
use crate::state::StateDir;

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub jobs: usize,
    pub selection: Selection,
    pub keep_going: bool,
    /// Fail at once instead of waiting when another run holds the lock.
    pub no_wait: bool,
    /// Asks the run to stop: [`Stop::Cancel`] cancels running stages and starts nothing new,
    /// [`Stop::Kill`] kills them and stops waiting. The CLI feeds Ctrl-C and SIGTERM into it
    /// ([`crate::interrupt::listen`]); `imba watch` also cancels for `--restart`.
    pub stop: watch::Receiver<Stop>,
}

/// Something worth telling the person watching a run.
#[derive(Debug, Clone)]
pub enum Event {
    Waiting {
        pid: Option<u32>,
    },
    Started {
        run: String,
        stages: usize,
    },
    StageRunning {
        name: String,
        reasons: Vec<String>,
    },
    StageSkipped {
        name: String,
    },
    StageDone {
        name: String,
        duration: Duration,
        unchanged: bool,
        /// How many of its checks passed (the others missed with `warn`, and were warned of).
        checks_passed: usize,
    },
    StageFailed {
        name: String,
        error: String,
        log: Option<PathBuf>,
        /// The param the error is about, in the pipeline file.
        param: Option<crate::diagnostic::Span>,
    },
    StageBlocked {
        name: String,
        by: String,
    },
    StageCancelled {
        name: String,
    },
    Warning(String),
}

/// Where events go (the printer, on a terminal or not).
pub trait Events: Send + Sync {
    fn event(&self, event: Event);
}

/// Why a run could not start at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("another imba run holds the lock on {0} (--no-wait was given)")]
    Busy(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
}

/// How a run ended.
#[derive(Debug)]
pub struct RunSummary {
    pub record: RunRecord,
    pub failed: bool,
    pub interrupted: bool,
}

#[derive(Debug, Clone)]
enum Outcome {
    Ran { record: StageRecord },
    Skipped { record: StageRecord },
    Failed { record: StageRecord },
    Cancelled { record: StageRecord },
}

impl Outcome {
    fn record(self) -> StageRecord {
        match self {
            Outcome::Ran { record }
            | Outcome::Skipped { record }
            | Outcome::Failed { record }
            | Outcome::Cancelled { record } => record,
        }
    }
}

struct Context {
    dag: Arc<Dag>,
    registry: Registry,
    cache: StatCache,
    storage: crate::storage::Storage,
    lock: Mutex<(LockFile, lock::Journal)>,
    lock_path: PathBuf,
    state: StateDir,
    run_id: String,
    events: Arc<dyn Events>,
    cancel: watch::Receiver<Stop>,
}

fn stage_record(name: &str, decision: &str) -> StageRecord {
    StageRecord {
        name: name.to_owned(),
        decision: decision.to_owned(),
        reasons: Vec::new(),
        fingerprint: None,
        duration_ms: 0,
        exit_status: None,
        error: None,
        unchanged: false,
        outputs: BTreeMap::new(),
        log: None,
        report: None,
        checks: Vec::new(),
        quarantine: None,
        hook: None,
    }
}

/// Loads the lock file for a run or a status, with the journal of an interrupted run replayed
/// onto it: a corrupt lock file is treated as empty (with a warning), one from a newer imba is an
/// error.
pub fn load_lock(
    path: &Path,
    state: &StateDir,
    warn: impl Fn(String),
) -> Result<LockFile, RunError> {
    let mut lock = read_lock(path, warn)?;
    lock::replay(&mut lock, &lock::journal_path(&state.root, path));
    Ok(lock)
}

fn read_lock(path: &Path, warn: impl Fn(String)) -> Result<LockFile, RunError> {
    match lock::load(path) {
        lock::Loaded::Found(lock) => Ok(lock),
        lock::Loaded::Missing => Ok(LockFile {
            version: lock::LOCK_FORMAT,
            stages: BTreeMap::new(),
        }),
        lock::Loaded::Corrupt(message) => {
            warn(format!("{message}; every stage is treated as stale, and the next run rewrites it"));
            Ok(LockFile {
                version: lock::LOCK_FORMAT,
                stages: BTreeMap::new(),
            })
        }
        lock::Loaded::Unreadable(message) => Err(RunError::Config(message)),
        lock::Loaded::TooNew(version) => Err(RunError::Config(format!(
            "lock file `{}` was written by a newer imba (format {version}; this imba reads format {})",
            path.display(),
            lock::LOCK_FORMAT
        ))),
    }
}

/// What is stale among the selected stages, and why, without running anything: `imba status`,
/// `run --dry-run`, and `imba watch` before it starts a run.
pub fn status(
    dag: &Dag,
    selection: &Selection,
    warn: impl Fn(String),
) -> Result<Vec<plan::StageStatus>, RunError> {
    let pipeline = dag.pipeline();
    let state = StateDir::new(&pipeline.workdir);
    let lock = load_lock(&lock::lock_path(&pipeline.file), &state, warn)?;
    let (selected, forced) = plan::select(dag, selection).map_err(RunError::Config)?;
    let cache = if state.root.is_dir() {
        StatCache::load(state.stat_cache())
    } else {
        StatCache::in_memory()
    };
    let storage = crate::storage::Storage::new(pipeline.storage.clone(), state.cache());
    let hashes = plan::Hashes {
        cache: &cache,
        storage: &storage,
    };
    let statuses = plan::static_plan(dag, &lock, hashes, &selected, &forced)
        .map_err(|e| RunError::Io(e.to_string()))?;
    // Remember what was hashed, so the next status (or run) does not read the same files again.
    let _ = cache.save();
    Ok(statuses)
}

/// Runs what is stale in `dag`.
pub fn run(
    dag: Arc<Dag>,
    registry: Registry,
    options: RunOptions,
    events: Arc<dyn Events>,
) -> Result<RunSummary, RunError> {
    let pipeline = dag.pipeline();
    let state = StateDir::new(&pipeline.workdir);
    let held = state
        .lock(!options.no_wait, |pid| events.event(Event::Waiting { pid }))
        .map_err(|e| RunError::Io(format!("cannot lock {}: {e}", state.root.display())))?;
    let Some(_held) = held else {
        return Err(RunError::Busy(state.root.display().to_string()));
    };
    let lock_path = lock::lock_path(&pipeline.file);
    let lock = load_lock(&lock_path, &state, |w| events.event(Event::Warning(w)))?;
    let mut journal =
        lock::Journal::open(&lock::journal_path(&state.root, &lock_path)).map_err(|e| {
            RunError::Io(format!(
                "cannot open the run journal under {}: {e}",
                state.root.display()
            ))
        })?;
    // Whatever an interrupted run committed is in `lock` now; make it durable before going on.
    journal.checkpoint(&lock_path, &lock).map_err(|e| {
        RunError::Io(format!(
            "cannot write the lock file {}: {e}",
            lock_path.display()
        ))
    })?;
    let (selected, forced) = plan::select(&dag, &options.selection).map_err(RunError::Config)?;
    let run_id = crate::state::new_run_id();
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut record = RunRecord {
        id: run_id.clone(),
        pipeline: pipeline.file.display().to_string(),
        started,
        finished: None,
        status: "running".to_owned(),
        duration_ms: 0,
        stages: Vec::new(),
    };
    let _ = record::save(&state.runs(), &record);
    let clock = Instant::now();
    events.event(Event::Started {
        run: run_id.clone(),
        stages: selected.len(),
    });

    let (cancel_tx, cancel_rx) = watch::channel(Stop::Go);
    let warnings = events.clone();
    let ctx = Arc::new(Context {
        cache: StatCache::load(state.stat_cache()),
        storage: crate::storage::Storage::new(pipeline.storage.clone(), state.cache())
            .with_cancel(cancel_rx.clone())
            .with_warnings(Arc::new(move |w| warnings.event(Event::Warning(w)))),
        dag: dag.clone(),
        registry,
        lock: Mutex::new((lock, journal)),
        lock_path,
        state: state.clone(),
        run_id: run_id.clone(),
        events: events.clone(),
        cancel: cancel_rx,
    });
    // Every S3 identity the decisions need, at once rather than one request after another.
    ctx.storage.prefetch(plan::s3_lookups(&dag, &selected));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.jobs.clamp(1, 4))
        .enable_all()
        .build()
        .map_err(|e| RunError::Io(format!("cannot start the runtime: {e}")))?;
    let (outcomes, interrupted) = {
        let _armed = crate::interrupt::arm();
        runtime.block_on(schedule(
            ctx.clone(),
            &selected,
            &forced,
            &options,
            cancel_tx,
        ))
    };
    // After a kill, a built-in stage may still be computing on a blocking thread: leave it, it
    // writes only to this run's staging directory, which nothing commits.
    runtime.shutdown_background();

    {
        let mut guard = ctx.lock.lock().unwrap_or_else(|e| e.into_inner());
        let (lock, journal) = &mut *guard;
        if let Err(e) = journal.checkpoint(&ctx.lock_path, lock) {
            events.event(Event::Warning(format!(
                "cannot write the lock file {} ({e}); the journal {} keeps what this run committed",
                ctx.lock_path.display(),
                journal.path().display()
            )));
        }
    }
    if let Err(e) = ctx.cache.save() {
        events.event(Event::Warning(format!("cannot save the stat cache: {e}")));
    }
    let _ = std::fs::remove_dir_all(state.staging(&run_id));
    let failed = outcomes
        .values()
        .any(|o| matches!(o, Outcome::Failed { .. }));
    record.stages = dag
        .order()
        .iter()
        .filter_map(|i| outcomes.get(i).cloned().map(Outcome::record))
        .collect();
    record.finished =
        Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
    record.duration_ms = clock.elapsed().as_millis() as u64;
    record.status = if interrupted {
        "interrupted"
    } else if failed {
        "failed"
    } else {
        "ok"
    }
    .to_owned();
    if let Err(e) = record::save(&state.runs(), &record) {
        events.event(Event::Warning(format!("cannot save the run record: {e}")));
    }
    Ok(RunSummary {
        record,
        failed,
        interrupted,
    })
}

async fn schedule(
    ctx: Arc<Context>,
    selected: &BTreeSet<usize>,
    forced: &BTreeSet<usize>,
    options: &RunOptions,
    cancel: watch::Sender<Stop>,
) -> (BTreeMap<usize, Outcome>, bool) {
    let dag = ctx.dag.clone();
    let position = dag.positions();
    let mut waiting: BTreeMap<usize, usize> = selected
        .iter()
        .map(|&s| {
            (
                s,
                dag.needs(s)
                    .iter()
                    .filter(|(d, _)| selected.contains(d))
                    .count(),
            )
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<(usize, usize)>> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(s, _)| Reverse((position[*s], *s)))
        .collect();
    let mut outcomes: BTreeMap<usize, Outcome> = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut stopping = false;
    let mut interrupted = false;
    let mut stop = options.stop.clone();
    let mut listening = true;
    loop {
        while !stopping && tasks.len() < options.jobs.max(1) {
            let Some(Reverse((_, stage))) = ready.pop() else {
                break;
            };
            let ctx = ctx.clone();
            let force = forced.contains(&stage);
            tasks.spawn(async move { (stage, run_stage_and_hook(ctx, stage, force).await) });
        }
        if tasks.is_empty() {
            break;
        }
        tokio::select! {
            joined = tasks.join_next() => {
                let Some(joined) = joined else { continue };
                let (stage, outcome) = match joined {
                    Ok(done) => done,
                    Err(e) => {
                        // A panic inside a stage task: report it as that stage's failure.
                        let message = format!("internal error: {e}");
                        ctx.events.event(Event::Warning(message));
                        continue;
                    }
                };
                match &outcome {
                    Outcome::Ran { .. } | Outcome::Skipped { .. } => {
                        for next in dag.dependents(stage) {
                            if let Some(n) = waiting.get_mut(&next) {
                                *n -= 1;
                                if *n == 0 {
                                    ready.push(Reverse((position[next], next)));
                                }
                            }
                        }
                    }
                    Outcome::Failed { .. } if !options.keep_going => {
                        stopping = true;
                        cancel.send_if_modified(|level| {
                            let raise = *level < Stop::Cancel;
                            if raise {
                                *level = Stop::Cancel;
                            }
                            raise
                        });
                    }
                    _ => {}
                }
                outcomes.insert(stage, outcome);
            }
            changed = stop.changed(), if listening => {
                let level = if changed.is_ok() { *stop.borrow_and_update() } else { Stop::Go };
                if level >= Stop::Cancel && !interrupted {
                    interrupted = true;
                    stopping = true;
                    ctx.events.event(Event::Warning("interrupted: cancelling running stages (again to kill them); outputs and lock stay as they were".to_owned()));
                }
                if level > *cancel.borrow() {
                    let _ = cancel.send(level);
                }
                if changed.is_err() {
                    // Nobody can ask any more: stop listening.
                    listening = false;
                } else if level == Stop::Kill {
                    // Commands get SIGKILL from their own tasks; give them a moment to be
                    // reaped, then stop waiting for whatever is still computing.
                    let grace = tokio::time::sleep(Duration::from_secs(1));
                    tokio::pin!(grace);
                    loop {
                        tokio::select! {
                            joined = tasks.join_next() => match joined {
                                Some(Ok((stage, outcome))) => { outcomes.insert(stage, outcome); }
                                Some(Err(_)) => {}
                                None => break,
                            },
                            _ = &mut grace => break,
                        }
                    }
                    tasks.abort_all();
                    break;
                }
            }
        }
    }
    // Whatever never ran: blocked by a failed stage, or cancelled.
    for &stage in dag.order() {
        if !selected.contains(&stage) || outcomes.contains_key(&stage) {
            continue;
        }
        let name = dag.stage(stage).name.clone();
        let failed_upstream = dag
            .ancestors(&BTreeSet::from([stage]))
            .into_iter()
            .find(|a| matches!(outcomes.get(a), Some(Outcome::Failed { .. })));
        let outcome = match failed_upstream {
            Some(by) => {
                let by = dag.stage(by).name.clone();
                ctx.events.event(Event::StageBlocked {
                    name: name.clone(),
                    by: by.clone(),
                });
                let mut record = stage_record(&name, "blocked");
                record.reasons.push(format!("upstream {by} failed"));
                Outcome::Cancelled { record }
            }
            None => {
                ctx.events
                    .event(Event::StageCancelled { name: name.clone() });
                Outcome::Cancelled {
                    record: stage_record(&name, "cancelled"),
                }
            }
        };
        outcomes.insert(stage, outcome);
    }
    (outcomes, interrupted)
}

/// Runs the stage and, when it failed, its `on_failure` hook (or the pipeline's).
async fn run_stage_and_hook(ctx: Arc<Context>, index: usize, force: bool) -> Outcome {
    let outcome = run_stage(ctx.clone(), index, force).await;
    let Outcome::Failed { mut record } = outcome else {
        return outcome;
    };
    let stage = ctx.dag.stage(index);
    let pipeline = ctx.dag.pipeline();
    let Some(hook) = stage.on_failure.as_ref().or(pipeline.on_failure.as_ref()) else {
        return Outcome::Failed { record };
    };
    let payload = crate::checks::hook_payload(&pipeline.file, &ctx.run_id, &record);
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
    let hook_record = crate::checks::run_hook(hook, &payload, &pipeline.workdir, &env, &log).await;
    if let Some(error) = &hook_record.error {
        ctx.events.event(Event::Warning(format!(
            "the on_failure hook of stage `{}` failed too ({error}): {}\n  its log: {}",
            stage.name, hook.command, hook_record.log
        )));
    }
    record.hook = Some(hook_record);
    Outcome::Failed { record }
}

/// Decides whether `index` must run, and runs it.
async fn run_stage(ctx: Arc<Context>, index: usize, force: bool) -> Outcome {
    // Borrowed from the shared graph, never cloned: a no-op run of many stages stays cheap.
    let dag = ctx.dag.clone();
    let stage = dag.stage(index);
    let workdir = dag.pipeline().workdir.clone();
    let started = Instant::now();
    let decided = {
        let ctx = ctx.clone();
        tokio::task::spawn_blocking(move || {
            let stage = ctx.dag.stage(index);
            let workdir = &ctx.dag.pipeline().workdir;
            let hashes = plan::Hashes {
                cache: &ctx.cache,
                storage: &ctx.storage,
            };
            let now = plan::snapshot(stage, workdir, hashes)?;
            let locked = ctx
                .lock
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .stages
                .get(&stage.name)
                .cloned();
            let reasons = plan::reasons(stage, &now, locked.as_ref(), workdir, hashes)?;
            Ok::<_, plan::HashError>((now, locked, reasons))
        })
        .await
    };
    let mut record = stage_record(&stage.name, "ran");
    let (now, locked, mut reasons) = match decided {
        Ok(Ok(decided)) => decided,
        Ok(Err(e)) => return fail(&ctx, record, e.to_string(), None),
        Err(e) => return fail(&ctx, record, format!("internal error: {e}"), None),
    };
    record.fingerprint = Some(now.fingerprint.clone());
    if force {
        reasons.insert(0, Reason::Forced);
    }
    tracing::debug!(stage = %stage.name, fingerprint = %now.fingerprint, ?reasons, "decided");
    if reasons.is_empty() {
        record.decision = "skipped".to_owned();
        ctx.events.event(Event::StageSkipped {
            name: stage.name.clone(),
        });
        return Outcome::Skipped { record };
    }
    record.reasons = reasons.iter().map(ToString::to_string).collect();
    if let Some(Reason::InputMissing { path }) = reasons
        .iter()
        .find(|r| matches!(r, Reason::InputMissing { .. }))
    {
        return fail(&ctx, record, format!("input `{path}` is missing"), None);
    }
    if *ctx.cancel.borrow() >= Stop::Cancel {
        record.decision = "cancelled".to_owned();
        ctx.events.event(Event::StageCancelled {
            name: stage.name.clone(),
        });
        return Outcome::Cancelled { record };
    }
    ctx.events.event(Event::StageRunning {
        name: stage.name.clone(),
        reasons: record.reasons.clone(),
    });

    let staging_root = ctx.state.staging(&ctx.run_id).join(file_name(&stage.name));
    let staged: Vec<PathBuf> = stage
        .outputs
        .iter()
        .enumerate()
        .map(|(i, port)| staging_path(&staging_root, i, port))
        .collect();
    if let Err(e) = prepare_staging(stage, &staged) {
        return fail(
            &ctx,
            record,
            format!(
                "cannot prepare staging under {}: {e}",
                staging_root.display()
            ),
            None,
        );
    }

    // S3 inputs are read from local copies (downloaded once per ETag).
    let inputs = {
        let ctx = ctx.clone();
        tokio::task::spawn_blocking(move || local_inputs(&ctx, ctx.dag.stage(index)))
            .await
            .unwrap_or_else(|e| Err(format!("internal error: {e}")))
    };
    let inputs = match inputs {
        Ok(inputs) => inputs,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging_root);
            return failed_unless_cancelled(&ctx, record, error);
        }
    };

    // A built-in's error may name one of its params.
    let mut param_error: Option<String> = None;
    let executed = match &stage.kind {
        StageKind::Shell {
            templates, argv, ..
        } => {
            run_shell(
                &ctx,
                stage,
                templates,
                *argv,
                &inputs,
                &staged,
                &workdir,
                &mut record,
            )
            .await
        }
        StageKind::Builtin { name, params, .. } => {
            let io = StageIo {
                inputs: stage
                    .inputs
                    .iter()
                    .zip(&inputs)
                    .map(|(p, path)| (p.name.clone(), path.clone()))
                    .collect(),
                outputs: stage
                    .outputs
                    .iter()
                    .zip(&staged)
                    .map(|(p, s)| (p.name.clone(), s.clone()))
                    .collect(),
                cancel: imba_stages::Cancel::default(),
            };
            run_builtin(&ctx, stage, name, params, io, &mut record, &mut param_error).await
        }
    };
    if let Err((error, log)) = executed {
        let _ = std::fs::remove_dir_all(&staging_root);
        // Killed by the cancel's signal (a command), or stopped by its flag (a built-in stage).
        let stopped = (record.exit_status.is_none_or(|s| s != 0) && error.contains("signal"))
            || error == imba_stages::CANCELLED;
        if *ctx.cancel.borrow() >= Stop::Cancel && stopped {
            record.decision = "cancelled".to_owned();
            ctx.events.event(Event::StageCancelled {
                name: stage.name.clone(),
            });
            return Outcome::Cancelled { record };
        }
        let param = param_error.and_then(|pointer| stage.param_spans.get(&pointer).copied());
        return fail_at(&ctx, record, error, log, param);
    }

    // The local copies of S3 inputs are shared (with other stages, and later runs): a stage
    // that changed one fails, naming it, and nothing of it is committed.
    let verified = {
        let ctx = ctx.clone();
        let inputs = inputs.clone();
        tokio::task::spawn_blocking(move || {
            let stage = ctx.dag.stage(index);
            for (port, local) in stage.inputs.iter().zip(&inputs) {
                if let crate::location::Location::S3 { .. } = port.declared.location {
                    ctx.storage
                        .verify_cached(local)
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok::<(), String>(())
        })
        .await
        .unwrap_or_else(|e| Err(format!("internal error: {e}")))
    };
    if let Err(error) = verified {
        let _ = std::fs::remove_dir_all(&staging_root);
        return fail(&ctx, record, error, None);
    }

    // Every declared output must have been written.
    for (port, path) in stage.outputs.iter().zip(&staged) {
        if !path.exists() {
            let _ = std::fs::remove_dir_all(&staging_root);
            let hint = match &stage.kind {
                StageKind::Shell { .. } => " (a command must write to `{{ outputs.NAME }}`, a staging path that imba moves into place)",
                StageKind::Builtin { .. } => "",
            };
            return fail(
                &ctx,
                record,
                format!("stage did not write its output `{}`{hint}", port.text),
                None,
            );
        }
    }

    // The checks decide whether the outputs are committed at all.
    if !stage.checks.is_empty() {
        let evaluated = {
            let ctx = ctx.clone();
            let staged = staged.clone();
            tokio::task::spawn_blocking(move || {
                let clock = Instant::now();
                let stage = ctx.dag.stage(index);
                // The committed version of an S3 output, downloaded (once per ETag) when a
                // `change` check compares with it.
                let committed = |port: &crate::config::Port| match &port.declared.location {
                    crate::location::Location::S3 { bucket, key } => {
                        let present = if port.declared.dir {
                            ctx.storage.committed_dir(bucket, key)
                        } else {
                            ctx.storage.identity(bucket, key, false)
                        };
                        match present {
                            Ok(Some(_)) => ctx.storage.fetch(bucket, key, port.declared.dir).ok(),
                            _ => None,
                        }
                    }
                    // A versioned output's baseline is its latest version.
                    crate::location::Location::Local(path) if stage.versioning.is_some() => {
                        crate::versions::latest(path).map(|(_, dir)| dir)
                    }
                    // Only what imba committed there is a baseline: a file changed since (by
                    // hand, or cut short) is not, or a corrupt output could never be repaired.
                    crate::location::Location::Local(path) => {
                        let key = port.declared.location.display(&ctx.dag.pipeline().workdir);
                        let locked = {
                            let guard = ctx.lock.lock().unwrap_or_else(|e| e.into_inner());
                            guard
                                .0
                                .stages
                                .get(&stage.name)
                                .and_then(|s| s.outputs.get(&key))
                                .map(|h| h.hash.clone())
                        };
                        let now = ctx.cache.hash_path(path).ok().flatten().map(|h| h.hash);
                        match locked {
                            Some(hash) if now.is_some() && now != Some(hash.clone()) => {
                                ctx.events.event(Event::Warning(format!(
                                    "`{key}` was changed after imba committed it: the `change` checks of stage `{}` have no baseline this run",
                                    stage.name
                                )));
                                None
                            }
                            _ => Some(path.clone()),
                        }
                    }
                };
                let records = crate::checks::evaluate(
                    stage,
                    &staged,
                    &ctx.dag.pipeline().workdir,
                    &committed,
                );
                tracing::debug!(stage = %stage.name, elapsed = ?clock.elapsed(), "checks evaluated");
                records
            })
            .await
        };
        match evaluated {
            Ok(records) => record.checks.extend(records),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging_root);
                return fail(&ctx, record, format!("internal error: {e}"), None);
            }
        }
    }
    if !record.checks.is_empty() {
        for missed in record
            .checks
            .iter()
            .filter(|c| c.status != imba_stages::checks::Status::Pass && !c.blocks())
        {
            ctx.events.event(Event::Warning(format!(
                "stage `{}`: {}",
                stage.name,
                crate::checks::describe(missed)
            )));
        }
        let blocking: Vec<String> = record
            .checks
            .iter()
            .filter(|c| c.blocks())
            .map(crate::checks::describe)
            .collect();
        if !blocking.is_empty() {
            let quarantine = ctx
                .state
                .quarantine(&ctx.run_id)
                .join(file_name(&stage.name));
            let kept = crate::checks::quarantine(stage, &staged, &workdir, &quarantine);
            let _ = std::fs::remove_dir_all(&staging_root);
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
                error.push_str("\n  a `change` check compares with the output committed at the same path: give a deliberately different run its own output folder (e.g. --set out=…), or relax the check");
            }
            match kept {
                Ok(()) => {
                    error.push_str(&format!(
                        "\n  the new outputs are kept for inspection in {}",
                        quarantine.display()
                    ));
                    record.quarantine = Some(quarantine.display().to_string());
                }
                Err(e) => error.push_str(&format!(
                    "\n  the new outputs could not be kept in {} ({e}) and were discarded",
                    quarantine.display()
                )),
            }
            return fail(&ctx, record, error, None);
        }
    }
    let checks_passed = record
        .checks
        .iter()
        .filter(|c| c.status == imba_stages::checks::Status::Pass)
        .count();

    let committed = {
        let ctx = ctx.clone();
        let staged = staged.clone();
        let report = record
            .report
            .as_ref()
            .and_then(|r| r.get("summary").cloned())
            .unwrap_or(Json::Null);
        tokio::task::spawn_blocking(move || {
            commit(&ctx, ctx.dag.stage(index), &staged, now, locked, report)
        })
        .await
        .unwrap_or_else(|e| Err(format!("internal error: {e}")))
    };
    let _ = std::fs::remove_dir_all(&staging_root);
    match committed {
        Ok((outputs, unchanged)) => {
            record.outputs = outputs;
            record.unchanged = unchanged;
            record.duration_ms = started.elapsed().as_millis() as u64;
            ctx.events.event(Event::StageDone {
                name: stage.name.clone(),
                duration: started.elapsed(),
                unchanged,
                checks_passed,
            });
            Outcome::Ran { record }
        }
        Err(error) => failed_unless_cancelled(&ctx, record, error),
    }
}

/// A stage whose download or upload was abandoned because the run was cancelled (the storage
/// layer drops S3 requests then) is cancelled, not failed.
fn failed_unless_cancelled(ctx: &Context, mut record: StageRecord, error: String) -> Outcome {
    if *ctx.cancel.borrow() >= Stop::Cancel {
        record.decision = "cancelled".to_owned();
        ctx.events.event(Event::StageCancelled {
            name: record.name.clone(),
        });
        return Outcome::Cancelled { record };
    }
    fail(ctx, record, error, None)
}

fn fail(ctx: &Context, record: StageRecord, error: String, log: Option<PathBuf>) -> Outcome {
    fail_at(ctx, record, error, log, None)
}

fn fail_at(
    ctx: &Context,
    mut record: StageRecord,
    error: String,
    log: Option<PathBuf>,
    param: Option<crate::diagnostic::Span>,
) -> Outcome {
    record.decision = "failed".to_owned();
    record.error = Some(error.clone());
    ctx.events.event(Event::StageFailed {
        name: record.name.clone(),
        error,
        log,
        param,
    });
    Outcome::Failed { record }
}

fn staging_path(root: &Path, i: usize, port: &Port) -> PathBuf {
    let name = port
        .text
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .unwrap_or("output");
    root.join(i.to_string()).join(name)
}

fn prepare_staging(stage: &Stage, staged: &[PathBuf]) -> std::io::Result<()> {
    for (port, path) in stage.outputs.iter().zip(staged) {
        if port.declared.dir {
            std::fs::create_dir_all(path)?;
        } else if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
    }
    Ok(())
}

/// The local path of each input: the input itself, or the local copy of an S3 one.
fn local_inputs(ctx: &Context, stage: &Stage) -> Result<Vec<PathBuf>, String> {
    stage
        .inputs
        .iter()
        .map(|port| match &port.declared.location {
            crate::location::Location::Local(path) => Ok(path.clone()),
            crate::location::Location::S3 { bucket, key } => ctx
                .storage
                .fetch(bucket, key, port.declared.dir)
                .map_err(|e| e.to_string()),
        })
        .collect()
}

/// The template context of a command: vars, `item`, `params`, inputs (local copies of S3 ones)
/// as written, outputs staged.
fn command_context(stage: &Stage, inputs: &[PathBuf], staged: &[PathBuf]) -> Map<String, Json> {
    let mut context = stage.context.clone();
    let local_ports: Vec<Port> = stage
        .inputs
        .iter()
        .zip(inputs)
        .map(|(port, path)| match port.declared.location {
            crate::location::Location::Local(_) => port.clone(),
            crate::location::Location::S3 { .. } => Port {
                text: path.display().to_string(),
                ..port.clone()
            },
        })
        .collect();
    context.insert("inputs".into(), ports_json(&local_ports));
    let staged_ports: Vec<Port> = stage
        .outputs
        .iter()
        .zip(staged)
        .map(|(port, path)| Port {
            text: path.display().to_string(),
            ..port.clone()
        })
        .collect();
    context.insert("outputs".into(), ports_json(&staged_ports));
    context
}

#[allow(clippy::too_many_arguments)]
async fn run_shell(
    ctx: &Context,
    stage: &Stage,
    templates: &[(String, crate::diagnostic::Span)],
    argv: bool,
    inputs: &[PathBuf],
    staged: &[PathBuf],
    workdir: &Path,
    record: &mut StageRecord,
) -> Result<(), (String, Option<PathBuf>)> {
    let renderer = crate::config::template::Templates::default();
    let context = minijinja::Value::from_serialize(command_context(stage, inputs, staged));
    let logs = ctx.state.logs(&ctx.run_id);
    std::fs::create_dir_all(&logs)
        .map_err(|e| (format!("cannot create {}: {e}", logs.display()), None))?;
    let out_log = logs.join(format!("{}.out", file_name(&stage.name)));
    let err_log = logs.join(format!("{}.err", file_name(&stage.name)));
    record.log = Some(err_log.display().to_string());
    // Variables passed through must be there: a stage that needs a token should not run
    // without one and fail half-way.
    let mut env = Vec::new();
    for (name, value) in &stage.env {
        match value {
            Some(value) => env.push((name.clone(), value.clone())),
            None => match std::env::var_os(name) {
                Some(value) => env.push((name.clone(), value.to_string_lossy().into_owned())),
                None => {
                    return Err((
                        format!("the variable `{name}` is not set, and the stage passes it through (`env:`)"),
                        None,
                    ))
                }
            },
        }
    }
    // A program run without a shell: its words, each rendered on its own.
    let programs: Vec<(Vec<String>, String)> = if argv {
        let mut words = Vec::new();
        for (template, _) in templates {
            let rendered = renderer
                .render_words(template, &context)
                .map_err(|e| (format!("cannot render the command: {e}"), None))?;
            words.extend(rendered);
        }
        let shown = words
            .iter()
            .map(|w| crate::config::shell::quote(w))
            .collect::<Vec<_>>()
            .join(" ");
        vec![(words, shown)]
    } else {
        let mut commands = Vec::new();
        for (template, _) in templates {
            let command = renderer
                .render_command(template, &context)
                .map_err(|e| (format!("cannot render the command: {e}"), None))?;
            commands.push((
                vec!["sh".to_owned(), "-c".to_owned(), command.clone()],
                command,
            ));
        }
        commands
    };
    for (words, command) in programs {
        tracing::debug!(stage = %stage.name, %command, "running");
        let open = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        };
        let (stdout, stderr) = match (open(&out_log), open(&err_log)) {
            (Ok(o), Ok(e)) => (o, e),
            (Err(e), _) | (_, Err(e)) => {
                return Err((format!("cannot open the stage's log: {e}"), None))
            }
        };
        let Some((program, args)) = words.split_first() else {
            return Err(("the command is empty".to_owned(), None));
        };
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .current_dir(workdir)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("IMBA_STAGE", &stage.name)
            .env("IMBA_RUN", &ctx.run_id)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| (format!("cannot start `{program}`: {e}"), None))?;
        let pid = child.id();
        let mut cancel = ctx.cancel.clone();
        let cancelled = async move { cancel.wait_for(|c| *c >= Stop::Cancel).await.is_ok() };
        let status = tokio::select! {
            status = child.wait() => status,
            true = cancelled => {
                // The whole process group: the shell and whatever it started. SIGTERM first,
                // SIGKILL after a grace period or at once when asked to kill.
                let signal_group = |signal| {
                    if let Some(pid) = pid {
                        unsafe { libc::killpg(pid as i32, signal) };
                    }
                };
                signal_group(libc::SIGTERM);
                let mut kill = ctx.cancel.clone();
                let killed = async move { kill.wait_for(|c| *c >= Stop::Kill).await.is_ok() };
                tokio::select! {
                    status = child.wait() => status,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {
                        signal_group(libc::SIGKILL);
                        child.wait().await
                    }
                    true = killed => {
                        signal_group(libc::SIGKILL);
                        child.wait().await
                    }
                }
            }
        }
        .map_err(|e| (format!("cannot wait for the command: {e}"), None))?;
        if !status.success() {
            use std::os::unix::process::ExitStatusExt;
            record.exit_status = status.code();
            let how = match (status.code(), status.signal()) {
                (Some(code), _) => format!("command failed with exit status {code}"),
                // SIGKILL from outside is most often the kernel's OOM killer.
                (None, Some(9)) => {
                    "command was killed by signal 9 (SIGKILL: out of memory?)".to_owned()
                }
                (None, Some(signal)) => format!("command was killed by signal {signal}"),
                _ => "command failed".to_owned(),
            };
            let tail = tail_of(&err_log, 10);
            let mut error = format!("{how}: {command}");
            if !tail.is_empty() {
                error.push_str("\n--- last lines of its stderr\n");
                error.push_str(&tail);
            }
            return Err((error, Some(err_log)));
        }
        record.exit_status = Some(0);
    }
    Ok(())
}

fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn run_builtin(
    ctx: &Context,
    stage: &Stage,
    name: &str,
    params: &Json,
    io: StageIo,
    record: &mut StageRecord,
    param_error: &mut Option<String>,
) -> Result<(), (String, Option<PathBuf>)> {
    let Some(builtin) = ctx.registry.get(name).cloned() else {
        return Err((
            format!("built-in stage `{name}` is not in this build of imba"),
            None,
        ));
    };
    let params = params.clone();
    let started = Instant::now();
    // A cancelled run sets the stage's flag; a long stage (MICE) stops at its next iteration.
    let flag = io.cancel.clone();
    let mut stop = ctx.cancel.clone();
    let watcher = tokio::spawn(async move {
        if stop.wait_for(|c| *c >= Stop::Cancel).await.is_ok() {
            flag.cancel();
        }
    });
    let ran = tokio::task::spawn_blocking(move || builtin.run(&params, &io)).await;
    watcher.abort();
    let report = ran
        .map_err(|e| (format!("internal error: {e}"), None))?
        .map_err(|e| {
            *param_error = e.param.clone();
            (e.message, None)
        })?;
    for warning in &report.warnings {
        ctx.events
            .event(Event::Warning(format!("stage `{}`: {warning}", stage.name)));
    }
    // The stage's own checks are about its outputs as a whole: shown against the first.
    let output = stage
        .outputs
        .first()
        .map(|p| p.declared.location.display(&ctx.dag.pipeline().workdir))
        .unwrap_or_default();
    record.checks = report
        .checks
        .iter()
        .map(|c| crate::record::CheckRecord {
            name: c.name.clone(),
            check: serde_json::json!({ "builtin": name }),
            severity: c.severity,
            output: output.clone(),
            status: c.status,
            value: c.value.clone(),
            expected: c.expected.clone(),
            detail: c.detail.clone(),
        })
        .collect();
    record.report = Some(serde_json::json!({
        "summary": report.summary,
        "warnings": report.warnings,
        "duration_ms": started.elapsed().as_millis() as u64,
    }));
    Ok(())
}

/// Hashes the staged outputs, moves them into place, then writes the lock entry.
fn commit(
    ctx: &Context,
    stage: &Stage,
    staged: &[PathBuf],
    now: plan::Snapshot,
    previous: Option<LockedStage>,
    report: Json,
) -> Result<(BTreeMap<String, ContentHash>, bool), String> {
    let workdir = &ctx.dag.pipeline().workdir;
    if let (Some(versioning), [port], [path]) =
        (&stage.versioning, stage.outputs.as_slice(), staged)
    {
        let pipeline = ctx.dag.pipeline();
        let input = crate::versions::MetaInput {
            pipeline: pipeline.file.display().to_string(),
            stage: stage.name.clone(),
            fingerprint: now.fingerprint.clone(),
            inputs: serde_json::to_value(&now.entry.inputs).unwrap_or(Json::Null),
            params: now.entry.params.clone(),
            report,
            workdir: workdir.clone(),
        };
        let (version, reused, hash) = match &port.declared.location {
            crate::location::Location::Local(root) => {
                crate::config::confine::check_target(root, workdir)
                    .map_err(|e| format!("output `{}`: {e}", port.text))?;
                let committed = crate::versions::commit(path, root, versioning, input)
                    .map_err(|e| format!("output `{}`: {e}", port.text))?;
                let hash = ctx
                    .cache
                    .hash_path(&committed.dir)
                    .map_err(|e| format!("cannot hash {}: {e}", committed.dir.display()))?
                    .ok_or_else(|| format!("version {} is gone", committed.dir.display()))?;
                (committed.version, committed.reused, hash)
            }
            crate::location::Location::S3 { bucket, key } => crate::versions::commit_s3(
                &ctx.storage,
                bucket,
                key,
                path,
                versioning,
                input,
                &ctx.run_id,
            )
            .map_err(|e| format!("output `{}`: {e}", port.text))?,
        };
        tracing::debug!(stage = %stage.name, version, reused, "versioned commit");
        let mut outputs = BTreeMap::new();
        outputs.insert(port.declared.location.display(workdir), hash);
        let unchanged = reused;
        let mut entry = now.entry;
        entry.outputs = outputs.clone();
        return record_commit(ctx, stage, entry, outputs, unchanged);
    }
    let staging_cache = StatCache::in_memory();
    let mut outputs = BTreeMap::new();
    // S3 outputs first: uploading is what fails most, and a failure here leaves every output,
    // local or not, as it was.
    for (port, path) in stage.outputs.iter().zip(staged) {
        if let crate::location::Location::S3 { bucket, key } = &port.declared.location {
            tracing::trace!(stage = %stage.name, from = %path.display(), to = %port.text, "upload");
            let hash = ctx
                .storage
                .commit(bucket, key, path, port.declared.dir, &ctx.run_id)
                .map_err(|e| format!("{e}; the output `{}` was not committed", port.text))?;
            outputs.insert(port.declared.location.display(workdir), hash);
        }
    }
    let mut finals = Vec::new();
    for (port, path) in stage.outputs.iter().zip(staged) {
        let crate::location::Location::Local(target) = &port.declared.location else {
            continue;
        };
        let hash = staging_cache
            .hash_path(path)
            .map_err(|e| format!("cannot hash the output `{}`: {e}", port.text))?
            .ok_or_else(|| format!("stage did not write its output `{}`", port.text))?;
        outputs.insert(port.declared.location.display(workdir), hash);
        finals.push((port, path, target.clone()));
    }
    for (port, _, target) in &finals {
        crate::config::confine::check_target(target, workdir)
            .map_err(|e| format!("output `{}`: {e}", port.text))?;
    }
    for (port, path, target) in &finals {
        tracing::trace!(stage = %stage.name, from = %path.display(), to = %target.display(), "commit");
        crate::fsutil::replace(path, target).map_err(|e| {
            format!(
                "cannot move the output `{}` into place at {}: {e}",
                port.text,
                target.display()
            )
        })?;
    }
    for (port, path, target) in &finals {
        let key = port.declared.location.display(workdir);
        if let Some(hash) = outputs.get(&key) {
            if hash.files.is_none() {
                ctx.cache.record(target, &hash.hash);
            }
        }
        // The files of a directory output were hashed under their staging paths: remember them
        // under the paths they have now, so the next status does not read them again.
        for (relative, hash) in staging_cache.hashes_under(path) {
            ctx.cache.record(&target.join(relative), &hash);
        }
    }
    let unchanged = previous.as_ref().is_some_and(|p| p.outputs == outputs);
    let mut entry = now.entry;
    entry.outputs = outputs.clone();
    record_commit(ctx, stage, entry, outputs, unchanged)
}

/// Journals the stage's new lock entry, then puts it in the lock.
fn record_commit(
    ctx: &Context,
    stage: &Stage,
    entry: LockedStage,
    outputs: BTreeMap<String, ContentHash>,
    unchanged: bool,
) -> Result<(BTreeMap<String, ContentHash>, bool), String> {
    let mut guard = ctx.lock.lock().unwrap_or_else(|e| e.into_inner());
    let (lock, journal) = &mut *guard;
    journal.append(&stage.name, &entry).map_err(|e| {
        format!(
            "outputs are in place, but the run journal {} could not be written: {e}",
            journal.path().display()
        )
    })?;
    lock.stages.insert(stage.name.clone(), entry);
    Ok((outputs, unchanged))
}
