//! The diagnose stage's plots, drawn once into SVG and once into PNG (plotters), with an embedded
//! font so that the PNGs look the same on any machine.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::StageError;

/// DejaVu Sans (Bitstream Vera licence, see `stages/assets/DejaVuSans-LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
pub(crate) const FAMILY: &str = "sans-serif";
pub const SIZE: (u32, u32) = (900, 480);

pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are compiled in and known to parse; a failure would only lose the text.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// A plot that can be drawn on any backend.
pub trait Plot {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Draws `plot` to `{stem}.svg` and `{stem}.png`; returns the PNG's bytes.
pub fn render(plot: &impl Plot, stem: &Path) -> Result<Vec<u8>, StageError> {
    register_font();
    let failed = |e: String| StageError::new(format!("cannot draw `{}`: {e}", stem.display()));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        plot.draw(&root).map_err(failed)?;
        root.present().map_err(|e| failed(e.to_string()))?;
    }
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        plot.draw(&root).map_err(failed)?;
        root.present().map_err(|e| failed(e.to_string()))?;
    }
    let png = encode_png(&pixels, SIZE).map_err(failed)?;
    let write = |extension: &str, bytes: &[u8]| {
        let path = stem.with_extension(extension);
        std::fs::write(&path, bytes)
            .map_err(|e| StageError::new(format!("cannot write `{}`: {e}", path.display())))
    };
    write("svg", svg.as_bytes())?;
    write("png", &png)?;
    Ok(png)
}

/// RGB pixels of a `size` image, as PNG bytes.
pub(crate) fn encode_png(pixels: &[u8], size: (u32, u32)) -> Result<Vec<u8>, String> {
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, size.0, size.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(pixels).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(png)
}

/// Width of the legend column at the right of every plot: legends never cover data.
const LEGEND_WIDTH: u32 = 150;

/// One legend entry: its label and the line it stands for.
struct Entry {
    label: String,
    color: RGBColor,
    width: u32,
    dashed: bool,
}

/// Splits `root` into the plot (left) and a legend column (right), and draws the legend there:
/// each entry's line and label, top down.
fn with_legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    entries: &[Entry],
    top: i32,
) -> Result<DrawingArea<DB, Shift>, String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let (width, _) = root.dim_in_pixel();
    let (plot, side) = root.split_horizontally(width.saturating_sub(LEGEND_WIDTH));
    for (i, entry) in entries.iter().enumerate() {
        let y = top + 20 * i as i32;
        let style = entry.color.stroke_width(entry.width);
        if entry.dashed {
            for x in [4, 12, 20] {
                side.draw(&PathElement::new(vec![(x, y), (x + 5, y)], style))
                    .map_err(e)?;
            }
        } else {
            side.draw(&PathElement::new(vec![(4, y), (26, y)], style))
                .map_err(e)?;
        }
        side.draw(&Text::new(
            entry.label.clone(),
            (32, y - 7),
            (FAMILY, 13).into_font().color(&BLACK),
        ))
        .map_err(e)?;
    }
    Ok(plot)
}

/// A tick label: whole numbers without decimals (`5`, not `5.0`), others with as few as they
/// need (up to four).
pub fn tick(v: f64) -> String {
    if v.fract().abs() < 1e-9 * v.abs().max(1.0) {
        return format!("{}", v.round() as i64);
    }
    let text = format!("{v:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// How many ticks to ask for on an axis over `[lo, hi]`: for whole-number data, never more
/// than there are whole numbers in it, so that ticks fall on them.
fn ticks(lo: f64, hi: f64, integral: bool) -> usize {
    if integral {
        // In f64 first: a span beyond usize must not overflow.
        ((hi.floor() - lo.ceil() + 1.0).clamp(2.0, 10.0)) as usize
    } else {
        10
    }
}

pub(crate) fn color(i: usize) -> RGBColor {
    // Category10, as matplotlib and seaborn.
    const COLORS: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = COLORS[i % COLORS.len()];
    RGBColor(r, g, b)
}

pub const OBSERVED: RGBColor = RGBColor(0, 0, 0);

/// One line of a [`Lines`] plot.
pub struct Line {
    pub label: String,
    pub y: Vec<f64>,
    pub color: RGBColor,
    pub width: u32,
}

/// Lines over a shared x: the density plots.
pub struct Lines {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x: Vec<f64>,
    pub lines: Vec<Line>,
    /// A configured range the values go beyond, marked by dashed vertical lines.
    pub marks: Option<[f64; 2]>,
    /// The x values are whole numbers: x ticks too.
    pub integral: bool,
}

impl Line {
    pub fn numbered(i: usize, label: String, y: Vec<f64>) -> Line {
        Line {
            label,
            y,
            color: color(i),
            width: 1,
        }
    }
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    (lo, hi)
}

impl Plot for Lines {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let root = root.titled(&self.title, (FAMILY, 22)).map_err(e)?;
        let mut entries: Vec<Entry> = self
            .lines
            .iter()
            .map(|l| Entry {
                label: l.label.clone(),
                color: l.color,
                width: l.width,
                dashed: false,
            })
            .collect();
        if self.marks.is_some() {
            entries.push(Entry {
                label: "configured range".into(),
                color: MARK,
                width: 1,
                dashed: true,
            });
        }
        let area = with_legend(&root, &entries, 24)?;
        let (x0, x1) = range(self.x.iter().copied());
        let (_, top) = range(self.lines.iter().flat_map(|l| l.y.iter().copied()));
        let top = top.max(1e-12) * 1.08;
        let mut chart = ChartBuilder::on(&area)
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, 0.0..top)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .x_labels(ticks(x0, x1, self.integral))
            .x_label_formatter(&|x| tick(*x))
            .y_label_formatter(&|y| tick(*y))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(e)?;
        for line in &self.lines {
            let style = line.color.stroke_width(line.width);
            chart
                .draw_series(LineSeries::new(
                    self.x.iter().copied().zip(line.y.iter().copied()),
                    style,
                ))
                .map_err(e)?;
        }
        if let Some(marks) = self.marks {
            for x in marks {
                // Dashes: twenty segments from the axis to the top.
                let dashes = (0..20).map(|i| {
                    let (a, b) = (i as f64 / 20.0, (i as f64 + 0.5) / 20.0);
                    PathElement::new(vec![(x, a * top), (x, b * top)], MARK.stroke_width(1))
                });
                chart.draw_series(dashes).map_err(e)?;
            }
        }
        Ok(())
    }
}

