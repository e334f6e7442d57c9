//! The scheduler: stages start as soon as what they need is done, at most `jobs` at a time,
//! oldest partition first and in the pipeline's order among those ready; a failure stops new
//! starts (unless `--keep-going`), but a failure inside a partition stops only that partition,
//! and a stop request cancels or kills what runs.
//!
//! A stage whose `change` check compares with the previous partition's output computes in
//! parallel with it, then waits at its gate for that instance to end, whatever its outcome (an
//! ordering, not a dependency); a stage waiting so holds no job slot.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::stage::{run_stage_and_hook, stage_record};
use super::{Context, Ended, Event, Outcome, RunOptions};
use crate::interrupt::Stop;
use crate::state::record::Decision;

/// Runs the selected stages; each one's outcome, and whether the run was interrupted.
pub(super) async fn schedule(
    ctx: Arc<Context>,
    selected: &BTreeSet<usize>,
    forced: &BTreeSet<usize>,
    options: &RunOptions,
    cancel: watch::Sender<Stop>,
) -> (BTreeMap<usize, Outcome>, bool) {
    let mut scheduler = Scheduler::new(ctx.clone(), selected, cancel);
    let mut tasks = JoinSet::new();
    let mut stop = options.stop.clone();
    let mut listening = true;
    loop {
        let parked = ctx.parked.load(std::sync::atomic::Ordering::SeqCst);
        scheduler.start_ready(&mut tasks, forced, options.jobs.max(1) + parked);
        if tasks.is_empty() {
            break;
        }
        tokio::select! {
            // A stage parked at its gate: its slot is free for another.
            _ = ctx.parked_notify.notified() => {}
            joined = tasks.join_next() => match joined {
                Some(Ok((stage, outcome))) => scheduler.done(stage, outcome, options.keep_going),
                // A panic inside a stage task: the stage failed, and what waits for it is told.
                Some(Err(e)) => {
                    let stage = scheduler.tasks.remove(&e.id());
                    ctx.events.event(Event::Warning(format!("internal error: {e}")));
                    if let Some(stage) = stage {
                        let name = ctx.dag.stage(stage).name.clone();
                        let mut record = stage_record(&name, Decision::Failed);
                        record.error = Some(format!("internal error: {e}"));
                        scheduler.done(stage, Outcome::Failed { record }, options.keep_going);
                    }
                }
                None => {}
            },
            changed = stop.changed(), if listening => {
                let level = if changed.is_ok() { *stop.borrow_and_update() } else { Stop::Go };
                scheduler.stop(level);
                if changed.is_err() {
                    // Nobody can ask any more: stop listening.
                    listening = false;
                } else if level == Stop::Kill {
                    scheduler.reap(&mut tasks).await;
                    break;
                }
            }
        }
    }
    scheduler.finish(selected)
}

/// Each partition's place in its set (`2017-01` is 0), by (set, key): the oldest runs first.
fn partition_ranks(pipeline: &crate::model::Pipeline) -> BTreeMap<(&str, &str), usize> {
    pipeline
        .partitions
        .iter()
        .flat_map(|set| {
            set.keys
                .iter()
                .enumerate()
                .map(move |(i, key)| ((set.name.as_str(), key.as_str()), i))
        })
        .collect()
}

/// What the scheduler knows between two events.
struct Scheduler {
    ctx: Arc<Context>,
    /// Among ready stages, the least starts first: (the partition's place in its set, the
    /// stage's place in the pipeline's order).
    priority: Vec<(usize, usize)>,
    /// How many selected stages each selected stage still waits for.
    waiting: BTreeMap<usize, usize>,
    /// The stage each running task runs.
    tasks: std::collections::HashMap<tokio::task::Id, usize>,
    ready: BinaryHeap<Reverse<((usize, usize), usize)>>,
    outcomes: BTreeMap<usize, Outcome>,
    /// Selected stages that will not start: downstream of a failure, or in a failed partition.
    abandoned: BTreeSet<usize>,
    /// Partitions (set, key) in which a stage failed, with the first stage that did.
    failed_partitions: BTreeMap<(String, String), usize>,
    /// No new stage starts: one failed, or the run was asked to stop.
    stopping: bool,
    interrupted: bool,
    /// The stop level the stages see (their commands get signals from it).
    cancel: watch::Sender<Stop>,
}

