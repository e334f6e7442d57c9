//! The partition grid of `imba status`: partitions down, stages across, each cell the state of
//! one stage instance (up to date, stale, failed, quarantined, never run).

use std::collections::BTreeMap;

use serde::Serialize;

use super::columns;
use crate::graph::Dag;
use crate::plan::{Reason, StageStatus};
use crate::state::record::{Decision, RunRecord};

/// Where one stage instance stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    UpToDate,
    /// Its inputs, params or code changed since it last ran (or an upstream stage is stale).
    Stale,
    /// It failed in its latest run, and has not succeeded since.
    Failed,
    /// Its latest run failed a check: the outputs are in quarantine.
    Quarantined,
    /// It has never run (or never succeeded).
    NeverRun,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::UpToDate => "up to date",
            State::Stale => "stale",
            State::Failed => "failed",
            State::Quarantined => "quarantined",
            State::NeverRun => "never run",
        }
    }
}

/// The state of each stage in `statuses`, by index: its plan status and its latest decision in
/// `runs` (newest first).
pub fn states(statuses: &[StageStatus], runs: &[RunRecord]) -> BTreeMap<usize, State> {
    statuses
        .iter()
        .map(|status| {
            let state = if !status.stale {
                State::UpToDate
            } else {
                // The newest run that decided anything about it (not one that skipped it as
                // blocked or cancelled).
                let latest = runs.iter().find_map(|run| {
                    run.stages.iter().find(|s| {
                        s.name == status.name
                            && !matches!(s.decision, Decision::Blocked | Decision::Cancelled)
                    })
                });
                match latest {
                    Some(s) if s.decision == Decision::Failed && s.quarantine.is_some() => {
                        State::Quarantined
                    }
                    Some(s) if s.decision == Decision::Failed => State::Failed,
                    _ if status.reasons.contains(&Reason::NeverRun) => State::NeverRun,
                    _ => State::Stale,
                }
            };
            (status.index, state)
        })
        .collect()
}

/// One partition's row: its set, key and each partitioned stage's state by base name.
#[derive(Debug, Serialize)]
pub struct Row {
    pub set: String,
    pub key: String,
    pub stages: BTreeMap<String, State>,
}

/// The grid's rows, each set's keys in order, for the stages in `states`; with the base names
/// of the partitioned stages, in the pipeline's order.
pub fn rows(dag: &Dag, states: &BTreeMap<usize, State>) -> (Vec<String>, Vec<Row>) {
    let mut names: Vec<String> = Vec::new();
    let mut cells: BTreeMap<(&str, &str), BTreeMap<String, State>> = BTreeMap::new();
    for &index in dag.order() {
        let stage = dag.stage(index);
        let (Some(partition), Some(state)) = (&stage.partition, states.get(&index)) else {
            continue;
        };
        let base = partition.base(&stage.name).to_owned();
        if !names.contains(&base) {
            names.push(base.clone());
        }
        cells
            .entry((partition.set.as_str(), partition.key.as_str()))
            .or_default()
            .insert(base, *state);
    }
    let mut rows = Vec::new();
    for set in &dag.pipeline().partitions {
        for key in &set.keys {
            if let Some(stages) = cells.remove(&(set.name.as_str(), key.as_str())) {
                rows.push(Row {
                    set: set.name.clone(),
                    key: key.clone(),
                    stages,
                });
            }
        }
    }
    (names, rows)
}

/// The grid as text: a header of stage names, a line per partition, then the stages that are
/// not partitioned, and a count of partitions by how far they are from up to date.
pub fn grid(dag: &Dag, statuses: &[StageStatus], states: &BTreeMap<usize, State>) -> String {
    let (names, rows) = rows(dag, states);
    let mut out = String::new();
    // Rows come set by set, so that repeats are adjacent.
    let sets: Vec<&str> = {
        let mut sets: Vec<&str> = rows.iter().map(|r| r.set.as_str()).collect();
        sets.dedup();
        sets
    };
    for set in &sets {
        let mut table: Vec<Vec<String>> = Vec::new();
        let used: Vec<&String> = names
            .iter()
            .filter(|n| {
                rows.iter()
                    .any(|r| r.set == *set && r.stages.contains_key(*n))
            })
            .collect();
        let mut header = vec![(*set).to_owned()];
        header.extend(used.iter().map(|n| (*n).clone()));
        table.push(header);
        for row in rows.iter().filter(|r| r.set == *set) {
            let mut line = vec![row.key.clone()];
            line.extend(
                used.iter()
                    .map(|n| row.stages.get(*n).map_or("-", |s| s.as_str()).to_owned()),
            );
            table.push(line);
        }
        out.push_str(&columns(&table));
        // Partitions by their worst cell.
        let mut counts: Vec<(State, usize)> = Vec::new();
        for row in rows.iter().filter(|r| r.set == *set) {
            let worst = [
                State::Quarantined,
                State::Failed,
                State::NeverRun,
                State::Stale,
            ]
            .into_iter()
            .find(|s| row.stages.values().any(|v| v == s))
            .unwrap_or(State::UpToDate);
            match counts.iter_mut().find(|(s, _)| *s == worst) {
                Some((_, n)) => *n += 1,
                None => counts.push((worst, 1)),
            }
        }
        counts.sort_by_key(|(s, _)| *s as u8);
        let total: usize = counts.iter().map(|(_, n)| n).sum();
        let parts: Vec<String> = counts
            .iter()
            .map(|(s, n)| format!("{n} {}", s.as_str()))
            .collect();
        out.push_str(&format!(
            "{} of `{set}`: {}\n",
            plural(total, "partition", "partitions"),
            parts.join(", ")
        ));
    }
    // The stages outside every partition, each with its state.
    let others: Vec<Vec<String>> = dag
        .order()
        .iter()
        .filter(|&&i| dag.stage(i).partition.is_none())
        .filter_map(|&i| {
            let state = states.get(&i)?;
            let status = statuses.iter().find(|s| s.index == i)?;
            let why = match (state, status.reasons.first()) {
                (State::Stale, Some(reason)) => format!(" ({reason})"),
                _ => String::new(),
            };
            Some(vec![
                dag.stage(i).name.clone(),
                format!("{}{why}", state.as_str()),
            ])
        })
        .collect();
    if !others.is_empty() {
        out.push_str("not partitioned:\n");
        let indented: Vec<Vec<String>> = others
            .into_iter()
            .map(|mut row| {
                row[0] = format!("  {}", row[0]);
                row
            })
            .collect();
        out.push_str(&columns(&indented));
    }
    out
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}
