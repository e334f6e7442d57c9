//! Running a pipeline: the run as a whole (the workdir lock, the lock file and journal, the run
//! record), over the scheduler ([`schedule`]) and each stage's lifecycle ([`stage`]).
//!
//! Stages run on tokio, at most `jobs` at a time, each as soon as what it needs is done. When a
//! stage becomes ready its inputs are hashed and its fingerprint compared with the lock file, so a
//! stage whose upstream re-ran but wrote identical bytes is skipped (early cutoff). A running
//! stage writes to staging paths under `.imba/staging/` (or, a command naming none, in place
//! with the previous outputs set aside: [`in_place`]); its outputs are moved into place
//! only after it succeeded and its `fail` checks passed (else they go to quarantine, see
//! [`crate::run::gate`]), and its lock entry is written only after that. Hashing, commits and
//! built-in stages run on blocking threads, never on the runtime's workers.

pub mod admit;
pub mod execute;
pub mod failure;
pub mod gate;
pub mod housekeeping;
pub mod in_place;
pub mod live;
mod schedule;
mod stage;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imba_stages::Registry;
use tokio::sync::watch;

use crate::graph::Dag;
use crate::interrupt::Stop;
use crate::plan::{self, Selection};
use crate::state::lock::{self, LockFile, LockedStage};
use crate::state::record::{self, RunRecord, RunStatus, StageRecord};
use crate::state::StateDir;
use crate::store::{RunCache, StatCache, Store, Stores};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub jobs: usize,
    /// CPUs and memory the stages may use at once (`--cpus`, `--memory`).
    pub budget: admit::Budget,
    pub selection: Selection,
    pub keep_going: bool,
    /// Fail at once instead of waiting when another run holds the lock.
    pub no_wait: bool,
    /// Asks the run to stop: [`Stop::Cancel`] cancels running stages and starts nothing new,
    /// [`Stop::Kill`] kills them and stops waiting. The CLI feeds Ctrl-C and SIGTERM into it
    /// ([`crate::interrupt::listen`]); `imba watch` also cancels for `--restart`.
    pub stop: watch::Receiver<Stop>,
    /// The remote run cache to consult (and, with `cache.push: auto`, to push to).
    pub remote: RemoteChoice,
    /// Bring outputs back from the run cache (local or remote) and compute nothing: a stage
    /// that cannot be restored fails (`imba pull`).
    pub restore_only: bool,
}

/// Which remote run cache a run uses.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RemoteChoice {
    /// `IMBA_REMOTE`, else the pipeline's `cache.remote`, else none.
    #[default]
    Configured,
    /// `--remote URL`.
    Url(String),
    /// `--no-remote`.
    Off,
}

