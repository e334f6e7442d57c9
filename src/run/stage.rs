//! One stage's lifecycle, top to bottom: decide → stage → fetch → execute → verify → gate →
//! commit. Each step is a function that either moves on or ends the stage with a
//! [`StageFailure`]; [`conclude`] turns a failure into the stage's outcome.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value as Json;

use super::execute::{execute, Executed, Execution};
use super::failure::StageFailure;
use super::in_place::Aside;
use super::{Context, Event, Outcome};
use crate::interrupt::Stop;
use crate::model::{file_name, Port, Stage, StageKind};
use crate::plan::{self, Reason};
use crate::state::lock::LockedStage;
use crate::state::record::{AttemptRecord, Decision, StageRecord};
use crate::store::cache::{self, CachedOutput, Entry, Stored};
use crate::store::remote::{FetchError, Lease, Taken};
use crate::store::{versions, ContentHash, Staged};

pub(super) fn stage_record(name: &str, decision: Decision) -> StageRecord {
    StageRecord {
        name: name.to_owned(),
        partition: None,
        decision,
        reasons: Vec::new(),
        fingerprint: None,
        duration_ms: 0,
        started: None,
        exit_status: None,
        error: None,
        unchanged: false,
        outputs: BTreeMap::new(),
        log: None,
        report: None,
        checks: Vec::new(),
        metrics: BTreeMap::new(),
        quarantine: None,
        hook: None,
        accepted: None,
        job: None,
        attempts: Vec::new(),
    }
}

/// Runs the stage and, when it failed, its `on_failure` hook (or the pipeline's).
pub(super) async fn run_stage_and_hook(ctx: Arc<Context>, index: usize, force: bool) -> Outcome {
    let outcome = run_stage(ctx.clone(), index, force).await;
    let Outcome::Failed { record } = outcome else {
        return outcome;
    };
    Outcome::Failed {
        record: super::gate::after_failure(&ctx, ctx.dag.stage(index), record).await,
    }
}

/// What deciding found: the stage as it is now, its lock entry, and why it must run.
struct Decided {
    now: plan::Snapshot,
    locked: Option<LockedStage>,
    reasons: Vec<Reason>,
}

/// Decides whether `index` must run, and runs it.
async fn run_stage(ctx: Arc<Context>, index: usize, force: bool) -> Outcome {
    // Borrowed from the shared graph, never cloned: a no-op run of many stages stays cheap.
    let stage = ctx.dag.stage(index);
    let started = Instant::now();
    let mut record = stage_record(&stage.name, Decision::Ran);
    let Decided {
        now,
        locked,
        mut reasons,
    } = match decide(&ctx, index).await {
        Ok(decided) => decided,
        Err(failure) => return conclude(&ctx, stage, record, failure),
    };
    record.fingerprint = Some(now.fingerprint.clone());
    if force {
        reasons.insert(0, Reason::Forced);
    }
    tracing::debug!(stage = %stage.name, fingerprint = %now.fingerprint, ?reasons, "decided");
    if reasons.is_empty() {
        record.decision = Decision::Skipped;
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
        let failure = StageFailure::InputMissing { path: path.clone() };
        return conclude(&ctx, stage, record, failure);
    }
    if *ctx.cancel.borrow() >= Stop::Cancel {
        return cancelled(&ctx, record);
    }
    // `--force` means computing it, whatever the cache holds.
    let mut lease = None;
    if !force {
        pull_remote(&ctx, &now.fingerprint).await;
        if let Some(outcome) = from_cache(&ctx, index, &now, &locked, record.clone(), started).await
        {
            return outcome;
        }
        if ctx.restore_only {
            let failure = StageFailure::Other(
                "it is in no run cache, here or in the remote: `imba run` computes it".to_owned(),
            );
            return conclude(&ctx, stage, record, failure);
        }
        if ctx.push {
            match claim(&ctx, index, &now, &locked, &record, started).await {
                Claim::Compute(held) => lease = held,
                Claim::Done(outcome) => return *outcome,
            }
        }
    }
    ctx.events.event(Event::StageRunning {
        name: stage.name.clone(),
        reasons: record.reasons.clone(),
    });

    let staging = Staging::for_stage(&ctx, stage);
    let aside = match staging.set_aside(&ctx, stage).await {
        Ok(aside) => aside,
        Err(failure) => {
            release(&ctx, lease).await;
            return conclude(&ctx, stage, record, failure);
        }
    };
    let done = produce_and_commit(
        &ctx,
        index,
        &staging,
        aside.as_ref(),
        now,
        locked,
        &mut record,
    )
    .await;
    staging.remove();
    if let Some(aside) = aside {
        settle_or_put_back(&ctx, stage, aside, done.is_ok()).await;
    }
    // The lease stays renewed until the result is pushed, which may take long for large
    // outputs: a waiting machine must not take it over meanwhile.
    match done {
        Ok(Committed {
            outputs,
            unchanged,
            checks_passed,
            stored,
            reported,
        }) => {
            record.outputs = outputs;
            record.unchanged = unchanged;
            record.duration_ms = started.elapsed().as_millis() as u64;
            let entry = match stored {
                Some(stored) => remember(&ctx, index, &record, stored, reported).await,
                None => None,
            };
            if let (true, Some(entry)) = (ctx.push, entry) {
                push(&ctx, entry).await;
            }
            release(&ctx, lease).await;
            ctx.events.event(Event::StageDone {
                name: stage.name.clone(),
                duration: started.elapsed(),
                unchanged,
                checks_passed,
                restored: None,
            });
            Outcome::Ran { record }
        }
        Err(failure) => {
            release(&ctx, lease).await;
            conclude(&ctx, stage, record, failure)
        }
    }
}

