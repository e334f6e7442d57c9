//! Drawing the DAG: plain text, Graphviz DOT, Mermaid and JSON, all in a stable order.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::json;

use crate::graph::dag::Dag;

/// Which drawing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Dot,
    Mermaid,
    Json,
}

/// What to draw besides stages.
#[derive(Clone, Debug, Default)]
pub struct DrawOptions {
    /// Data files as nodes of their own (DVC's `--outs` view).
    pub files: bool,
    /// Stale stages, with why: marked in the drawing (`dag --status`).
    pub stale: Option<BTreeMap<String, Vec<String>>>,
}

pub fn draw(dag: &Dag, format: Format, options: DrawOptions) -> String {
    match format {
        Format::Text => text(dag, &options),
        Format::Dot => dot(dag, options),
        Format::Mermaid => mermaid(dag, options),
        Format::Json => {
            serde_json::to_string_pretty(&to_json(dag, &options)).unwrap_or_default() + "\n"
        }
    }
}

fn shown(dag: &Dag, location: &crate::model::location::Location) -> String {
    location.display(&dag.pipeline().workdir)
}

/// One data file of a drawing with `--files`, in order of first appearance.
struct File {
    path: String,
    /// The stage that writes it, by topological position.
    writer: Option<usize>,
    /// The directory output it lies inside (its index among the files), when another stage's
    /// directory output holds it: `imputed/imputed_mean.parquet` inside `imputed/`.
    inside: Option<usize>,
    /// The stages that read it, by topological position.
    readers: Vec<usize>,
}

/// Every file the stages read or write, each once, with who writes and reads it.
fn files(dag: &Dag) -> Vec<File> {
    let mut files: Vec<File> = Vec::new();
    let mut locations: Vec<(&crate::model::location::Location, bool)> = Vec::new();
    let number = |files: &mut Vec<File>, port: &'_ crate::model::Port| -> usize {
        let path = shown(dag, &port.declared.location);
        match files.iter().position(|f| f.path == path) {
            Some(i) => i,
            None => {
                files.push(File {
                    path,
                    writer: None,
                    inside: None,
                    readers: Vec::new(),
                });
                files.len() - 1
            }
        }
    };
    for (pos, &index) in dag.order().iter().enumerate() {
        let stage = dag.stage(index);
        for port in &stage.inputs {
            let i = number(&mut files, port);
            files[i].readers.push(pos);
            if locations.len() < files.len() {
                locations.push((&port.declared.location, port.declared.dir));
            }
        }
        for port in &stage.outputs {
            let i = number(&mut files, port);
            files[i].writer = Some(pos);
            if locations.len() < files.len() {
                locations.push((&port.declared.location, port.declared.dir));
            }
        }
    }
    // A file no stage writes, inside a directory some stage writes, comes from that stage.
    for i in 0..files.len() {
        if files[i].writer.is_some() {
            continue;
        }
        let (location, _) = locations[i];
        files[i].inside = (0..files.len()).find(|&d| {
            d != i
                && locations[d].1
                && files[d].writer.is_some()
                && location.is_within(locations[d].0)
        });
    }
    files
}