/// The remote run cache `choice` names for `pipeline`, if any.
pub fn remote_location(
    choice: &RemoteChoice,
    pipeline: &crate::model::Pipeline,
) -> Result<Option<crate::model::Location>, String> {
    let parse = |text: &str, what: &str| {
        crate::model::Declared::parse(text, &pipeline.workdir)
            .map(|d| Some(d.location))
            .map_err(|e| format!("{what} `{text}` is not a location: {e}"))
    };
    match choice {
        RemoteChoice::Off => Ok(None),
        RemoteChoice::Url(url) => parse(url, "--remote"),
        RemoteChoice::Configured => match std::env::var("IMBA_REMOTE") {
            Ok(url) if !url.trim().is_empty() => parse(&url, "IMBA_REMOTE"),
            _ => Ok(pipeline.cache.remote.clone()),
        },
    }
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
    /// Stale by the lock, but its outputs already hold what the run cache recorded for its
    /// fingerprint: nothing to do.
    StageCached {
        name: String,
    },
    /// Stale, and its fingerprint is in the run cache: its outputs are being restored.
    StageRestoring {
        name: String,
        reasons: Vec<String>,
    },

    StageDone {
        name: String,
        duration: Duration,
        unchanged: bool,
        /// How many of its checks passed (the others missed with `warn`, and were warned of).
        checks_passed: usize,
        /// Restored from the run cache rather than computed: how long computing it took.
        restored: Option<Duration>,
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
    /// Another machine holds the lease on the stage's fingerprint: this run waits for its
    /// result rather than compute it too.
    StageWaiting {
        name: String,
        holder: String,
        since: String,
    },
    StageCancelled {
        name: String,
    },
    /// What the stage asks for does not fit beside what computes now: it waits.
    StageQueued {
        name: String,
        demand: admit::Demand,
        in_use: admit::Demand,
        budget: admit::Budget,
    },
    /// An attempt failed and the stage will be tried again after `wait` (`retries:`).
    StageRetrying {
        name: String,
        /// The attempt that failed (1 for the first).
        attempt: u32,
        attempts: u32,
        /// Why, in one line.
        error: String,
        wait: Duration,
    },
    Warning(String),
}

/// Where events go (the printer, on a terminal or not).
pub trait Events: Send + Sync {
    fn event(&self, event: Event);
    /// The run is over: nothing more will come.
    fn finish(&self) {}
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

impl From<plan::PlanError> for RunError {
    fn from(error: plan::PlanError) -> Self {
        match error {
            plan::PlanError::Config(message) => RunError::Config(message),
            plan::PlanError::Io(message) => RunError::Io(message),
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunSummary {
    pub record: RunRecord,
    pub failed: bool,
    pub interrupted: bool,
}

/// What became of a stage, with its record.
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

/// What every stage of a run shares.
pub(crate) struct Context {
    dag: Arc<Dag>,
    registry: Registry,
    store: Arc<dyn Store>,
    /// Outputs by content, per fingerprint: what a stale stage may be restored from.
    cache: RunCache,
    /// The remote run cache, while it answers.
    remote: Option<crate::model::Location>,
    /// Set when the remote failed once: the rest of the run does without it.
    remote_down: std::sync::atomic::AtomicBool,
    /// Whether the remote answered its first question ([`crate::store::remote::Remote::probe`]).
    remote_probed: std::sync::OnceLock<bool>,
    /// `cache.push: auto` with a remote: push what is computed, under a lease.
    push: bool,
    restore_only: bool,
    lock: Mutex<(LockFile, lock::Journal)>,
    lock_path: PathBuf,
    state: StateDir,
    run_id: String,
    events: Arc<dyn Events>,
    cancel: watch::Receiver<Stop>,
    /// The CPU and memory budget stages compute within.
    admission: admit::Admission,
    /// The stages this run was asked for.
    selected: std::collections::BTreeSet<usize>,
    /// Selected stages that ended (or will not start), and how: a `change: {against:
    /// previous}` check waits for the previous partition's instance to be here.
    ended: Mutex<std::collections::BTreeMap<usize, Ended>>,
    /// Woken when a stage ends.
    ended_notify: tokio::sync::Notify,
    /// How many stages wait at their gate for another to end: they hold no job slot.
    parked: std::sync::atomic::AtomicUsize,
    /// Woken when a stage parks, so that the scheduler can start another in its slot.
    parked_notify: tokio::sync::Notify,
    /// Jobs earlier runs left on the executors, cancelled before this run's first job there.
    orphans: execute::Orphans,
}

/// How a stage of this run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// Its outputs are committed (it ran, was restored, or was up to date).
    Committed,
    Failed,
    /// It did not start: upstream or its partition failed, or the run stopped.
    NotRun,
}

impl Context {
    /// `stage` ended, or will not start: whoever waits for it goes on.
    fn mark_ended(&self, stage: usize, how: Ended) {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(stage)
            .or_insert(how);
        self.ended_notify.notify_waiters();
    }

    /// How `stage` ended in this run, if it did.
    fn ended(&self, stage: usize) -> Option<Ended> {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&stage)
            .copied()
    }

    /// Waits until `stage` has ended (or the run is cancelled), without holding a job slot.
    async fn wait_for_end(&self, stage: usize) -> Result<(), failure::StageFailure> {
        use std::sync::atomic::Ordering;
        let ended = || self.ended(stage).is_some();
        if ended() {
            return Ok(());
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        self.parked_notify.notify_one();
        let mut cancel = self.cancel.clone();
        let result = loop {
            let notified = self.ended_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if ended() {
                break Ok(());
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = cancel.wait_for(|s| *s >= Stop::Cancel) => break Err(failure::StageFailure::Cancelled),
            }
        };
        self.parked.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// The remote run cache, unless there is none or it failed earlier in this run.
    fn remote(&self) -> Option<crate::store::remote::Remote<'_>> {
        if self.remote_down.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let root = self.remote.clone()?;
        let remote = crate::store::remote::Remote::new(&*self.store, root, &self.cache);
        let usable = *self.remote_probed.get_or_init(|| match remote.probe() {
            Ok(()) => true,
            Err(e) => {
                self.remote_failed(&e);
                false
            }
        });
        usable.then_some(remote)
    }

    /// The remote, even after it failed in this run: to give up the leases this run holds.
    fn remote_for_leases(&self) -> Option<crate::store::remote::Remote<'_>> {
        let root = self.remote.clone()?;
        Some(crate::store::remote::Remote::new(
            &*self.store,
            root,
            &self.cache,
        ))
    }

    /// The remote failed: warn once, and do without it for the rest of the run.
    fn remote_failed(&self, error: &dyn std::fmt::Display) {
        if !self
            .remote_down
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            let url = self
                .remote
                .clone()
                .map(|root| {
                    crate::store::remote::Remote::new(&*self.store, root, &self.cache).root_url()
                })
                .unwrap_or_default();
            self.events.event(Event::Warning(format!(
                "the remote run cache {url} cannot be used ({error}); this run computes without it"
            )));
        }
    }

    /// The lock entry of a stage as it is now (an earlier stage of this run may have written it).
    fn locked(&self, stage: &str) -> Option<LockedStage> {
        self.lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .stages
            .get(stage)
            .cloned()
    }

    /// Journals a stage's new lock entry, then puts it in the lock.
    fn record_commit(&self, stage: &str, entry: LockedStage) -> Result<(), String> {
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let (lock, journal) = &mut *guard;
        journal.append(stage, &entry).map_err(|e| {
            format!(
                "outputs are in place, but the run journal {} could not be written: {e}",
                journal.path().display()
            )
        })?;
        lock.stages.insert(stage.to_owned(), entry);
        Ok(())
    }
}

/// Runs what is stale in `dag`, reading and writing data through the local and S3 stores.
pub fn run(
    dag: Arc<Dag>,
    registry: Registry,
    options: RunOptions,
    events: Arc<dyn Events>,
) -> Result<RunSummary, RunError> {
    let pipeline = dag.pipeline();
    let state = StateDir::new(&pipeline.workdir);
    let settings = pipeline.storage.clone();
    let workdir = pipeline.workdir.clone();
    let warnings = events.clone();
    let stores = move |cancel: watch::Receiver<Stop>| -> Arc<dyn Store> {
        let storage = crate::store::s3::Storage::new(settings, state.cache())
            .with_cancel(cancel)
            .with_warnings(Arc::new(move |w| warnings.event(Event::Warning(w))));
        Arc::new(Stores::new(
            &workdir,
            StatCache::load(state.stat_cache()),
            storage,
        ))
    };
    run_with(dag, registry, options, events, stores)
}

/// [`run`] through the store `store` makes, given the run's stop signal (a store drops its
/// requests when the run is cancelled).
pub fn run_with(
    dag: Arc<Dag>,
    registry: Registry,
    options: RunOptions,
    events: Arc<dyn Events>,
    store: impl FnOnce(watch::Receiver<Stop>) -> Arc<dyn Store>,
) -> Result<RunSummary, RunError> {
    let pipeline = dag.pipeline();
    let state = StateDir::new(&pipeline.workdir);
    let held = state
        .lock(!options.no_wait, |pid| events.event(Event::Waiting { pid }))
        .map_err(|e| RunError::Io(format!("cannot lock {}: {e}", state.root.display())))?;
    let Some(_held) = held else {
        return Err(RunError::Busy(state.root.display().to_string()));
    };
    // Outputs a killed run was writing in place go back to what they were, before anything is
    // decided about them.
    for recovered in in_place::recover(&state.root, &pipeline.workdir) {
        events.event(Event::Warning(recovered.to_string()));
    }
    let (lock_path, lock, journal) = open_lock(&state, &pipeline.file, &events)?;
    let (selected, forced) = plan::select(&dag, &options.selection).map_err(RunError::Config)?;
    let remote = remote_location(&options.remote, pipeline).map_err(RunError::Config)?;
    let push = remote.is_some() && pipeline.cache.push == crate::model::Push::Auto;
    let run_id = crate::state::new_run_id();
    let record = RunRecord::start(&run_id, pipeline);
    let _ = record::save(&state.runs(), &record);
    let clock = Instant::now();
    // This run holds the lock: a live file still there is a killed run's.
    live::sweep(&state.live());
    let live = live::Tee::new(state.live().join(format!("{run_id}.jsonl")), events);
    // The live file goes when this returns, after the record is saved (or on an early error).
    let _live = live::Closes(live.clone());
    let events: Arc<dyn Events> = live;
    events.event(Event::Started {
        run: run_id.clone(),
        stages: selected.len(),
    });

    let (cancel_tx, cancel_rx) = watch::channel(Stop::Go);
    let ctx = Arc::new(Context {
        store: store(cancel_rx.clone()),
        cache: RunCache::new(state.cache()),
        remote,
        remote_down: std::sync::atomic::AtomicBool::new(false),
        remote_probed: std::sync::OnceLock::new(),
        push,
        restore_only: options.restore_only,
        dag: dag.clone(),
        registry,
        lock: Mutex::new((lock, journal)),
        lock_path,
        state: state.clone(),
        run_id: run_id.clone(),
        events: events.clone(),
        cancel: cancel_rx,
        admission: admit::Admission::new(options.budget),
        selected: selected.clone(),
        ended: Mutex::new(std::collections::BTreeMap::new()),
        ended_notify: tokio::sync::Notify::new(),
        parked: std::sync::atomic::AtomicUsize::new(0),
        parked_notify: tokio::sync::Notify::new(),
        orphans: execute::Orphans::default(),
    });
    // Every remote identity the decisions need, at once rather than one request after another.
    ctx.store.prefetch(&plan::lookups(&dag, &selected));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.jobs.clamp(1, 4))
        .enable_all()
        .build()
        .map_err(|e| RunError::Io(format!("cannot start the runtime: {e}")))?;
    let (outcomes, interrupted) = {
        let _armed = crate::interrupt::arm();
        runtime.block_on(schedule::schedule(
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
    // A stage abandoned by a second Ctrl-C may have left outputs set aside: back they go.
    for recovered in in_place::recover(&state.root, &pipeline.workdir) {
        events.event(Event::Warning(recovered.to_string()));
    }
    close(&ctx);
    let summary = summarise(&dag, outcomes, interrupted, record, clock);
    if let Err(e) = record::save(&state.runs(), &summary.record) {
        events.event(Event::Warning(format!("cannot save the run record: {e}")));
    }
    Ok(summary)
}

/// The run record of a finished run: each stage's in the pipeline's order, and how it ended.
fn summarise(
    dag: &Dag,
    outcomes: std::collections::BTreeMap<usize, Outcome>,
    interrupted: bool,
    mut record: RunRecord,
    clock: Instant,
) -> RunSummary {
    let failed = outcomes
        .values()
        .any(|o| matches!(o, Outcome::Failed { .. }));
    let stages = dag
        .order()
        .iter()
        .filter_map(|&i| {
            let mut record = outcomes.get(&i).cloned().map(Outcome::record)?;
            record.partition = dag.stage(i).partition.as_ref().map(|p| p.key.clone());
            Some(record)
        })
        .collect();
    let status = if interrupted {
        RunStatus::Interrupted
    } else if failed {
        RunStatus::Failed
    } else {
        RunStatus::Ok
    };
    record.finish(stages, status, clock.elapsed());
    RunSummary {
        record,
        failed,
        interrupted,
    }
}

/// The lock file with an interrupted run's journal replayed onto it, made durable, and the
/// journal this run appends to.
fn open_lock(
    state: &StateDir,
    pipeline: &std::path::Path,
    events: &Arc<dyn Events>,
) -> Result<(PathBuf, LockFile, lock::Journal), RunError> {
    let lock_path = lock::lock_path(pipeline);
    let lock = lock::load_for_run(&lock_path, state, |w| events.event(Event::Warning(w)))
        .map_err(RunError::Config)?;
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
    Ok((lock_path, lock, journal))
}

/// After the last stage: the lock file rewritten from the journal, the stat cache saved, the
/// run's staging removed. A failure here loses nothing (the journal keeps the commits), so it is
/// a warning.
fn close(ctx: &Context) {
    {
        let mut guard = ctx.lock.lock().unwrap_or_else(|e| e.into_inner());
        let (lock, journal) = &mut *guard;
        if let Err(e) = journal.checkpoint(&ctx.lock_path, lock) {
            ctx.events.event(Event::Warning(format!(
                "cannot write the lock file {} ({e}); the journal {} keeps what this run committed",
                ctx.lock_path.display(),
                journal.path().display()
            )));
        }
    }
    if let Err(e) = ctx.store.save() {
        ctx.events
            .event(Event::Warning(format!("cannot save the stat cache: {e}")));
    }
    if let Some(max) = ctx.dag.pipeline().cache.max_size {
        let removed = ctx.cache.evict(max);
        if removed.entries > 0 {
            tracing::info!(
                entries = removed.entries,
                blobs = removed.blobs,
                bytes = removed.bytes,
                "run cache evicted"
            );
        }
    }
    let _ = std::fs::remove_dir_all(ctx.state.staging(&ctx.run_id));
}
