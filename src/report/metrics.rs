//! `imba metrics`: each stage's `metrics:` over the partitions, as a table (with the change from
//! the previous partition), JSON, CloudWatch Embedded Metric Format lines, or a chart.

use imba_stages::checks::shown;
use serde_json::json;

use super::columns;
use crate::plan::MetricSeries;

/// Whether one stage has all the metrics: then a metric is named alone.
pub fn one_stage(series: &[MetricSeries]) -> bool {
    series.iter().all(|s| s.stage == series[0].stage)
}

/// The column heading (or chart title) of a series: `stage.metric`, or the metric alone when
/// one stage has them.
pub fn heading(series: &MetricSeries, one_stage: bool) -> String {
    if one_stage {
        series.metric.clone()
    } else {
        format!("{}.{}", series.stage, series.metric)
    }
}

/// The table: for each partition set, partitions down and metrics across, each value with its
/// change from the previous partition; then the unpartitioned stages' values.
pub fn table(series: &[MetricSeries]) -> String {
    if series.is_empty() {
        return "no stage has `metrics:`\n".to_owned();
    }
    let one_stage = one_stage(series);
    let mut out = String::new();
    let mut sets: Vec<&str> = Vec::new();
    for set in series.iter().filter_map(|s| s.set.as_deref()) {
        if !sets.contains(&set) {
            sets.push(set);
        }
    }
    for set in sets {
        let of_set: Vec<&MetricSeries> = series
            .iter()
            .filter(|s| s.set.as_deref() == Some(set))
            .collect();
        // Every partition any of them has, in order of first appearance (each series is in
        // partition order).
        let mut keys: Vec<&str> = Vec::new();
        for one in &of_set {
            for point in &one.points {
                let key = point.partition.as_deref().unwrap_or_default();
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        let mut rows = vec![std::iter::once(set.to_owned())
            .chain(of_set.iter().map(|s| heading(s, one_stage)))
            .collect::<Vec<_>>()];
        for key in keys {
            let mut row = vec![key.to_owned()];
            for one in &of_set {
                let point = one
                    .points
                    .iter()
                    .find(|p| p.partition.as_deref() == Some(key));
                row.push(match point {
                    None => String::new(),
                    Some(p) if !p.committed => "-".to_owned(),
                    Some(p) => cell(p.value, p.change_pct),
                });
            }
            rows.push(row);
        }
        out.push_str(&columns(&rows));
    }
    let single: Vec<Vec<String>> = series
        .iter()
        .filter(|s| s.set.is_none())
        .map(|s| {
            let point = s.points.first();
            vec![
                format!("  {}", heading(s, false)),
                match point {
                    Some(p) if p.committed => cell(p.value, None),
                    _ => "-".to_owned(),
                },
            ]
        })
        .collect();
    if !single.is_empty() {
        out.push_str("not partitioned:\n");
        out.push_str(&columns(&single));
    }
    out
}

/// `20,000 (-33.3%)`; `undefined` for a value that is not a number there.
fn cell(value: Option<f64>, change: Option<f64>) -> String {
    let Some(value) = value else {
        return "undefined".to_owned();
    };
    match change {
        Some(pct) if pct.is_finite() => format!("{} ({pct:+.1}%)", shown(value)),
        _ => shown(value),
    }
}

/// A stage instance: its stage's name and partition.
type Instance = (String, Option<String>);

/// One CloudWatch Embedded Metric Format line per measured stage instance: its metrics, with
/// dimensions `Pipeline`, `Stage` and (partitioned) `Partition`; the newest partition's line
/// also without `Partition`. CloudWatch Logs turns each
/// line into metric data points, so alarms need no SDK (the seed's row-count alarm).
///
/// Each line is stamped with when its values were measured, at commit; a value measured now
/// (for a metric defined after the commit) with `timestamp_ms`.
pub fn emf(series: &[MetricSeries], pipeline: &str, namespace: &str, timestamp_ms: u128) -> String {
    // (stage, partition) → its metric values, in order, and when they were measured.
    let mut lines: Vec<(Instance, serde_json::Map<String, serde_json::Value>, u128)> = Vec::new();
    for one in series {
        for point in &one.points {
            let Some(value) = point.value.filter(|_| point.committed) else {
                continue;
            };
            let key = (one.stage.clone(), point.partition.clone());
            let at = point.measured_at_ms.map_or(timestamp_ms, u128::from);
            let line = match lines.iter_mut().position(|(k, _, _)| *k == key) {
                Some(i) => &mut lines[i],
                None => {
                    lines.push((key, serde_json::Map::new(), at));
                    lines.last_mut().expect("just pushed")
                }
            };
            line.1.insert(one.metric.clone(), json!(value));
            line.2 = line.2.min(at);
        }
    }
    // The newest partition of each stage with a value: only its line also counts across
    // partitions, so that an alarm by Pipeline and Stage sees the month that just ran, once.
    let newest: Vec<Instance> = series
        .iter()
        .filter_map(|one| {
            let point = one
                .points
                .iter()
                .rev()
                .find(|p| p.committed && p.value.is_some())?;
            Some((one.stage.clone(), point.partition.clone()))
        })
        .collect();
    let mut out = String::new();
    for ((stage, partition), values, at) in lines {
        let key = (stage.clone(), partition.clone());
        let dimensions = match &partition {
            None => json!([["Pipeline", "Stage"]]),
            Some(_) if newest.contains(&key) => {
                json!([["Pipeline", "Stage", "Partition"], ["Pipeline", "Stage"]])
            }
            Some(_) => json!([["Pipeline", "Stage", "Partition"]]),
        };
        let metrics: Vec<serde_json::Value> = values
            .keys()
            .map(|name| {
                let unit = if name == "rows" { "Count" } else { "None" };
                json!({"Name": name, "Unit": unit})
            })
            .collect();
        let mut line = json!({
            "_aws": {
                "Timestamp": at,
                "CloudWatchMetrics": [{
                    "Namespace": namespace,
                    "Dimensions": dimensions,
                    "Metrics": metrics,
                }],
            },
            "Pipeline": pipeline,
            "Stage": stage,
        });
        if let Some(partition) = partition {
            line["Partition"] = json!(partition);
        }
        for (name, value) in values {
            line[name] = value;
        }
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}
