//! The DAG drawn as SVG: stages in columns by depth, ordered to keep edges short.
//!
//! A layered (Sugiyama-style) layout, small enough to own: a stage's column is the longest path
//! to it from a source; within a column, stages start in the pipeline's order and are then
//! sorted a few times by the mean row of their neighbours (barycenters, sweeping right then
//! left), ties kept in place, so the same graph always gets the same picture. It is linear in
//! the edges per sweep: a 10,000-stage pipeline is drawn in milliseconds. Graphviz would draw
//! nicer long edges, but it is a C program to install, and a JS library would have to be
//! vendored and run in the browser on every load.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::graph::Dag;

const NODE_W: f64 = 164.0;
const NODE_H: f64 = 34.0;
const GAP_X: f64 = 48.0;
const GAP_Y: f64 = 14.0;
const MARGIN: f64 = 12.0;
/// How many characters of a stage's name fit in its box.
const FITS: usize = 20;

/// The SVG of a pipeline's graph.
pub struct Drawing {
    pub svg: String,
}

impl Drawing {
    pub fn of(dag: &Dag) -> Drawing {
        Drawing {
            svg: svg(dag, &place(dag)),
        }
    }
}

/// Each stage's column and row.
fn place(dag: &Dag) -> BTreeMap<usize, (usize, usize)> {
    let order = dag.order();
    let mut column: BTreeMap<usize, usize> = BTreeMap::new();
    let mut ups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut downs: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &index in order {
        let needs: Vec<usize> = dag.needs(index).into_iter().map(|(s, _)| s).collect();
        let depth = needs
            .iter()
            .filter_map(|s| column.get(s))
            .map(|c| c + 1)
            .max()
            .unwrap_or(0);
        column.insert(index, depth);
        for &s in &needs {
            downs.entry(s).or_default().push(index);
        }
        ups.insert(index, needs);
    }
    let columns = column.values().copied().max().map_or(0, |m| m + 1);
    let mut layers: Vec<Vec<usize>> = vec![Vec::new(); columns];
    for &index in order {
        layers[column[&index]].push(index);
    }
    let mut row: BTreeMap<usize, f64> = BTreeMap::new();
    let number = |layers: &[Vec<usize>], row: &mut BTreeMap<usize, f64>| {
        for layer in layers {
            for (r, &index) in layer.iter().enumerate() {
                row.insert(index, r as f64);
            }
        }
    };
    number(&layers, &mut row);
    let empty = Vec::new();
    for sweep in 0..4 {
        let rightwards = sweep % 2 == 0;
        let range: Vec<usize> = if rightwards {
            (1..columns).collect()
        } else {
            (0..columns.saturating_sub(1)).rev().collect()
        };
        for c in range {
            let neighbours = if rightwards { &ups } else { &downs };
            let mut keyed: Vec<(f64, usize)> = layers[c]
                .iter()
                .map(|&index| {
                    let near = neighbours.get(&index).unwrap_or(&empty);
                    let key = if near.is_empty() {
                        row[&index]
                    } else {
                        near.iter().map(|n| row[n]).sum::<f64>() / near.len() as f64
                    };
                    (key, index)
                })
                .collect();
            // A stable sort: equal keys keep their order.
            keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
            layers[c] = keyed.into_iter().map(|(_, i)| i).collect();
            for (r, &index) in layers[c].iter().enumerate() {
                row.insert(index, r as f64);
            }
        }
    }
    let mut places = BTreeMap::new();
    for (c, layer) in layers.iter().enumerate() {
        for (r, &index) in layer.iter().enumerate() {
            places.insert(index, (c, r));
        }
    }
    places
}

fn origin(place: (usize, usize)) -> (f64, f64) {
    (
        MARGIN + place.0 as f64 * (NODE_W + GAP_X),
        MARGIN + place.1 as f64 * (NODE_H + GAP_Y),
    )
}

/// Escapes text for SVG (XML).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

fn svg(dag: &Dag, places: &BTreeMap<usize, (usize, usize)>) -> String {
    let columns = places.values().map(|p| p.0 + 1).max().unwrap_or(0);
    let rows = places.values().map(|p| p.1 + 1).max().unwrap_or(0);
    let width = 2.0 * MARGIN + columns as f64 * NODE_W + columns.saturating_sub(1) as f64 * GAP_X;
    let height = 2.0 * MARGIN + rows as f64 * NODE_H + rows.saturating_sub(1) as f64 * GAP_Y;
    let mut out = String::with_capacity(200 * places.len() + 256);
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" id="dag" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="the pipeline's stages and their dependencies">"#
    );
    out.push_str(r#"<g class="edges">"#);
    for (from, to, _) in dag.edges() {
        let (x1, y1) = origin(places[&from]);
        let (x2, y2) = origin(places[&to]);
        let (x1, y1) = (x1 + NODE_W, y1 + NODE_H / 2.0);
        let y2 = y2 + NODE_H / 2.0;
        let bend = (x2 - x1) / 2.0;
        let _ = write!(
            out,
            r#"<path d="M{x1} {y1} C{} {y1} {} {y2} {x2} {y2}" data-from="{}" data-to="{}"/>"#,
            x1 + bend,
            x2 - bend,
            escape(&dag.stage(from).name),
            escape(&dag.stage(to).name),
        );
    }
    out.push_str("</g>");
    for &index in dag.order() {
        let name = &dag.stage(index).name;
        let (x, y) = origin(places[&index]);
        let shown: String = if name.chars().count() > FITS {
            name.chars().take(FITS - 1).chain(['…']).collect()
        } else {
            name.clone()
        };
        let _ = write!(
            out,
            r#"<g class="node unknown" data-stage="{name}" transform="translate({x} {y})" tabindex="0"><title>{name}</title><rect width="{NODE_W}" height="{NODE_H}" rx="6"/><text x="12" y="{}">{}</text></g>"#,
            NODE_H / 2.0 + 4.5,
            escape(&shown),
            name = escape(name),
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage's column is its longest path from a source; the same graph, the same picture.
    #[test]
    fn columns_are_depths_and_the_drawing_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("src.txt"), "x").unwrap();
        let stage = |name: &str, inputs: &str| {
            format!(
                "  {name}:\n    cmd: cat {{{{ inputs | join(' ') }}}} > {{{{ outputs[0] }}}}\n    inputs: [{inputs}]\n    outputs: [{name}.txt]\n"
            )
        };
        let yaml = format!(
            "stages:\n{}{}{}{}",
            stage("a", "src.txt"),
            stage("b", "a.txt"),
            stage("c", "a.txt, b.txt"),
            stage("d", "src.txt")
        );
        let file = dir.path().join("pipeline.yaml");
        std::fs::write(&file, yaml).unwrap();
        let (_, dag) = crate::graph::load(
            &file,
            &Default::default(),
            &imba_stages::Registry::standard(),
        );
        let dag = dag.unwrap();
        let places = place(&dag);
        let column = |name: &str| places[&dag.index_of(name).unwrap()].0;
        assert_eq!(
            [column("a"), column("b"), column("c"), column("d")],
            [0, 1, 2, 0]
        );
        let svg = Drawing::of(&dag).svg;
        assert_eq!(svg, Drawing::of(&dag).svg);
        assert_eq!(svg.matches("<g class=\"node").count(), 4);
        assert_eq!(svg.matches("<path ").count(), 3);
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("a<b>&\"'\u{7}"),
            "a&lt;b&gt;&amp;&quot;&#39;\u{FFFD}"
        );
    }
}