/// The colour of a configured range's marks.
const MARK: RGBColor = RGBColor(110, 110, 110);

/// The convergence trace: the column's mean and standard deviation after each iteration, one line
/// per chain, in two panels.
pub struct Trace {
    pub title: String,
    /// Per chain, per iteration: (mean, std).
    pub chains: Vec<Vec<(f64, f64)>>,
}

impl Plot for Trace {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let root = root.titled(&self.title, (FAMILY, 22)).map_err(e)?;
        let entries: Vec<Entry> = (0..self.chains.len())
            .map(|k| Entry {
                label: format!("chain {k}"),
                color: color(k),
                width: 2,
                dashed: false,
            })
            .collect();
        let root = with_legend(&root, &entries, 40)?;
        let panels = root.split_evenly((1, 2));
        let iterations = self
            .chains
            .iter()
            .map(|c| c.len())
            .max()
            .unwrap_or(1)
            .max(2);
        for (panel, (name, pick)) in panels.iter().zip([
            ("mean", (|p: &(f64, f64)| p.0) as fn(&(f64, f64)) -> f64),
            ("std", |p: &(f64, f64)| p.1),
        ]) {
            let (lo, hi) = range(self.chains.iter().flatten().map(pick));
            let pad = (hi - lo) * 0.08;
            let mut chart = ChartBuilder::on(panel)
                .caption(name, (FAMILY, 17))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(64)
                .build_cartesian_2d(1f64..iterations as f64, (lo - pad)..(hi + pad))
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("iteration")
                .y_desc(name)
                .x_labels(ticks(1.0, iterations as f64, true))
                .x_label_formatter(&|x| tick(*x))
                .y_label_formatter(&|y| tick(*y))
                .label_style((FAMILY, 13))
                .axis_desc_style((FAMILY, 14))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(e)?;
            for (k, chain) in self.chains.iter().enumerate() {
                let style = color(k).stroke_width(2);
                chart
                    .draw_series(LineSeries::new(
                        chain
                            .iter()
                            .enumerate()
                            .map(|(i, p)| ((i + 1) as f64, pick(p))),
                        style,
                    ))
                    .map_err(e)?;
            }
        }
        Ok(())
    }
}

/// Box plots, the observed values' first, then one per imputation: [q1, median, q3, lower
/// whisker, upper whisker].
pub struct Boxes {
    pub title: String,
    pub y_label: String,
    pub boxes: Vec<[f64; 5]>,
    /// The values are whole numbers: y ticks too.
    pub integral: bool,
}

impl Plot for Boxes {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let (lo, hi) = range(self.boxes.iter().flatten().copied());
        let pad = (hi - lo) * 0.08;
        let n = self.boxes.len().max(1);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FAMILY, 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.6f64..(n as f64 - 0.4), (lo - pad)..(hi + pad))
            .map_err(e)?;
        // Box 0 is the observed values'; box k + 1 is imputation k's.
        let label = |x: &f64| match x.round() as i64 {
            0 => "observed".to_owned(),
            k => format!("{}", k - 1),
        };
        chart
            .configure_mesh()
            .x_desc("imputation")
            .y_desc(self.y_label.as_str())
            .x_labels(n)
            .x_label_formatter(&label)
            .y_labels(ticks(lo - pad, hi + pad, self.integral))
            .y_label_formatter(&|y| tick(*y))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(e)?;
        for (k, [q1, median, q3, low, high]) in self.boxes.iter().enumerate() {
            let x = k as f64;
            let c = match k {
                0 => OBSERVED,
                k => color(k - 1),
            };
            chart
                .draw_series([Rectangle::new(
                    [(x - 0.3, *q1), (x + 0.3, *q3)],
                    c.mix(0.35).filled(),
                )])
                .map_err(e)?;
            chart
                .draw_series([
                    PathElement::new(
                        vec![
                            (x - 0.3, *q1),
                            (x + 0.3, *q1),
                            (x + 0.3, *q3),
                            (x - 0.3, *q3),
                            (x - 0.3, *q1),
                        ],
                        c.stroke_width(1),
                    ),
                    PathElement::new(
                        vec![(x - 0.3, *median), (x + 0.3, *median)],
                        BLACK.stroke_width(2),
                    ),
                    PathElement::new(vec![(x, *q3), (x, *high)], c.stroke_width(1)),
                    PathElement::new(vec![(x, *q1), (x, *low)], c.stroke_width(1)),
                    PathElement::new(
                        vec![(x - 0.15, *high), (x + 0.15, *high)],
                        c.stroke_width(1),
                    ),
                    PathElement::new(vec![(x - 0.15, *low), (x + 0.15, *low)], c.stroke_width(1)),
                ])
                .map_err(e)?;
        }
        Ok(())
    }
}
