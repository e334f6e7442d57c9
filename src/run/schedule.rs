//! The scheduler: stages start as soon as what they need is done, at most `jobs` at a time,
//! in the pipeline's order among those ready; a failure stops new starts (unless
//! `--keep-going`), and a stop request cancels or kills what runs.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::stage::{run_stage_and_hook, stage_record};
use super::{Context, Event, Outcome, RunOptions};
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
        scheduler.start_ready(&mut tasks, forced, options.jobs.max(1));
        if tasks.is_empty() {
            break;
        }
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok((stage, outcome))) => scheduler.done(stage, outcome, options.keep_going),
                // A panic inside a stage task: its stage has no outcome, and says so.
                Some(Err(e)) => ctx.events.event(Event::Warning(format!("internal error: {e}"))),
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

/// What the scheduler knows between two events.
struct Scheduler {
    ctx: Arc<Context>,
    /// The stage's position in the pipeline's order: among ready stages, the first starts first.
    position: Vec<usize>,
    /// How many selected stages each selected stage still waits for.
    waiting: BTreeMap<usize, usize>,
    ready: BinaryHeap<Reverse<(usize, usize)>>,
    outcomes: BTreeMap<usize, Outcome>,
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
        let ready = waiting
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(s, _)| Reverse((position[*s], *s)))
            .collect();
        Scheduler {
            position,
            waiting,
            ready,
            outcomes: BTreeMap::new(),
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
            let ctx = self.ctx.clone();
            let force = forced.contains(&stage);
            tasks.spawn(async move { (stage, run_stage_and_hook(ctx, stage, force).await) });
        }
    }

    /// A stage ended: its dependents may become ready; a failure stops new starts and
    /// cancels what runs, unless `keep_going`.
    fn done(&mut self, stage: usize, outcome: Outcome, keep_going: bool) {
        match &outcome {
            Outcome::Ran { .. } | Outcome::Skipped { .. } => {
                for next in self.ctx.dag.dependents(stage) {
                    if let Some(n) = self.waiting.get_mut(&next) {
                        *n -= 1;
                        if *n == 0 {
                            self.ready.push(Reverse((self.position[next], next)));
                        }
                    }
                }
            }
            Outcome::Failed { .. } if !keep_going => {
                self.stopping = true;
                self.cancel.send_if_modified(|level| {
                    let raise = *level < Stop::Cancel;
                    if raise {
                        *level = Stop::Cancel;
                    }
                    raise
                });
            }
            _ => {}
        }
        self.outcomes.insert(stage, outcome);
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
            let outcome = match failed_upstream {
                Some(by) => {
                    let by = dag.stage(by).name.clone();
                    self.ctx.events.event(Event::StageBlocked {
                        name: name.clone(),
                        by: by.clone(),
                    });
                    let mut record = stage_record(&name, Decision::Blocked);
                    record.reasons.push(format!("upstream {by} failed"));
                    Outcome::Cancelled { record }
                }
                None => {
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
