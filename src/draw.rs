//! Drawing the DAG: plain text, Graphviz DOT, Mermaid and JSON, all in a stable order.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::json;

use crate::dag::Dag;

/// Which drawing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Dot,
    Mermaid,
    Json,
}

/// What to draw besides stages.
#[derive(Clone, Copy, Debug, Default)]
pub struct DrawOptions {
    /// Data files as nodes of their own (DVC's `--outs` view).
    pub files: bool,
}

pub fn draw(dag: &Dag, format: Format, options: DrawOptions) -> String {
    match format {
        Format::Text => text(dag),
        Format::Dot => dot(dag, options),
        Format::Mermaid => mermaid(dag, options),
        Format::Json => serde_json::to_string_pretty(&to_json(dag)).unwrap_or_default() + "\n",
    }
}

fn shown(dag: &Dag, location: &crate::location::Location) -> String {
    location.display(&dag.pipeline().workdir)
}

fn text(dag: &Dag) -> String {
    let mut out = String::new();
    for &index in dag.order() {
        let stage = dag.stage(index);
        let _ = write!(out, "{} [{}]", stage.name, stage.kind.label());
        let needs: Vec<&str> = dag
            .needs(index)
            .iter()
            .map(|(s, _)| dag.stage(*s).name.as_str())
            .collect();
        if !needs.is_empty() {
            let _ = write!(out, " ← {}", needs.join(", "));
        }
        out.push('\n');
        if let Some(desc) = &stage.desc {
            let _ = writeln!(out, "  {desc}");
        }
        for (label, ports) in [("in: ", &stage.inputs), ("out:", &stage.outputs)] {
            for (i, port) in ports.iter().enumerate() {
                let head = if i == 0 { label } else { "    " };
                let _ = writeln!(
                    out,
                    "  {head} {}",
                    shown(dag, &port.declared.location) + if port.declared.dir { "/" } else { "" }
                );
            }
        }
    }
    out
}

fn dot_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Every declared path, numbered in order of first appearance (in topological order).
fn file_nodes(dag: &Dag) -> BTreeMap<String, usize> {
    let mut files = BTreeMap::new();
    for &index in dag.order() {
        let stage = dag.stage(index);
        for port in stage.inputs.iter().chain(&stage.outputs) {
            let next = files.len();
            files
                .entry(shown(dag, &port.declared.location))
                .or_insert(next);
        }
    }
    files
}

fn dot(dag: &Dag, options: DrawOptions) -> String {
    let mut out =
        String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for &index in dag.order() {
        let stage = dag.stage(index);
        let _ = writeln!(
            out,
            "  {} [label={}];",
            dot_quote(&stage.name),
            dot_quote(&format!("{}\n{}", stage.name, stage.kind.label()))
        );
    }
    if options.files {
        let files = file_nodes(dag);
        let mut by_number: Vec<(&String, &usize)> = files.iter().collect();
        by_number.sort_by_key(|(_, n)| **n);
        for (path, n) in &by_number {
            let _ = writeln!(
                out,
                "  f{n} [label={}, shape=note, style=\"\"];",
                dot_quote(path)
            );
        }
        for &index in dag.order() {
            let stage = dag.stage(index);
            for port in &stage.inputs {
                let _ = writeln!(
                    out,
                    "  f{} -> {};",
                    files[&shown(dag, &port.declared.location)],
                    dot_quote(&stage.name)
                );
            }
            for port in &stage.outputs {
                let _ = writeln!(
                    out,
                    "  {} -> f{};",
                    dot_quote(&stage.name),
                    files[&shown(dag, &port.declared.location)]
                );
            }
        }
    } else {
        for (from, to, _) in ordered_edges(dag) {
            let _ = writeln!(
                out,
                "  {} -> {};",
                dot_quote(&dag.stage(from).name),
                dot_quote(&dag.stage(to).name)
            );
        }
    }
    out.push_str("}\n");
    out
}

/// Edges in the order of their endpoints in the topological order.
fn ordered_edges(dag: &Dag) -> Vec<(usize, usize, &crate::dag::Edge)> {
    let position: BTreeMap<usize, usize> = dag
        .order()
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, i))
        .collect();
    let mut edges = dag.edges();
    edges.sort_by_key(|(a, b, _)| (position[a], position[b]));
    edges
}

fn mermaid_label(text: &str) -> String {
    text.replace('"', "#quot;")
}

fn mermaid(dag: &Dag, options: DrawOptions) -> String {
    let mut out = String::from("flowchart LR\n");
    let position: BTreeMap<usize, usize> = dag
        .order()
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, i))
        .collect();
    for (i, &index) in dag.order().iter().enumerate() {
        let stage = dag.stage(index);
        let _ = writeln!(
            out,
            "  s{i}[\"{}<br/><i>{}</i>\"]",
            mermaid_label(&stage.name),
            mermaid_label(stage.kind.label())
        );
    }
    if options.files {
        let files = file_nodes(dag);
        let mut by_number: Vec<(&String, &usize)> = files.iter().collect();
        by_number.sort_by_key(|(_, n)| **n);
        for (path, n) in &by_number {
            let _ = writeln!(out, "  f{n}[(\"{}\")]", mermaid_label(path));
        }
        for &index in dag.order() {
            let stage = dag.stage(index);
            for port in &stage.inputs {
                let _ = writeln!(
                    out,
                    "  f{} --> s{}",
                    files[&shown(dag, &port.declared.location)],
                    position[&index]
                );
            }
            for port in &stage.outputs {
                let _ = writeln!(
                    out,
                    "  s{} --> f{}",
                    position[&index],
                    files[&shown(dag, &port.declared.location)]
                );
            }
        }
    } else {
        for (from, to, _) in ordered_edges(dag) {
            let _ = writeln!(out, "  s{} --> s{}", position[&from], position[&to]);
        }
    }
    out
}

fn to_json(dag: &Dag) -> serde_json::Value {
    let port = |p: &crate::config::Port| {
        json!({
            "name": p.name,
            "path": shown(dag, &p.declared.location),
            "dir": p.declared.dir,
        })
    };
    let stages: Vec<serde_json::Value> = dag
        .order()
        .iter()
        .map(|&index| {
            let stage = dag.stage(index);
            json!({
                "name": stage.name,
                "kind": stage.kind.label(),
                "desc": stage.desc,
                "inputs": stage.inputs.iter().map(port).collect::<Vec<_>>(),
                "outputs": stage.outputs.iter().map(port).collect::<Vec<_>>(),
                "needs": dag.needs(index).iter().map(|(s, _)| dag.stage(*s).name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let edges: Vec<serde_json::Value> = ordered_edges(dag)
        .into_iter()
        .map(|(from, to, edge)| {
            json!({
                "from": dag.stage(from).name,
                "to": dag.stage(to).name,
                "paths": edge.paths.iter().map(|p| shown(dag, p)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "stages": stages, "edges": edges })
}
