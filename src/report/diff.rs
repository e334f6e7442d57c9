//! `imba diff`: what changed between two runs of a pipeline: the `--set` arguments and vars,
//! the stages whose outputs changed, and the numbers the built-in stages reported, side by side
//! (DVC's `params diff` and `metrics diff` in one).

use std::collections::BTreeMap;

use serde_json::{json, Value as Json};

use crate::state::record::RunRecord;
use crate::store::ContentHash;

/// What one stage looked like as of a run: its outputs and the numbers it reported, from that
/// run's record, or from the latest earlier run that produced them (a skipped stage's outputs
/// are those of the run that last wrote them).
#[derive(Default)]
struct AsOf {
    outputs: BTreeMap<String, ContentHash>,
    numbers: BTreeMap<String, f64>,
}

/// Each stage as of the run at `at` in `runs` (newest first).
fn as_of(runs: &[RunRecord], at: usize) -> BTreeMap<String, AsOf> {
    let mut stages: BTreeMap<String, AsOf> = BTreeMap::new();
    for run in &runs[at..] {
        for stage in &run.stages {
            let seen = stages.entry(stage.name.clone()).or_default();
            if seen.outputs.is_empty() && !stage.outputs.is_empty() {
                seen.outputs = stage.outputs.clone();
            }
            if seen.numbers.is_empty() {
                if let Some(summary) = stage.report.as_ref().and_then(|r| r.get("summary")) {
                    flatten("", summary, &mut seen.numbers);
                }
            }
        }
    }
    stages
}

/// The numeric leaves of a summary, by dotted path; timings left out (they change every run).
fn flatten(prefix: &str, value: &Json, out: &mut BTreeMap<String, f64>) {
    match value {
        Json::Number(n) => {
            let timing = prefix.contains("duration") || prefix.ends_with("_s");
            if let (Some(n), false) = (n.as_f64(), timing) {
                out.insert(prefix.to_owned(), n);
            }
        }
        Json::Object(map) => {
            for (key, value) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, value, out);
            }
        }
        _ => {}
    }
}

fn shown(value: Option<&Json>) -> String {
    match value {
        None => "(unset)".to_owned(),
        Some(Json::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn number(value: f64) -> String {
    if value == value.trunc() && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{}", (value * 1e6).round() / 1e6)
    }
}

/// The difference between the runs at `a` and `b` of `runs` (newest first), as text or JSON.
pub fn diff(runs: &[RunRecord], a: usize, b: usize, as_json: bool) -> String {
    let (ra, rb) = (&runs[a], &runs[b]);
    let mut vars = Vec::new();
    let names: std::collections::BTreeSet<&String> = ra.vars.keys().chain(rb.vars.keys()).collect();
    for name in names {
        let (x, y) = (ra.vars.get(name), rb.vars.get(name));
        if x != y {
            vars.push(json!({"name": name, "from": shown(x), "to": shown(y)}));
        }
    }
    let (sa, sb) = (as_of(runs, a), as_of(runs, b));
    let mut outputs = Vec::new();
    let mut metrics = Vec::new();
    let stages: std::collections::BTreeSet<&String> = sa.keys().chain(sb.keys()).collect();
    // In the pipeline's order, as the newer run lists its stages.
    let order: Vec<&String> = rb
        .stages
        .iter()
        .map(|s| &s.name)
        .chain(ra.stages.iter().map(|s| &s.name))
        .filter(|n| stages.contains(n))
        .fold(Vec::new(), |mut seen, n| {
            if !seen.contains(&n) {
                seen.push(n);
            }
            seen
        });
    for stage in order {
        let empty = AsOf::default();
        let (x, y) = (
            sa.get(stage).unwrap_or(&empty),
            sb.get(stage).unwrap_or(&empty),
        );
        let paths: std::collections::BTreeSet<&String> =
            x.outputs.keys().chain(y.outputs.keys()).collect();
        for path in paths {
            let (hx, hy) = (x.outputs.get(path), y.outputs.get(path));
            if hx.map(|h| &h.hash) != hy.map(|h| &h.hash) {
                outputs.push(json!({"stage": stage, "output": path}));
            }
        }
        let keys: std::collections::BTreeSet<&String> =
            x.numbers.keys().chain(y.numbers.keys()).collect();
        for key in keys {
            let (vx, vy) = (x.numbers.get(key), y.numbers.get(key));
            if vx != vy {
                let pct = match (vx, vy) {
                    (Some(&vx), Some(&vy)) if vx != 0.0 => Some((vy - vx) / vx.abs() * 100.0),
                    _ => None,
                };
                metrics.push(json!({
                    "stage": stage, "metric": key, "from": vx, "to": vy, "change_pct": pct,
                }));
            }
        }
    }
    let value = json!({
        "from": {"run": ra.id, "set": ra.overrides},
        "to": {"run": rb.id, "set": rb.overrides},
        "vars": vars, "outputs": outputs, "metrics": metrics,
    });
    if as_json {
        return serde_json::to_string_pretty(&value).unwrap_or_default() + "\n";
    }
    let set = |run: &RunRecord| {
        if run.overrides.is_empty() {
            String::new()
        } else {
            format!(" ({})", run.overrides.join(" "))
        }
    };
    let mut out = format!("{}{} → {}{}\n", ra.id, set(ra), rb.id, set(rb));
    if vars.is_empty() && outputs.is_empty() && metrics.is_empty() {
        out.push_str("no differences: the same vars, outputs and reported numbers\n");
        return out;
    }
    if !vars.is_empty() {
        out.push_str("vars:\n");
        for v in &vars {
            out.push_str(&format!(
                "  {}: {} → {}\n",
                v["name"].as_str().unwrap_or_default(),
                v["from"].as_str().unwrap_or_default(),
                v["to"].as_str().unwrap_or_default()
            ));
        }
    }
    if !outputs.is_empty() {
        out.push_str("outputs changed:\n");
        for o in &outputs {
            out.push_str(&format!(
                "  {}: {}\n",
                o["stage"].as_str().unwrap_or_default(),
                o["output"].as_str().unwrap_or_default()
            ));
        }
    }
    if !metrics.is_empty() {
        out.push_str("reported numbers:\n");
        let rows: Vec<[String; 4]> = metrics
            .iter()
            .map(|m| {
                let at = |k: &str| m[k].as_f64().map(number).unwrap_or_else(|| "-".to_owned());
                let pct = m["change_pct"]
                    .as_f64()
                    .map(|p| format!("{p:+.2}%"))
                    .unwrap_or_default();
                [
                    format!("  {}", m["stage"].as_str().unwrap_or_default()),
                    m["metric"].as_str().unwrap_or_default().to_owned(),
                    format!("{} → {}", at("from"), at("to")),
                    pct,
                ]
            })
            .collect();
        out.push_str(&super::table(&rows));
    }
    out
}