/// After a stage that wrote outputs in place: their previous content is dropped when the new
/// is committed, else put back (what the command left goes with it; outputs that failed a check
/// are in quarantine already).
async fn settle_or_put_back(ctx: &Context, stage: &Stage, aside: Aside, committed: bool) {
    let done = tokio::task::spawn_blocking(move || match committed {
        true => {
            aside.settle();
            Ok(())
        }
        false => aside.put_back(),
    })
    .await;
    let error = match done {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("internal error: {e}"),
    };
    ctx.events.event(Event::Warning(format!(
        "stage `{}`: {error}; the next run tries again",
        stage.name
    )));
}

/// With a remote run cache and no local entry for `fingerprint`: brings the remote's entry and
/// its blobs here, so that the stage is restored rather than computed. A corrupt object is
/// warned of and not used; a remote that fails is warned of once and not asked again.
async fn pull_remote(ctx: &Arc<Context>, fingerprint: &str) {
    let held = ctx
        .cache
        .entry(fingerprint)
        .is_some_and(|e| e.outputs.values().all(|o| ctx.cache.holds(o)));
    if ctx.remote.is_none() || held {
        return;
    }
    let ctx2 = ctx.clone();
    let fingerprint = fingerprint.to_owned();
    let pulled = tokio::task::spawn_blocking(move || {
        let Some(remote) = ctx2.remote() else {
            return Ok(());
        };
        match remote.entry(&fingerprint) {
            Ok(Some(entry)) => remote.fetch(&entry, &|_| {}).map(|_| ()),
            Ok(None) => Ok(()),
            Err(e) => Err(FetchError::Store(e)),
        }
    })
    .await;
    match pulled {
        Ok(Ok(())) => {}
        Ok(Err(FetchError::Store(e))) => ctx.remote_failed(&e),
        Ok(Err(e)) => ctx
            .events
            .event(Event::Warning(format!("{e}; it is not used"))),
        Err(e) => ctx.remote_failed(&e),
    }
}

/// How long a lease lives without being renewed, and how often it is renewed.
const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(60);
const LEASE_RENEW: std::time::Duration = std::time::Duration::from_secs(20);
/// How often a run waiting for another machine's result looks for it.
const LEASE_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// A lease this run holds while it computes a fingerprint, renewed in the background.
struct LeaseGuard {
    fingerprint: String,
    lease: Lease,
    renewing: tokio::task::JoinHandle<()>,
}

/// Stops renewing the lease this run held, if any, and gives it up. Through the remote even
/// when it failed earlier in the run (one more try): a lease left behind makes other machines
/// wait until it expires.
async fn release(ctx: &Arc<Context>, guard: Option<LeaseGuard>) {
    let Some(guard) = guard else {
        return;
    };
    guard.renewing.abort();
    let ctx2 = ctx.clone();
    let released = tokio::task::spawn_blocking(move || match ctx2.remote_for_leases() {
        Some(remote) => remote
            .release(&guard.fingerprint, &guard.lease.run)
            .map_err(|e| e.to_string()),
        None => Ok(()),
    })
    .await;
    if let Ok(Err(e)) = released {
        ctx.remote_failed(&e);
    }
}

enum Claim {
    /// This run computes it (under the lease, when the remote answered).
    Compute(Option<LeaseGuard>),
    /// Another machine computed it meanwhile, and it was restored (or failed restoring).
    Done(Box<Outcome>),
}

/// Takes the remote lease on the stage's fingerprint before computing it. When another
/// machine holds it, waits for its result and restores that; when its lease expires (its
/// holder was killed) or is given up without a result, takes it over.
async fn claim(
    ctx: &Arc<Context>,
    index: usize,
    now: &plan::Snapshot,
    locked: &Option<LockedStage>,
    record: &StageRecord,
    started: Instant,
) -> Claim {
    let stage = ctx.dag.stage(index);
    let mut told = false;
    loop {
        if *ctx.cancel.borrow() >= Stop::Cancel {
            return Claim::Done(Box::new(cancelled(ctx, record.clone())));
        }
        let ctx2 = ctx.clone();
        let fingerprint = now.fingerprint.clone();
        let lease = Lease::new(&ctx.run_id, LEASE_TTL);
        let mine = lease.clone();
        let taken = tokio::task::spawn_blocking(move || {
            let remote = ctx2.remote()?;
            Some(remote.take_lease(&fingerprint, &mine))
        })
        .await;
        let held = match taken {
            Ok(None) => return Claim::Compute(None),
            Ok(Some(Ok(taken @ (Taken::Mine | Taken::TookOver(_))))) => {
                if let Taken::TookOver(gone) = taken {
                    ctx.events.event(Event::Warning(format!(
                        "stage `{}`: the lease of {} (run {}), computing it since {}, expired without a result; this run computes it",
                        stage.name, gone.holder, gone.run, gone.since
                    )));
                }
                let guard = renew(ctx, &now.fingerprint, lease);
                // A result published just before the lease was taken is restored, not
                // computed again.
                pull_remote(ctx, &now.fingerprint).await;
                if let Some(outcome) =
                    from_cache(ctx, index, now, locked, record.clone(), started).await
                {
                    release(ctx, Some(guard)).await;
                    return Claim::Done(Box::new(outcome));
                }
                return Claim::Compute(Some(guard));
            }
            Ok(Some(Ok(Taken::Held(held)))) => held,
            Ok(Some(Err(e))) => {
                ctx.remote_failed(&e);
                return Claim::Compute(None);
            }
            Err(e) => {
                ctx.remote_failed(&e);
                return Claim::Compute(None);
            }
        };
        if !told {
            told = true;
            ctx.events.event(Event::StageWaiting {
                name: stage.name.clone(),
                holder: format!("{} (run {})", held.holder, held.run),
                since: held.since.clone(),
            });
        }
        // Wait while the lease is live and there is no result.
        loop {
            let mut cancel = ctx.cancel.clone();
            tokio::select! {
                _ = tokio::time::sleep(LEASE_POLL) => {}
                _ = cancel.wait_for(|s| *s >= Stop::Cancel) => {
                    return Claim::Done(Box::new(cancelled(ctx, record.clone())));
                }
            }
            pull_remote(ctx, &now.fingerprint).await;
            if let Some(outcome) =
                from_cache(ctx, index, now, locked, record.clone(), started).await
            {
                return Claim::Done(Box::new(outcome));
            }
            let ctx2 = ctx.clone();
            let fingerprint = now.fingerprint.clone();
            let lease =
                tokio::task::spawn_blocking(move || ctx2.remote().map(|r| r.lease(&fingerprint)))
                    .await;
            match lease {
                Ok(Some(Ok(Some(lease)))) if !lease.expired() => continue,
                Ok(None) => return Claim::Compute(None),
                Ok(Some(Ok(None))) => {
                    ctx.events.event(Event::Warning(format!(
                        "stage `{}`: {} gave its lease up without a result (its computation failed, or was cancelled); this run computes it",
                        stage.name, held.holder
                    )));
                    break;
                }
                // Expired, or the remote failed: try to take it (or compute without it).
                _ => break,
            }
        }
    }
}