impl Scheduler {
    fn new(ctx: Arc<Context>, selected: &BTreeSet<usize>, cancel: watch::Sender<Stop>) -> Self {
        let dag = &ctx.dag;
        let waiting: BTreeMap<usize, usize> = selected
            .iter()
            .map(|&s| {
                let needs = dag.needs(s);
                (
                    s,
                    needs.iter().filter(|(d, _)| selected.contains(d)).count(),
                )
            })
            .collect();
        let position = dag.positions();
        let rank = partition_ranks(dag.pipeline());
        let priority: Vec<(usize, usize)> = (0..position.len())
            .map(|s| {
                let partition = dag.stage(s).partition.as_ref();
                let rank = partition
                    .and_then(|p| rank.get(&(p.set.as_str(), p.key.as_str())))
                    .copied()
                    .unwrap_or(0);
                (rank, position[s])
            })
            .collect();
        let ready = waiting
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(s, _)| Reverse((priority[*s], *s)))
            .collect();
        Scheduler {
            priority,
            waiting,
            tasks: std::collections::HashMap::new(),
            ready,
            outcomes: BTreeMap::new(),
            abandoned: BTreeSet::new(),
            failed_partitions: BTreeMap::new(),
            stopping: false,
            interrupted: false,
            cancel,
            ctx,
        }
    }

    /// Starts ready stages until `jobs` run.
    fn start_ready(
        &mut self,
        tasks: &mut JoinSet<(usize, Outcome)>,
        forced: &BTreeSet<usize>,
        jobs: usize,
    ) {
        while !self.stopping && tasks.len() < jobs {
            let Some(Reverse((_, stage))) = self.ready.pop() else {
                break;
            };
            if self.abandoned.contains(&stage) {
                continue;
            }
            let ctx = self.ctx.clone();
            let force = forced.contains(&stage);
            let handle =
                tasks.spawn(async move { (stage, run_stage_and_hook(ctx, stage, force).await) });
            self.tasks.insert(handle.id(), stage);
        }
    }

    /// One fewer thing for `next` to wait for.
    fn release(&mut self, next: usize) {
        if let Some(n) = self.waiting.get_mut(&next) {
            *n -= 1;
            if *n == 0 {
                self.ready.push(Reverse((self.priority[next], next)));
            }
        }
    }

    /// These stages will not start: a gate waiting for one of them goes on without it.
    fn abandon(&mut self, stages: impl IntoIterator<Item = usize>) {
        for stage in stages {
            if self.waiting.contains_key(&stage)
                && !self.outcomes.contains_key(&stage)
                && self.abandoned.insert(stage)
            {
                self.ctx.mark_ended(stage, Ended::NotRun);
            }
        }
    }

    /// A stage ended: its dependents may become ready; a failure stops new starts and
    /// cancels what runs, unless `keep_going`, or it was inside a partition: then only that
    /// partition's other stages and what depends on the failed one do not start.
    fn done(&mut self, stage: usize, outcome: Outcome, keep_going: bool) {
        self.tasks.retain(|_, s| *s != stage);
        self.ctx.mark_ended(
            stage,
            match &outcome {
                Outcome::Ran { .. } | Outcome::Skipped { .. } => Ended::Committed,
                Outcome::Failed { .. } => Ended::Failed,
                Outcome::Cancelled { .. } => Ended::NotRun,
            },
        );
        match &outcome {
            Outcome::Ran { .. } | Outcome::Skipped { .. } => {
                for next in self.ctx.dag.dependents(stage) {
                    self.release(next);
                }
            }
            Outcome::Failed { .. } => {
                let dag = self.ctx.dag.clone();
                let partition = dag.stage(stage).partition.clone();
                if let Some(partition) = &partition {
                    self.failed_partitions
                        .entry((partition.set.clone(), partition.key.clone()))
                        .or_insert(stage);
                }
                self.outcomes.insert(stage, outcome);
                self.abandon(dag.descendants(&BTreeSet::from([stage])));
                match partition {
                    _ if keep_going => {}
                    Some(partition) => {
                        let same: Vec<usize> = self
                            .waiting
                            .keys()
                            .copied()
                            .filter(|&s| dag.stage(s).partition.as_ref() == Some(&partition))
                            .filter(|s| !self.started(*s))
                            .collect();
                        self.abandon(same);
                    }
                    None => {
                        self.stopping = true;
                        self.cancel.send_if_modified(|level| {
                            let raise = *level < Stop::Cancel;
                            if raise {
                                *level = Stop::Cancel;
                            }
                            raise
                        });
                    }
                }
                return;
            }
            _ => {}
        }
        self.outcomes.insert(stage, outcome);
    }

    /// Whether `stage` was started (it ended, or it runs now).
    fn started(&self, stage: usize) -> bool {
        self.outcomes.contains_key(&stage) || self.tasks.values().any(|&s| s == stage)
    }

    /// The run was asked to stop (Ctrl-C, SIGTERM, `watch --restart`): pass the level on to
    /// the stages.
    fn stop(&mut self, level: Stop) {
        if level >= Stop::Cancel && !self.interrupted {
            self.interrupted = true;
            self.stopping = true;
            self.ctx.events.event(Event::Warning(
                "interrupted: cancelling running stages (again to kill them); outputs and lock stay as they were".to_owned(),
            ));
        }
        if level > *self.cancel.borrow() {
            let _ = self.cancel.send(level);
        }
    }

    /// After a kill: commands get SIGKILL from their own tasks; give them a moment to be
    /// reaped, then stop waiting for whatever is still computing.
    async fn reap(&mut self, tasks: &mut JoinSet<(usize, Outcome)>) {
        let grace = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    Some(Ok((stage, outcome))) => {
                        self.outcomes.insert(stage, outcome);
                    }
                    Some(Err(_)) => {}
                    None => break,
                },
                _ = &mut grace => break,
            }
        }
        tasks.abort_all();
    }

    /// Every selected stage that never ran is blocked by a failed upstream stage, or cancelled.
    fn finish(mut self, selected: &BTreeSet<usize>) -> (BTreeMap<usize, Outcome>, bool) {
        let dag = self.ctx.dag.clone();
        for &stage in dag.order() {
            if !selected.contains(&stage) || self.outcomes.contains_key(&stage) {
                continue;
            }
            let name = dag.stage(stage).name.clone();
            let failed_upstream = dag
                .ancestors(&BTreeSet::from([stage]))
                .into_iter()
                .find(|a| matches!(self.outcomes.get(a), Some(Outcome::Failed { .. })));
            // A stage of a partition in which another stage failed.
            let failed_partition = dag.stage(stage).partition.as_ref().and_then(|p| {
                self.failed_partitions
                    .get(&(p.set.clone(), p.key.clone()))
                    .map(|&by| (p.key.clone(), by))
            });
            let outcome = match (failed_upstream, failed_partition) {
                (Some(by), _) => {
                    let by = dag.stage(by).name.clone();
                    self.ctx.events.event(Event::StageBlocked {
                        name: name.clone(),
                        by: by.clone(),
                    });
                    let mut record = stage_record(&name, Decision::Blocked);
                    record.reasons.push(format!("upstream {by} failed"));
                    Outcome::Cancelled { record }
                }
                (None, Some((key, by))) => {
                    let by = dag.stage(by).name.clone();
                    self.ctx.events.event(Event::StageBlocked {
                        name: name.clone(),
                        by: by.clone(),
                    });
                    let mut record = stage_record(&name, Decision::Blocked);
                    record
                        .reasons
                        .push(format!("{by} failed in partition {key}"));
                    Outcome::Cancelled { record }
                }
                (None, None) => {
                    self.ctx
                        .events
                        .event(Event::StageCancelled { name: name.clone() });
                    Outcome::Cancelled {
                        record: stage_record(&name, Decision::Cancelled),
                    }
                }
            };
            self.outcomes.insert(stage, outcome);
        }
        (self.outcomes, self.interrupted)
    }
}
