//! Charts of values over partitions (`imba metrics --plot`): one panel per metric, partitions
//! along x in their order, a point per partition with a value, joined by a line (a gap where a
//! partition has none).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::diagnose::plots::{color, encode_png, register_font, tick, FAMILY};

/// One metric's values, one per partition (`None`: not measured there).
pub struct Series {
    pub title: String,
    pub values: Vec<Option<f64>>,
}

const PANEL: (u32, u32) = (900, 300);

/// Draws `series` over the partitions `keys` (named `axis`, e.g. `month`) into `out`: SVG when
/// it ends in `.svg`, else PNG.
pub fn draw(axis: &str, keys: &[String], series: &[Series], out: &Path) -> Result<(), String> {
    register_font();
    let size = (PANEL.0, PANEL.1 * series.len().max(1) as u32);
    let svg = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    let failed = |e: String| format!("cannot draw `{}`: {e}", out.display());
    let bytes = if svg {
        let mut text = String::new();
        {
            let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
            panels(&root, axis, keys, series).map_err(failed)?;
            root.present().map_err(|e| failed(e.to_string()))?;
        }
        text.into_bytes()
    } else {
        let mut pixels = vec![0u8; (size.0 * size.1 * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
            panels(&root, axis, keys, series).map_err(failed)?;
            root.present().map_err(|e| failed(e.to_string()))?;
        }
        encode_png(&pixels, size).map_err(failed)?
    };
    std::fs::write(out, bytes).map_err(|e| format!("cannot write `{}`: {e}", out.display()))
}

fn panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    axis: &str,
    keys: &[String],
    series: &[Series],
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let areas = root.split_evenly((series.len().max(1), 1));
    for (i, (area, one)) in areas.iter().zip(series).enumerate() {
        let defined: Vec<f64> = one.values.iter().flatten().copied().collect();
        let (lo, hi) = defined
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(*v), hi.max(*v))
            });
        let (lo, hi) = if !lo.is_finite() {
            (0.0, 1.0)
        } else if hi - lo < 1e-12 {
            (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0))
        } else {
            let pad = (hi - lo) * 0.1;
            (lo - pad, hi + pad)
        };
        let n = keys.len().max(1);
        let mut chart = ChartBuilder::on(area)
            .caption(&one.title, (FAMILY, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(72)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), lo..hi)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(axis)
            .y_desc(one.title.rsplit('.').next().unwrap_or(&one.title))
            .x_labels(n.min(24))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() > 1e-6 || i < 0.0 {
                    return String::new();
                }
                keys.get(i as usize).cloned().unwrap_or_default()
            })
            .y_label_formatter(&|y| tick(*y))
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 14))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(e)?;
        let line = color(i);
        // A line through each run of consecutive partitions with values.
        let mut run: Vec<(f64, f64)> = Vec::new();
        let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
        for (x, value) in one.values.iter().enumerate() {
            match value {
                Some(v) => run.push((x as f64, *v)),
                None if !run.is_empty() => runs.push(std::mem::take(&mut run)),
                None => {}
            }
        }
        if !run.is_empty() {
            runs.push(run);
        }
        for run in &runs {
            chart
                .draw_series(LineSeries::new(run.iter().copied(), line.stroke_width(2)))
                .map_err(e)?;
        }
        chart
            .draw_series(
                runs.iter()
                    .flatten()
                    .map(|&(x, y)| Circle::new((x, y), 4, line.filled())),
            )
            .map_err(e)?;
    }
    Ok(())
}