/// Renews `lease` on `fingerprint` in the background (same holder and `since`, a later expiry)
/// until [`release`].
fn renew(ctx: &Arc<Context>, fingerprint: &str, lease: Lease) -> LeaseGuard {
    let ctx2 = ctx.clone();
    let fp = fingerprint.to_owned();
    let held = lease.clone();
    let renewing = tokio::spawn(async move {
        loop {
            tokio::time::sleep(LEASE_RENEW).await;
            let ctx3 = ctx2.clone();
            let fp = fp.clone();
            let renewed = held.renewed(LEASE_TTL);
            let outcome = tokio::task::spawn_blocking(move || match ctx3.remote() {
                Some(remote) => remote.renew(&fp, &renewed).map_err(|e| e.to_string()),
                None => Ok(true),
            })
            .await;
            match outcome {
                Ok(Ok(true)) => {}
                // Taken over (this run was cut off from the remote for longer than a lease
                // lives): the other run computes it too; nothing to renew.
                Ok(Ok(false)) => return,
                Ok(Err(e)) => {
                    ctx2.remote_failed(&e);
                    return;
                }
                Err(_) => return,
            }
        }
    });
    LeaseGuard {
        fingerprint: fingerprint.to_owned(),
        lease,
        renewing,
    }
}

/// Sends a computed stage's entry and blobs to the remote (`cache.push: auto`).
async fn push(ctx: &Arc<Context>, entry: Entry) {
    let ctx2 = ctx.clone();
    let pushed = tokio::task::spawn_blocking(move || match ctx2.remote() {
        Some(remote) => remote.push(&entry, &|_| {}).map(|_| ()),
        None => Ok(()),
    })
    .await;
    match pushed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => ctx.remote_failed(&e),
        Err(e) => ctx.remote_failed(&e),
    }
}

/// Hashes what the stage reads and compares it with the lock entry.
async fn decide(ctx: &Arc<Context>, index: usize) -> Result<Decided, StageFailure> {
    let ctx = ctx.clone();
    blocking(move || {
        let stage = ctx.dag.stage(index);
        let workdir = &ctx.dag.pipeline().workdir;
        let fail = |e: plan::HashError| StageFailure::Other(e.to_string());
        let now = plan::snapshot(stage, workdir, &*ctx.store).map_err(fail)?;
        let locked = ctx.locked(&stage.name);
        let reasons =
            plan::reasons(stage, &now, locked.as_ref(), workdir, &*ctx.store).map_err(fail)?;
        Ok(Decided {
            now,
            locked,
            reasons,
        })
    })
    .await
}

/// What committing a stage gave.
struct Committed {
    outputs: BTreeMap<String, ContentHash>,
    /// Every output came out as the lock already had it.
    unchanged: bool,
    checks_passed: usize,
    /// Its outputs as the run cache keeps them (`None` when they could not be kept).
    stored: Option<Vec<Stored>>,
    /// How many of the record's checks the built-in reported (the rest are its `checks:`).
    reported: usize,
}