fn text(dag: &Dag, options: &DrawOptions) -> String {
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
        if let Some(reasons) = options.stale.as_ref().and_then(|s| s.get(&stage.name)) {
            let _ = write!(out, " (stale: {})", reasons.join("; "));
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
    if options.files {
        let name = |pos: usize| dag.stage(dag.order()[pos]).name.as_str();
        let files = files(dag);
        out.push_str("\nfiles:\n");
        for file in &files {
            let from = match (file.writer, file.inside) {
                (Some(w), _) => format!(" ← {}", name(w)),
                (None, Some(d)) => format!(
                    " ← {} (in {})",
                    files[d].writer.map(name).unwrap_or_default(),
                    files[d].path
                ),
                (None, None) => " (source)".to_owned(),
            };
            let to = if file.readers.is_empty() {
                String::new()
            } else {
                let readers: Vec<&str> = file.readers.iter().map(|&r| name(r)).collect();
                format!(" → {}", readers.join(", "))
            };
            let _ = writeln!(out, "  {}{from}{to}", file.path);
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

/// A node of a drawing: a stage (by topological position) or a data file.
#[derive(Clone, Copy)]
enum Node {
    Stage(usize),
    File(usize),
}

/// What DOT and Mermaid draw, in a stable order: stages in topological order, files in order of
/// first appearance, and the edges between them.
struct Picture {
    stages: Vec<(String, String)>,
    /// Per stage, in the same order: out of date (`dag --status`).
    stale: Vec<bool>,
    files: Vec<String>,
    edges: Vec<(Node, Node)>,
}

impl Picture {
    fn new(dag: &Dag, options: DrawOptions) -> Self {
        let position = dag.positions();
        let stages = dag
            .order()
            .iter()
            .map(|&i| {
                (
                    dag.stage(i).name.clone(),
                    dag.stage(i).kind.label().to_owned(),
                )
            })
            .collect();
        let mut files: Vec<String> = Vec::new();
        let mut edges = Vec::new();
        if options.files {
            let all = self::files(dag);
            for (i, file) in all.iter().enumerate() {
                if let Some(writer) = file.writer {
                    edges.push((Node::Stage(writer), Node::File(i)));
                }
                // A file inside a directory output hangs from that directory.
                if let Some(dir) = file.inside {
                    edges.push((Node::File(dir), Node::File(i)));
                }
                for &reader in &file.readers {
                    edges.push((Node::File(i), Node::Stage(reader)));
                }
            }
            // Edges in the order the stages come, as before: by the stage end of each.
            let key = |edge: &(Node, Node)| match edge {
                (Node::Stage(s), Node::File(f)) | (Node::File(f), Node::Stage(s)) => (*s, *f),
                (Node::File(d), Node::File(f)) => (usize::MAX, d * all.len() + f),
                (Node::Stage(a), Node::Stage(b)) => (*a, *b),
            };
            edges.sort_by_key(key);
            files = all.into_iter().map(|f| f.path).collect();
        } else {
            edges = dag
                .edges()
                .into_iter()
                .map(|(a, b, _)| (Node::Stage(position[a]), Node::Stage(position[b])))
                .collect();
        }
        let stale = dag
            .order()
            .iter()
            .map(|&i| {
                options
                    .stale
                    .as_ref()
                    .is_some_and(|s| s.contains_key(&dag.stage(i).name))
            })
            .collect();
        Picture {
            stages,
            stale,
            files,
            edges,
        }
    }
}

fn dot(dag: &Dag, options: DrawOptions) -> String {
    let picture = Picture::new(dag, options);
    let node = |n: Node| match n {
        Node::Stage(i) => dot_quote(&picture.stages[i].0),
        Node::File(i) => format!("f{i}"),
    };
    let mut out =
        String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for ((name, kind), stale) in picture.stages.iter().zip(&picture.stale) {
        let mark = if *stale {
            ", color=red, penwidth=2"
        } else {
            ""
        };
        let label = if *stale {
            format!("{name}\n{kind} (stale)")
        } else {
            format!("{name}\n{kind}")
        };
        let _ = writeln!(
            out,
            "  {} [label={}{mark}];",
            dot_quote(name),
            dot_quote(&label)
        );
    }
    for (i, path) in picture.files.iter().enumerate() {
        let _ = writeln!(
            out,
            "  f{i} [label={}, shape=note, style=\"\"];",
            dot_quote(path)
        );
    }
    for &(from, to) in &picture.edges {
        let _ = writeln!(out, "  {} -> {};", node(from), node(to));
    }
    out.push_str("}\n");
    out
}

fn mermaid_label(text: &str) -> String {
    text.replace('"', "#quot;")
}

fn mermaid(dag: &Dag, options: DrawOptions) -> String {
    let picture = Picture::new(dag, options);
    let node = |n: Node| match n {
        Node::Stage(i) => format!("s{i}"),
        Node::File(i) => format!("f{i}"),
    };
    let mut out = String::from("flowchart LR\n");
    for (i, (name, kind)) in picture.stages.iter().enumerate() {
        let _ = writeln!(
            out,
            "  s{i}[\"{}<br/><i>{}</i>\"]",
            mermaid_label(name),
            mermaid_label(kind)
        );
    }
    for (i, path) in picture.files.iter().enumerate() {
        let _ = writeln!(out, "  f{i}[(\"{}\")]", mermaid_label(path));
    }
    for &(from, to) in &picture.edges {
        let _ = writeln!(out, "  {} --> {}", node(from), node(to));
    }
    if picture.stale.iter().any(|s| *s) {
        out.push_str("  classDef stale stroke:#d00,stroke-width:3px\n");
        for (i, _) in picture.stale.iter().enumerate().filter(|(_, s)| **s) {
            let _ = writeln!(out, "  class s{i} stale");
        }
    }
    out
}

fn to_json(dag: &Dag, options: &DrawOptions) -> serde_json::Value {
    let port = |p: &crate::model::Port| {
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
            let mut node = json!({
                "name": stage.name,
                "kind": stage.kind.label(),
                "desc": stage.desc,
                "inputs": stage.inputs.iter().map(port).collect::<Vec<_>>(),
                "outputs": stage.outputs.iter().map(port).collect::<Vec<_>>(),
                "needs": dag.needs(index).iter().map(|(s, _)| dag.stage(*s).name.clone()).collect::<Vec<_>>(),
            });
            if let Some(stale) = &options.stale {
                node["stale"] = json!(stale.contains_key(&stage.name));
                node["reasons"] = json!(stale.get(&stage.name).cloned().unwrap_or_default());
            }
            node
        })
        .collect();
    let edges: Vec<serde_json::Value> = dag
        .edges()
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
