//! Writes the diagnose stage's outputs: `diagnostics.json`, the plots and `report.html`, one
//! self-contained file (plots embedded as PNG) that reads offline.

use std::path::Path;

use base64::Engine;
use serde_json::{json, Value as Json};

use std::collections::BTreeMap;

use super::plots::{render, Boxes, Line, Lines, Trace, OBSERVED};
use super::{ColumnDiagnostics, Imputation, RangeUse};
use crate::StageError;

const TEMPLATE: &str = include_str!("report.html");

pub(super) fn write(
    out: &Path,
    imputation: &Imputation,
    diagnostics: &[ColumnDiagnostics],
    report: &Json,
    ranges: &BTreeMap<String, RangeUse>,
) -> Result<(), StageError> {
    let io = |path: &Path, e: std::io::Error| {
        StageError::new(format!("cannot write `{}`: {e}", path.display()))
    };
    let plots_dir = out.join("plots");
    std::fs::create_dir_all(&plots_dir).map_err(|e| io(&plots_dir, e))?;
    crate::StageIo::write_json(&out.join("diagnostics.json"), report)?;

    let encode = |png: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(png);
    let mut columns = Vec::new();
    for d in diagnostics {
        let name = &d.name;
        let range = ranges.get(name);
        let integral = d.integral(imputation);
        let (x, observed, each, all) = d.densities(imputation, range.map(|r| r.shown));
        // The configured range is marked where the plots were widened beyond it.
        let marks = range.filter(|r| r.outside()).map(|r| r.configured);
        let observed_line = || Line {
            label: "observed".into(),
            y: observed.clone(),
            color: OBSERVED,
            width: 3,
        };
        let mut lines = vec![observed_line()];
        lines.extend(
            each.iter()
                .enumerate()
                .map(|(k, y)| Line::numbered(k, format!("imputation {k}"), y.clone())),
        );
        let by_imputation = Lines {
            title: format!("{name}: observed vs each imputation"),
            x_label: name.clone(),
            y_label: "density".into(),
            x: x.clone(),
            lines,
            marks,
            integral,
        };
        let all_imputed = Lines {
            title: format!("{name}: observed vs all imputations"),
            x_label: name.clone(),
            y_label: "density".into(),
            x,
            lines: vec![
                observed_line(),
                Line::numbered(0, "all imputations".into(), all),
            ],
            marks,
            integral,
        };
        let trace = Trace {
            title: format!("{name}: convergence by chain"),
            chains: imputation.trace[name].clone(),
        };
        let boxes = Boxes {
            title: format!("{name}: observed and each imputation"),
            y_label: name.clone(),
            boxes: d.boxes(imputation),
            integral,
        };
        // Draws one plot into plots/{column}_{kind}.{png,svg}; the report embeds the PNG.
        let plot = |kind: &str, drawn: Result<Vec<u8>, StageError>, caption: &str| {
            drawn.map(|png| {
                json!({
                    "file": format!("plots/{}_{kind}.png", file_safe(name)),
                    "png": encode(png),
                    "caption": caption,
                })
            })
        };
        let stem = |kind: &str| plots_dir.join(format!("{}_{kind}", file_safe(name)));
        let plots = vec![
            plot(
                "density",
                render(&by_imputation, &stem("density")),
                "Kernel density (Gaussian, Scott's bandwidth) of the observed values and of each completed imputation. The curves should lie close together: an imputation far from the others, or all of them far from the observed curve where the data are missing at random, deserves a look.",
            )?,
            plot(
                "density_all",
                render(&all_imputed, &stem("density_all")),
                "The observed values against all imputations pooled.",
            )?,
            plot(
                "trace",
                render(&trace, &stem("trace")),
                "The column's mean and standard deviation after each iteration, one line per chain. Converged chains mix: no trend, and lines that cross. R-hat compares the spread between chains with the spread within them over the last half of the iterations.",
            )?,
            plot(
                "box",
                render(&boxes, &stem("box")),
                "Quartiles and Tukey whiskers (1.5 IQR) of the observed values (black, first) and of each completed imputation: medians and boxes should nearly coincide.",
            )?,
        ];
        let mut column = report["columns"][name].clone();
        if let Json::Object(map) = &mut column {
            map.insert("name".into(), json!(name));
            if let Some(range) = range.filter(|r| r.outside()) {
                map.insert("outside".into(), json!(range.sentence(name)));
            }
            map.insert("plots".into(), Json::Array(plots));
        }
        columns.push(column);
    }
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", TEMPLATE)
        .map_err(|e| StageError::new(format!("report template: {e}")))?;
    // A number as the tables show it: integers whole, others to four decimals, missing as "—".
    env.add_filter("num", |v: minijinja::Value| -> String {
        match f64::try_from(v) {
            Ok(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.0}"),
            Ok(f) if f.is_finite() => format!("{f:.4}"),
            _ => "—".into(),
        }
    });
    let html = env
        .get_template("report.html")
        .and_then(|t| {
            t.render(minijinja::context! {
                rows => report["rows"],
                m => report["m"],
                iterations => report["iterations"],
                passed => report["passed"],
                checks => report["checks"],
                columns => columns,
            })
        })
        .map_err(|e| StageError::new(format!("report template: {e}")))?;
    let html_path = out.join("report.html");
    std::fs::write(&html_path, html).map_err(|e| io(&html_path, e))?;
    Ok(())
}

/// A column name as a file name: anything but letters, digits, `-` and `_` becomes `_`.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