/// The steps after the decision that write anything, each into the stage's staging directory
/// until the commit.
async fn produce_and_commit(
    ctx: &Arc<Context>,
    index: usize,
    staging: &Staging,
    aside: Option<&Aside>,
    now: plan::Snapshot,
    locked: Option<LockedStage>,
    record: &mut StageRecord,
) -> Result<Committed, StageFailure> {
    let stage = ctx.dag.stage(index);
    staging.prepare(stage)?;
    let inputs = fetch_inputs(ctx, index).await?;
    let logs = ctx.state.logs(&ctx.run_id);
    let retries = stage.limits.retries;
    let job = std::sync::Mutex::new(None);
    let warn = |warning: String| ctx.events.event(Event::Warning(warning));
    let mut attempt = 1;
    let (executed, ticket) = loop {
        // The budget is held from the start of an attempt to the commit (checks and a version's
        // metadata read the outputs): not during a backoff, nor at the gate of a month-over-month
        // check, where the previous partition may need it to compute.
        let ticket = match admit(ctx, stage, &inputs).await {
            Ok(ticket) => ticket,
            Err(failure) => break (Err(failure), None),
        };
        if record.started.is_none() {
            record.started = Some(crate::state::record::now_millis());
        }
        let execution = Execution {
            stage,
            workdir: &ctx.dag.pipeline().workdir,
            inputs: &inputs,
            staged: &staging.outputs,
            logs: &logs,
            run_id: &ctx.run_id,
            registry: &ctx.registry,
            engines: &ctx.dag.pipeline().engines,
            executors: &ctx.dag.pipeline().executors,
            cancel: ctx.cancel.clone(),
            attempt,
            job: &job,
            timeout: stage.limits.timeout,
            state: &ctx.state.root,
            orphans: &ctx.orphans,
            warn: &warn,
        };
        let (started, at) = (Instant::now(), crate::state::record::now());
        let mut result = attempt_once(ctx, execution).await;
        if result.is_ok() && *ctx.cancel.borrow() >= Stop::Cancel {
            // A command that exited 0 on SIGTERM may have written half its outputs.
            result = Err(StageFailure::Cancelled);
        }
        let ran_as = job.lock().unwrap_or_else(|e| e.into_inner()).take();
        if ran_as.is_some() {
            record.job = ran_as.clone();
        }
        if retries.attempts > 1 {
            let failure = result.as_ref().err();
            record.attempts.push(AttemptRecord {
                attempt,
                started: at,
                duration_ms: started.elapsed().as_millis() as u64,
                error: failure.map(ToString::to_string),
                exit_status: failure.and_then(StageFailure::exit_status),
                job: ran_as,
            });
        }
        match result {
            Err(failure)
                if attempt < retries.attempts
                    && failure.retryable()
                    && *ctx.cancel.borrow() < Stop::Cancel =>
            {
                drop(ticket);
                let wait = retries.wait_after(attempt);
                ctx.events.event(Event::StageRetrying {
                    name: stage.name.clone(),
                    attempt,
                    attempts: retries.attempts,
                    error: failure.brief(),
                    wait,
                });
                let mut cancel = ctx.cancel.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    Ok(_) = cancel.wait_for(|s| *s >= Stop::Cancel) => break (Err(StageFailure::Cancelled), None),
                }
                // The next attempt starts from nothing, as the first did.
                staging.reset(stage, aside)?;
                attempt += 1;
            }
            other => break (other, ticket),
        }
    };
    let Executed {
        exit_status,
        log,
        checks,
        report,
        warnings,
    } = match executed {
        Ok(executed) => executed,
        Err(failure) => {
            record.log = failure.log().map(|l| l.display().to_string());
            return Err(failure);
        }
    };
    record.exit_status = exit_status;
    record.log = log.map(|l| l.display().to_string());
    record.checks = checks;
    record.report = report;
    for warning in warnings {
        ctx.events
            .event(Event::Warning(format!("stage `{}`: {warning}", stage.name)));
    }
    verify_inputs(ctx, index, inputs.clone()).await?;
    verify_outputs(stage, staging)?;
    let _ticket = match super::gate::waits_for_previous(ctx, index) {
        Some(previous) if ctx.ended(previous).is_none() => {
            drop(ticket);
            ctx.wait_for_end(previous).await?;
            admit(ctx, stage, &inputs).await?
        }
        _ => ticket,
    };
    let reported = record.checks.len();
    let set_aside = aside.map(Aside::moved).unwrap_or_default();
    let checks_passed =
        super::gate::gate(ctx, index, &staging.outputs, record, None, set_aside).await?;
    let summary = record
        .report
        .as_ref()
        .and_then(|r| r.get("summary").cloned())
        .unwrap_or(Json::Null);
    // Into the run cache before the commit moves the staged outputs away.
    let stored = keep_in_cache(ctx, index, &staging.outputs).await;
    let about = About {
        summary,
        metrics: record.metrics.clone(),
        restored: None,
        set_aside: aside.map(Aside::plan),
    };
    let (outputs, unchanged) = commit(ctx, index, &staging.outputs, now, locked, about).await?;
    Ok(Committed {
        outputs,
        unchanged,
        checks_passed,
        stored,
        reported,
    })
}

/// What a stage asks of the budget while it computes: its `resources:`, else one CPU and, for
/// a built-in, its estimate from the sizes of its inputs (a command: no memory); nothing for a
/// stage that computes elsewhere (on Spark, or as a job of an executor, whose scheduler has its
/// own budget).
fn demand(ctx: &Context, stage: &Stage, inputs: &[PathBuf]) -> super::admit::Demand {
    if stage.executor.is_some() {
        // Its `resources:` are what it asks of its node.
        return super::admit::Demand::default();
    }
    if stage.engine != crate::model::Engine::Local {
        // Computing on the cluster: only what it says it needs here.
        return super::admit::Demand {
            cpus: stage.limits.cpus.unwrap_or(0),
            memory: stage.limits.memory.unwrap_or(0),
        };
    }
    let estimate = || match &stage.kind {
        StageKind::Builtin { name, params, .. } => ctx.registry.memory(name, params, inputs),
        StageKind::Shell { .. } => None,
    };
    super::admit::Demand {
        cpus: stage.limits.cpus.unwrap_or(1),
        memory: stage.limits.memory.or_else(estimate).unwrap_or(0),
    }
}

