//! The scheduler: stages start as soon as what they need is done, at most `jobs` at a time,
//! in the pipeline's order among those ready; a failure stops new starts (unless
//! `--keep-going`), and a stop request cancels or kills what runs.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::stage::{run_stage_and_hook, stage_record};
use super::{Context, Event, Outcome, RunOptions};
use crate::interrupt::Stop;
use crate::state::record::Decision;

pub(super) async fn schedule(
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
                let mut record = stage_record(&name, Decision::Blocked);
                record.reasons.push(format!("upstream {by} failed"));
                Outcome::Cancelled { record }
            }
            None => {
                ctx.events
                    .event(Event::StageCancelled { name: name.clone() });
                Outcome::Cancelled {
                    record: stage_record(&name, Decision::Cancelled),
                }
            }
        };
        outcomes.insert(stage, outcome);
    }
    (outcomes, interrupted)
}