/// A share of the budget for one attempt of `stage`, waiting (and saying so) when it does not
/// fit beside what computes; none for a stage that asks for nothing.
async fn admit<'c>(
    ctx: &'c Context,
    stage: &Stage,
    inputs: &[PathBuf],
) -> Result<Option<super::admit::Ticket<'c>>, StageFailure> {
    let demand = demand(ctx, stage, inputs);
    if demand == super::admit::Demand::default() {
        return Ok(None);
    }
    match ctx.admission.try_admit(demand) {
        Ok(ticket) => Ok(Some(ticket)),
        Err(in_use) => {
            ctx.events.event(Event::StageQueued {
                name: stage.name.clone(),
                demand,
                in_use,
                budget: ctx.admission.budget(),
            });
            let mut cancel = ctx.cancel.clone();
            tokio::select! {
                ticket = ctx.admission.admit(demand) => Ok(Some(ticket)),
                Ok(_) = cancel.wait_for(|s| *s >= Stop::Cancel) => Err(StageFailure::Cancelled),
            }
        }
    }
}

/// One attempt: the stage's execution under the run's stop requests and, with a `timeout`, a
/// stop of its own when the time is up, as Ctrl-C stops it; the attempt then fails as timed out,
/// whatever it returns (a command that exits 0 on SIGTERM may have written half its outputs).
async fn attempt_once(ctx: &Context, execution: Execution<'_>) -> Result<Executed, StageFailure> {
    // A job's timeout counts from when it runs, not from its time in the queue: the executor
    // enforces it.
    let local = execution.stage.executor.is_none();
    let Some(limit) = execution.timeout.filter(|_| local) else {
        return execute(&execution).await;
    };
    let (stop, cancel) = tokio::sync::watch::channel(*ctx.cancel.borrow());
    let execution = Execution {
        cancel,
        ..execution
    };
    let raise = |to: Stop| {
        stop.send_if_modified(|level| {
            let higher = to > *level;
            if higher {
                *level = to;
            }
            higher
        });
    };
    let mut run = ctx.cancel.clone();
    let mut listening = true;
    let mut timed_out = false;
    let work = execute(&execution);
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(work, deadline);
    loop {
        tokio::select! {
            result = &mut work => {
                return if timed_out {
                    Err(StageFailure::TimedOut { after: limit })
                } else {
                    result
                };
            }
            _ = &mut deadline, if !timed_out => {
                timed_out = true;
                tracing::debug!(stage = %execution.stage.name, ?limit, "timed out");
                raise(Stop::Cancel);
            }
            changed = run.changed(), if listening => match changed {
                Ok(()) => raise(*run.borrow_and_update()),
                Err(_) => listening = false,
            },
        }
    }
}

/// Copies the staged outputs into the run cache. A cache that cannot be written costs the
/// next restore, not this run: a warning.
async fn keep_in_cache(
    ctx: &Arc<Context>,
    index: usize,
    staged: &[PathBuf],
) -> Option<Vec<Stored>> {
    let ctx2 = ctx.clone();
    let staged = staged.to_vec();
    let kept = blocking(move || {
        let stage = ctx2.dag.stage(index);
        stage
            .outputs
            .iter()
            .zip(&staged)
            .map(|(port, path)| {
                ctx2.cache
                    .store(path, port.declared.dir || path.is_dir())
                    .map_err(|e| {
                        StageFailure::Other(format!(
                            "cannot keep `{}` in the run cache {}: {e}",
                            port.text,
                            ctx2.cache.root().display()
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await;
    match kept {
        Ok(stored) => Some(stored),
        Err(e) => {
            ctx.events.event(Event::Warning(format!(
                "stage `{}`: {e}",
                ctx.dag.stage(index).name
            )));
            None
        }
    }
}

/// Writes the run-cache entry of a stage that was computed and committed.
async fn remember(
    ctx: &Arc<Context>,
    index: usize,
    record: &StageRecord,
    stored: Vec<Stored>,
    reported: usize,
) -> Option<Entry> {
    let fingerprint = record.fingerprint.clone()?;
    if ctx.dag.stage(index).outputs.is_empty() {
        return None;
    }
    let stage = ctx.dag.stage(index);
    let workdir = &ctx.dag.pipeline().workdir;
    let outputs = stage
        .outputs
        .iter()
        .zip(stored)
        .filter_map(|(port, stored)| {
            let key = port.declared.location.display(workdir);
            let committed = record.outputs.get(&key)?.clone();
            // A local version's metadata, kept so that a restore makes the same version.
            let meta = stage
                .versioning
                .as_ref()
                .filter(|_| !port.declared.location.is_remote())
                .and_then(|_| ctx.store.latest_version(&port.declared))
                .and_then(|dir| ctx.cache.store_blob(&dir.join(versions::META)).ok());
            Some((
                key,
                CachedOutput {
                    blake3: stored.blake3,
                    size: stored.size,
                    files: stored.files,
                    committed,
                    meta,
                    executable: stored.executable,
                },
            ))
        })
        .collect();
    let json = |checks: &[crate::state::record::CheckRecord]| {
        checks
            .iter()
            .filter_map(|c| serde_json::to_value(c).ok())
            .collect()
    };
    let reported = reported.min(record.checks.len());
    let entry = Entry {
        format: cache::ENTRY_FORMAT,
        imba: cache::release_line(),
        fingerprint,
        stage: stage.name.clone(),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        duration_ms: record.duration_ms,
        outputs,
        reported_checks: json(&record.checks[..reported]),
        checks: json(&record.checks[reported..]),
        report: record.report.clone().unwrap_or(Json::Null),
    };
    let ctx2 = ctx.clone();
    let written = blocking(move || {
        ctx2.cache
            .put_entry(&entry)
            .map(|()| entry)
            .map_err(|e| StageFailure::Other(e.to_string()))
    })
    .await;
    match written {
        Ok(entry) => Some(entry),
        Err(e) => {
            ctx.events.event(Event::Warning(format!(
                "stage `{}`: cannot write its run-cache entry under {}: {e}",
                stage.name,
                ctx.cache.root().display()
            )));
            None
        }
    }
}

/// A stale stage whose fingerprint the run cache holds. When its outputs already hold what the
/// cache recorded (the lock points elsewhere: another `out`, a param changed and back), the
/// lock entry is written and nothing else happens; else the outputs are restored into staging
/// and committed as a computed stage's are, checks and all. `None`: compute it (no usable
/// entry; a blob that is missing or corrupt is warned of).
async fn from_cache(
    ctx: &Arc<Context>,
    index: usize,
    now: &plan::Snapshot,
    locked: &Option<LockedStage>,
    mut record: StageRecord,
    started: Instant,
) -> Option<Outcome> {
    let stage = ctx.dag.stage(index);
    let found = {
        let ctx = ctx.clone();
        let now = now.clone();
        blocking(move || {
            let stage = ctx.dag.stage(index);
            let workdir = &ctx.dag.pipeline().workdir;
            Ok(plan::from_cache(
                stage,
                &now,
                &ctx.cache,
                &*ctx.store,
                workdir,
            ))
        })
        .await
        .ok()
        .flatten()?
    };
    let (entry, how) = found;
    let held = how == plan::FromCache::Held;
    let checks = |list: &[Json]| -> Vec<crate::state::record::CheckRecord> {
        list.iter()
            .filter_map(|c| serde_json::from_value(c.clone()).ok())
            .collect()
    };
    let committed: BTreeMap<String, ContentHash> = entry
        .outputs
        .iter()
        .map(|(k, o)| (k.clone(), o.committed.clone()))
        .collect();
    record.report = (!entry.report.is_null()).then(|| entry.report.clone());
    if held {
        let mut lock_entry = now.entry.clone();
        lock_entry.outputs = committed.clone();
        // The same bytes as the entry before: its metrics hold (any others are measured when
        // `imba metrics` asks).
        if let Some(before) = locked.as_ref().filter(|l| l.outputs == committed) {
            lock_entry.metrics = before.metrics.clone();
        }
        if let Err(e) = ctx.record_commit(&stage.name, lock_entry) {
            return Some(conclude(ctx, stage, record, StageFailure::Storage(e)));
        }
        ctx.cache.touch(&entry.fingerprint);
        record.decision = Decision::Cached;
        record.outputs = committed;
        record.checks = checks(&entry.reported_checks);
        record.checks.extend(checks(&entry.checks));
        record.duration_ms = started.elapsed().as_millis() as u64;
        ctx.events.event(Event::StageCached {
            name: stage.name.clone(),
        });
        return Some(Outcome::Skipped { record });
    }
    ctx.events.event(Event::StageRestoring {
        name: stage.name.clone(),
        reasons: record.reasons.clone(),
    });
    let staging = Staging::new(ctx, stage);
    let restored = restore(ctx, index, &staging, &entry).await;
    if let Err(e) = restored {
        staging.remove();
        ctx.events.event(Event::Warning(format!(
            "stage `{}`: {e}; computing it instead",
            stage.name
        )));
        return None;
    }
    record.checks = checks(&entry.reported_checks);
    let gated = super::gate::gate(
        ctx,
        index,
        &staging.outputs,
        &mut record,
        Some(checks(&entry.checks)),
        Vec::new(),
    )
    .await;
    let summary = entry.report.get("summary").cloned().unwrap_or(Json::Null);
    let done = match gated {
        Ok(passed) => {
            let meta = entry
                .outputs
                .values()
                .find_map(|o| o.meta.as_ref())
                .and_then(|m| ctx.cache.read_blob(m))
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            let committed = commit(
                ctx,
                index,
                &staging.outputs,
                now.clone(),
                locked.clone(),
                About {
                    summary,
                    metrics: record.metrics.clone(),
                    restored: meta,
                    set_aside: None,
                },
            );
            committed.await.map(|c| (passed, c))
        }
        Err(failure) => Err(failure),
    };
    staging.remove();
    match done {
        Ok((checks_passed, (outputs, unchanged))) => {
            ctx.cache.touch(&entry.fingerprint);
            record.decision = Decision::Restored;
            record.outputs = outputs;
            record.unchanged = unchanged;
            record.duration_ms = started.elapsed().as_millis() as u64;
            ctx.events.event(Event::StageDone {
                name: stage.name.clone(),
                duration: started.elapsed(),
                unchanged,
                checks_passed,
                restored: Some(std::time::Duration::from_millis(entry.duration_ms)),
            });
            Some(Outcome::Ran { record })
        }
        Err(failure) => Some(conclude(ctx, stage, record, failure)),
    }
}

/// Writes the entry's outputs into the stage's staging paths, each checked against its hash.
async fn restore(
    ctx: &Arc<Context>,
    index: usize,
    staging: &Staging,
    entry: &Entry,
) -> Result<(), StageFailure> {
    staging.prepare(ctx.dag.stage(index))?;
    let ctx = ctx.clone();
    let entry = entry.clone();
    let staged = staging.outputs.clone();
    blocking(move || {
        let stage = ctx.dag.stage(index);
        let workdir = &ctx.dag.pipeline().workdir;
        for (port, to) in stage.outputs.iter().zip(&staged) {
            let key = port.declared.location.display(workdir);
            let Some(output) = entry.outputs.get(&key) else {
                return Err(StageFailure::Other(format!("the run cache has no `{key}`")));
            };
            if output.files.is_some() {
                // The folder is made whole by the restore.
                let _ = std::fs::remove_dir_all(to);
            }
            ctx.cache
                .restore(output, to, &key)
                .map_err(|e| StageFailure::Other(e.to_string()))?;
        }
        Ok(())
    })
    .await
}

/// Where a stage writes: `.imba/staging/RUN/STAGE/N/NAME` for its N-th output, or its
/// declared path for an output its command writes in place.
struct Staging {
    root: PathBuf,
    outputs: Vec<PathBuf>,
    /// Per output: whether `outputs` holds its declared path.
    in_place: Vec<bool>,
}

impl Staging {
    /// Staging paths for every output: where imba itself writes (a restore).
    fn new(ctx: &Context, stage: &Stage) -> Self {
        let root = ctx.state.staging(&ctx.run_id).join(file_name(&stage.name));
        let outputs = stage
            .outputs
            .iter()
            .enumerate()
            .map(|(i, port)| staging_path(&root, i, port))
            .collect();
        Staging {
            root,
            outputs,
            in_place: vec![false; stage.outputs.len()],
        }
    }

    /// Where the stage's own command or built-in writes: the declared path of each output its
    /// command writes in place, a staging path for the others.
    fn for_stage(ctx: &Context, stage: &Stage) -> Self {
        let mut staging = Staging::new(ctx, stage);
        if let StageKind::Shell { in_place, .. } = &stage.kind {
            for (i, port) in stage.outputs.iter().enumerate() {
                let target = port.declared.location.local_path();
                if let (true, Some(target)) = (in_place[i], target) {
                    staging.outputs[i] = target.to_path_buf();
                    staging.in_place[i] = true;
                }
            }
        }
        staging
    }

    /// Moves the previous content of the outputs written in place aside (`None` when there are
    /// none), each checked to stay inside the workdir first; on a blocking thread.
    async fn set_aside(
        &self,
        ctx: &Arc<Context>,
        stage: &Stage,
    ) -> Result<Option<Aside>, StageFailure> {
        let targets: Vec<PathBuf> = self
            .outputs
            .iter()
            .zip(&self.in_place)
            .filter(|(_, &in_place)| in_place)
            .map(|(path, _)| path.clone())
            .collect();
        if targets.is_empty() {
            return Ok(None);
        }
        let (ctx, name) = (ctx.clone(), stage.name.clone());
        blocking(move || {
            let workdir = &ctx.dag.pipeline().workdir;
            for target in &targets {
                crate::config::confine::check_target(target, workdir).map_err(|e| {
                    StageFailure::Other(format!("output {}: {e}", target.display()))
                })?;
            }
            Aside::set(&ctx.state.root, workdir, &ctx.run_id, &name, &targets)
                .map(Some)
                .map_err(|e| StageFailure::Other(format!("before running the command: {e}")))
        })
        .await
    }

    /// Creates each directory output, and the parent of each file output.
    fn prepare(&self, stage: &Stage) -> Result<(), StageFailure> {
        let prepared = || -> std::io::Result<()> {
            for ((port, path), in_place) in
                stage.outputs.iter().zip(&self.outputs).zip(&self.in_place)
            {
                if *in_place {
                    // The command makes it, as it would without imba.
                    continue;
                }
                if port.declared.dir {
                    std::fs::create_dir_all(path)?;
                } else if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
            }
            Ok(())
        };
        prepared().map_err(|e| {
            StageFailure::Other(format!(
                "cannot prepare staging under {}: {e}",
                self.root.display()
            ))
        })
    }

    /// Whatever is left: committed outputs were moved away, the rest is dropped.
    fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }

    /// Before another attempt: what the failed one wrote goes (staged outputs, and outputs
    /// written in place, whose previous content is safe aside), and staging is as new.
    fn reset(&self, stage: &Stage, aside: Option<&Aside>) -> Result<(), StageFailure> {
        let gone = |path: &Path| {
            crate::store::fs::remove_any(path);
            match std::fs::symlink_metadata(path) {
                Ok(_) => Err(StageFailure::Other(format!(
                    "before the next attempt, cannot remove {}",
                    path.display()
                ))),
                Err(_) => Ok(()),
            }
        };
        gone(&self.root)?;
        for (target, _) in aside.map(Aside::moved).unwrap_or_default() {
            gone(&target)?;
        }
        self.prepare(stage)
    }
}

fn staging_path(root: &Path, i: usize, port: &Port) -> PathBuf {
    root.join(i.to_string())
        .join(super::gate::output_name(port))
}

/// The local path of each input: the input itself, or the local copy of a remote one
/// (downloaded once per identity).
async fn fetch_inputs(ctx: &Arc<Context>, index: usize) -> Result<Vec<PathBuf>, StageFailure> {
    let ctx = ctx.clone();
    blocking(move || {
        ctx.dag
            .stage(index)
            .inputs
            .iter()
            .map(|port| ctx.store.local_copy(&port.declared))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StageFailure::Storage(e.to_string()))
    })
    .await
}

/// Local copies of remote inputs are shared (with other stages, and later runs): a stage that
/// changed one fails, naming it, and nothing of it is committed.
async fn verify_inputs(
    ctx: &Arc<Context>,
    index: usize,
    inputs: Vec<PathBuf>,
) -> Result<(), StageFailure> {
    let ctx = ctx.clone();
    blocking(move || {
        for (port, local) in ctx.dag.stage(index).inputs.iter().zip(&inputs) {
            ctx.store
                .verify_copy(&port.declared, local)
                .map_err(|e| StageFailure::Other(e.to_string()))?;
        }
        Ok(())
    })
    .await
}

/// Every declared output must have been written.
fn verify_outputs(stage: &Stage, staging: &Staging) -> Result<(), StageFailure> {
    let Some(i) = (0..stage.outputs.len()).find(|&i| !staging.outputs[i].exists()) else {
        return Ok(());
    };
    let port = &stage.outputs[i];
    let placeholder = port.placeholder(i);
    let hint = match &stage.kind {
        StageKind::Shell { .. } if staging.in_place[i] => Some(format!(
            "the command names no staging path for it, so it is to write it in place, at `{}`; or to `{placeholder}`",
            port.text
        )),
        StageKind::Shell { .. } => Some(format!(
            "the command must write it to `{placeholder}`, a staging path that imba moves into place"
        )),
        StageKind::Builtin { .. } => None,
    };
    Err(StageFailure::MissingOutput {
        output: port.text.clone(),
        hint,
    })
}

/// What a commit needs to know besides the outputs: the built-in's summary (for a version's
/// `_meta.json`), the metadata a restored version was computed with, and the plan of outputs
/// written in place (removed once they are committed).
struct About {
    summary: Json,
    /// The stage's metrics, measured on the staged outputs: into the lock entry.
    metrics: BTreeMap<String, crate::state::lock::Measured>,
    restored: Option<versions::Meta>,
    set_aside: Option<PathBuf>,
}

/// Moves the staged outputs into place through the store, then writes the lock entry.
async fn commit(
    ctx: &Arc<Context>,
    index: usize,
    staged: &[PathBuf],
    now: plan::Snapshot,
    previous: Option<LockedStage>,
    about: About,
) -> Result<(BTreeMap<String, ContentHash>, bool), StageFailure> {
    let About {
        summary,
        metrics,
        restored,
        set_aside,
    } = about;
    let ctx = ctx.clone();
    let staged = staged.to_vec();
    blocking(move || {
        let stage = ctx.dag.stage(index);
        let pipeline = ctx.dag.pipeline();
        let workdir = &pipeline.workdir;
        let failed = |e: crate::store::StoreError| StageFailure::Storage(e.to_string());
        let (outputs, unchanged) = match (&stage.versioning, stage.outputs.as_slice()) {
            (Some(versioning), [port]) => {
                let meta = versions::MetaInput {
                    pipeline: pipeline.file.display().to_string(),
                    stage: stage.name.clone(),
                    fingerprint: now.fingerprint.clone(),
                    inputs: serde_json::to_value(&now.entry.inputs).unwrap_or(Json::Null),
                    params: now.entry.params.clone(),
                    report: summary,
                    workdir: workdir.clone(),
                    vars: Json::Object(crate::state::record::shown_vars(pipeline)),
                    restored,
                };
                let to = Staged {
                    from: &staged[0],
                    to: &port.declared,
                    shown: &port.text,
                };
                let version = ctx
                    .store
                    .commit_version(to, versioning, meta, &ctx.run_id)
                    .map_err(failed)?;
                tracing::debug!(stage = %stage.name, version = version.number, reused = version.reused, "versioned commit");
                let outputs =
                    BTreeMap::from([(port.declared.location.display(workdir), version.hash)]);
                (outputs, version.reused)
            }
            _ => {
                let all: Vec<Staged> = stage
                    .outputs
                    .iter()
                    .zip(&staged)
                    .map(|(port, from)| Staged {
                        from,
                        to: &port.declared,
                        shown: &port.text,
                    })
                    .collect();
                let hashes = ctx.store.commit(&all, &ctx.run_id).map_err(failed)?;
                // The outputs written in place are final now: nothing is to be put back, even
                // if imba dies before the lock records them (then they are stale, not torn).
                if let Some(plan) = &set_aside {
                    let _ = std::fs::remove_file(plan);
                }
                let outputs: BTreeMap<String, ContentHash> = stage
                    .outputs
                    .iter()
                    .map(|port| port.declared.location.display(workdir))
                    .zip(hashes)
                    .collect();
                let unchanged = previous.as_ref().is_some_and(|p| p.outputs == outputs);
                (outputs, unchanged)
            }
        };
        let mut entry = now.entry;
        entry.outputs = outputs.clone();
        entry.metrics = metrics;
        ctx.record_commit(&stage.name, entry)
            .map_err(StageFailure::Storage)?;
        Ok((outputs, unchanged))
    })
    .await
}

/// Ends a stage that did not succeed: cancelled when the run was, and the failure looks like
/// what a cancellation does; else failed, with its error, log and the param it names.
pub(super) fn conclude(
    ctx: &Context,
    stage: &Stage,
    mut record: StageRecord,
    failure: StageFailure,
) -> Outcome {
    if *ctx.cancel.borrow() >= Stop::Cancel && failure.may_be_cancellation() {
        return cancelled(ctx, record);
    }
    if let Some(code) = failure.exit_status() {
        record.exit_status = Some(code);
    }
    let param = match &failure {
        StageFailure::Builtin {
            param: Some(pointer),
            ..
        } => stage.param_spans.get(pointer).copied(),
        _ => None,
    };
    record.decision = Decision::Failed;
    let error = failure.to_string();
    record.error = Some(error.clone());
    ctx.events.event(Event::StageFailed {
        name: record.name.clone(),
        error,
        log: failure.log().cloned(),
        param,
    });
    Outcome::Failed { record }
}

fn cancelled(ctx: &Context, mut record: StageRecord) -> Outcome {
    record.decision = Decision::Cancelled;
    ctx.events.event(Event::StageCancelled {
        name: record.name.clone(),
    });
    Outcome::Cancelled { record }
}

/// Runs `f` on a blocking thread (hashing, file moves, requests), never on the runtime's
/// workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StageFailure> + Send + 'static,
) -> Result<T, StageFailure> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StageFailure::Other(format!("internal error: {e}"))))
}
