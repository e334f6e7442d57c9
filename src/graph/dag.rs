//! The stage graph: edges from paths, output conflicts, cycles and missing sources.
//!
//! A stage depends on another when it reads a path the other writes, a path inside a directory
//! the other writes, or a directory the other writes into. [`build`] is the only way to get a
//! [`Dag`], and it refuses a graph with a cycle, so nothing can walk an unchecked graph.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::ffi::OsString;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::diagnostic::{did_you_mean_path, Diagnostic};
use crate::model::location::Location;
use crate::model::{Pipeline, Port, Stage};

/// A checked, acyclic stage graph.
#[derive(Debug)]
pub struct Dag {
    pipeline: Pipeline,
    graph: DiGraph<usize, Edge>,
    order: Vec<usize>,
    /// Inputs no stage writes, as (stage, input) indices.
    sources: Vec<(usize, usize)>,
    /// A partial graph's ([`build_partial`]): what the stages left out of it write.
    elsewhere: Vec<Location>,
}

/// Why one stage needs another: the paths it reads that the other writes.
#[derive(Debug, Clone, Default)]
pub struct Edge {
    pub paths: Vec<Location>,
}

/// What to check beyond the graph itself.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Report source inputs (read by a stage, written by none) that do not exist.
    pub check_sources: bool,
    /// Outputs of stages left out for their errors (a partial pipeline, in `validate`): an
    /// input there, or inside one, is not reported missing.
    pub written_elsewhere: Vec<Location>,
    /// Some left-out stage writes who knows where: no source input is reported missing.
    pub unknown_writers: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            check_sources: true,
            written_elsewhere: Vec::new(),
            unknown_writers: false,
        }
    }
}

type PathKey = Vec<OsString>;

fn key_of(location: &Location) -> PathKey {
    location.components()
}

/// Builds and checks the graph of `pipeline`, reporting every problem found.
pub fn build(pipeline: Pipeline, options: BuildOptions) -> Result<Dag, Vec<Diagnostic>> {
    match build_partial(pipeline, options) {
        (Some(dag), diagnostics) if diagnostics.is_empty() => Ok(dag),
        (_, diagnostics) => Err(diagnostics),
    }
}

/// [`build`], giving with its problems a graph to check further (`validate`'s columns): the
/// whole graph when it has an order despite them (a missing source, two stages writing one
/// path), else the graph without the stages on a cycle.
pub fn build_partial(pipeline: Pipeline, options: BuildOptions) -> (Option<Dag>, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let stages = &pipeline.stages;

    // Every output, by path components, so that a directory's contents sort right after it.
    let mut outputs: BTreeMap<PathKey, Vec<(usize, usize)>> = BTreeMap::new();
    for (s, stage) in stages.iter().enumerate() {
        for (p, port) in stage.outputs.iter().enumerate() {
            outputs
                .entry(key_of(&port.declared.location))
                .or_default()
                .push((s, p));
        }
    }
    check_output_conflicts(&pipeline, &outputs, &mut diagnostics);

    let mut graph = DiGraph::with_capacity(stages.len(), stages.len());
    let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
    let mut edges: BTreeMap<(usize, usize), Edge> = BTreeMap::new();
    let mut sources = Vec::new();
    let mut written = None;
    for (s, stage) in stages.iter().enumerate() {
        for (i, input) in stage.inputs.iter().enumerate() {
            let producers = producers_of(&outputs, &key_of(&input.declared.location));
            if producers.is_empty() {
                sources.push((s, i));
                let at = &input.declared.location;
                let elsewhere = options.unknown_writers
                    || options
                        .written_elsewhere
                        .iter()
                        .any(|o| at.is_within(o) || o.is_within(at));
                if options.check_sources && !elsewhere {
                    check_source(
                        &pipeline,
                        stage,
                        input,
                        &outputs,
                        &mut written,
                        &mut diagnostics,
                    );
                }
                continue;
            }
            for (producer, port) in producers {
                if producer == s {
                    let output = &stage.outputs[port];
                    diagnostics.push(
                        Diagnostic::error(format!(
                            "stage `{}` reads its own output `{}`",
                            stage.name, output.text
                        ))
                        .at(input.span, "read here")
                        .also(output.span, "written here"),
                    );
                    continue;
                }
                let edge = edges.entry((producer, s)).or_default();
                if !edge.paths.contains(&input.declared.location) {
                    edge.paths.push(input.declared.location.clone());
                }
            }
        }
    }
    for ((from, to), edge) in edges {
        graph.add_edge(nodes[from], nodes[to], edge);
    }
    let on_cycles = check_cycles(&pipeline, &graph, &mut diagnostics);
    crate::diagnostic::sort(&mut diagnostics);
    if !on_cycles.is_empty() {
        // The rest, with what the stages on cycles write counted as written elsewhere.
        let mut rest = pipeline;
        let mut options = BuildOptions {
            check_sources: false,
            ..options
        };
        let mut index = 0;
        rest.stages.retain(|stage| {
            index += 1;
            let keep = !on_cycles.contains(&(index - 1));
            if !keep {
                options
                    .written_elsewhere
                    .extend(stage.outputs.iter().map(|o| o.declared.location.clone()));
            }
            keep
        });
        let (dag, _) = build_partial(rest, options);
        return (dag, diagnostics);
    }
    let order = topological_order(&graph);
    let dag = Dag {
        pipeline,
        graph,
        order,
        sources,
        elsewhere: options.written_elsewhere,
    };
    (Some(dag), diagnostics)
}

/// Outputs at `key`, above it (a directory holding it) or below it (inside it).
fn producers_of(
    outputs: &BTreeMap<PathKey, Vec<(usize, usize)>>,
    key: &PathKey,
) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    for depth in 1..=key.len() {
        if let Some(writers) = outputs.get(&key[..depth]) {
            found.extend(writers.iter().copied());
        }
    }
    for (below, writers) in outputs.range(key.clone()..) {
        if !below.starts_with(key) {
            break;
        }
        if below.len() > key.len() {
            found.extend(writers.iter().copied());
        }
    }
    found.sort_unstable();
    found.dedup();
    found
}

fn check_output_conflicts(
    pipeline: &Pipeline,
    outputs: &BTreeMap<PathKey, Vec<(usize, usize)>>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let port = |(s, p): (usize, usize)| -> (&Stage, &Port) {
        let stage = &pipeline.stages[s];
        (stage, &stage.outputs[p])
    };
    for (key, writers) in outputs {
        let (first_stage, first) = port(writers[0]);
        for &other in &writers[1..] {
            let (stage, output) = port(other);
            let message = if stage.name == first_stage.name {
                format!(
                    "stage `{}` lists the output `{}` twice",
                    stage.name, output.text
                )
            } else {
                format!(
                    "stages `{}` and `{}` both write `{}`",
                    first_stage.name, stage.name, output.text
                )
            };
            diagnostics.push(
                Diagnostic::error(message)
                    .at(output.span, format!("written by `{}`", stage.name))
                    .also(
                        first.span,
                        format!("also written by `{}`", first_stage.name),
                    )
                    .help("every path has one writer; give each stage its own output"),
            );
        }
        for depth in 1..key.len() {
            let Some(outer) = outputs.get(&key[..depth]) else {
                continue;
            };
            let (outer_stage, outer_port) = port(outer[0]);
            for &inner in writers {
                let (stage, output) = port(inner);
                diagnostics.push(
                    Diagnostic::error(format!(
                        "output `{}` of stage `{}` is inside `{}`, which stage `{}` writes",
                        output.text, stage.name, outer_port.text, outer_stage.name
                    ))
                    .at(output.span, "written here")
                    .also(
                        outer_port.span,
                        format!("`{}` writes this directory", outer_stage.name),
                    )
                    .help("a directory output belongs to one stage, with everything inside it"),
                );
            }
        }
    }
}

fn check_source(
    pipeline: &Pipeline,
    stage: &Stage,
    input: &Port,
    outputs: &BTreeMap<PathKey, Vec<(usize, usize)>>,
    written: &mut Option<Vec<String>>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let Some(path) = input.declared.location.local_path() else {
        // S3 sources are checked when they are read; validate makes no network calls.
        return;
    };
    if path.exists() {
        return;
    }
    let shown = input.declared.location.display(&pipeline.workdir);
    let diagnostic = Diagnostic::error(format!(
        "input `{}` of stage `{}` does not exist, and no stage writes it",
        input.text, stage.name
    ));
    // Every output, for "did you mean": listed once, not once per missing input.
    let written = written.get_or_insert_with(|| {
        outputs
            .values()
            .flatten()
            .map(|&(s, p)| {
                pipeline.stages[s].outputs[p]
                    .declared
                    .location
                    .display(&pipeline.workdir)
            })
            .collect()
    });
    let diagnostic = match did_you_mean_path(&shown, written.iter().map(String::as_str)) {
        Some(s) => diagnostic.at(
            input.span,
            format!("did you mean `{s}`, which a stage writes?"),
        ),
        None => {
            match did_you_mean_path(&shown, siblings(&shown, path).iter().map(String::as_str)) {
                Some(s) => diagnostic.at(input.span, format!("did you mean `{s}`?")),
                None => diagnostic.at(input.span, "not found"),
            }
        }
    };
    diagnostics.push(diagnostic.note(format!("looked for {}", path.display())));
}

/// The files beside a missing `path` (shown as `shown`), shown the same way: a typo in a file
/// name finds its file. The first thousand in name order of at most 100,000 read; none when its
/// folder is missing too.
fn siblings(shown: &str, path: &std::path::Path) -> Vec<String> {
    let (Some(folder), Some(shown_folder)) = (
        path.parent(),
        shown
            .trim_end_matches('/')
            .rsplit_once('/')
            .map(|(f, _)| f)
            .or(Some("")),
    ) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .take(100_000)
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names.truncate(1000);
    names
        .into_iter()
        .map(|name| match shown_folder {
            "" => name,
            folder => format!("{folder}/{name}"),
        })
        .collect()
}

/// Reports each cycle; gives the stages on one.
fn check_cycles(
    pipeline: &Pipeline,
    graph: &DiGraph<usize, Edge>,
    diagnostics: &mut Vec<Diagnostic>,
) -> BTreeSet<usize> {
    let mut on_cycles = BTreeSet::new();
    let mut components = petgraph::algo::tarjan_scc(graph);
    for component in &mut components {
        component.sort_by_key(|n| graph[*n]);
    }
    components.sort_by_key(|c| c.first().map(|n| graph[*n]));
    for component in components.into_iter().filter(|c| c.len() > 1) {
        on_cycles.extend(component.iter().map(|n| graph[*n]));
        let cycle = find_cycle(graph, &component);
        let names: Vec<&str> = cycle
            .iter()
            .chain(cycle.first())
            .map(|n| pipeline.stages[graph[*n]].name.as_str())
            .collect();
        let mut diagnostic = Diagnostic::error(format!("dependency cycle: {}", names.join(" → ")));
        for (i, node) in cycle.iter().enumerate() {
            let next = cycle[(i + 1) % cycle.len()];
            let stage = &pipeline.stages[graph[*node]];
            let reader = &pipeline.stages[graph[next]];
            let edge = graph.find_edge(*node, next).map(|e| &graph[e]);
            let path = edge.and_then(|e| e.paths.first());
            let input = path.and_then(|p| {
                reader.inputs.iter().find(|i| {
                    &i.declared.location == p
                        || i.declared.location.is_within(p)
                        || p.is_within(&i.declared.location)
                })
            });
            let label = format!("`{}` reads what `{}` writes", reader.name, stage.name);
            diagnostic = match (i, input) {
                (0, Some(input)) => diagnostic.at(input.span, label),
                (_, Some(input)) => diagnostic.also(input.span, label),
                (0, None) => diagnostic.at(reader.span, label),
                (_, None) => diagnostic.also(reader.span, label),
            };
        }
        diagnostics
            .push(diagnostic.help("a stage cannot need its own outputs, even through others"));
    }
    on_cycles
}

/// A cycle through the first node of a strongly connected component, in edge order.
fn find_cycle(graph: &DiGraph<usize, Edge>, component: &[NodeIndex]) -> Vec<NodeIndex> {
    let start = component[0];
    let inside = |n: &NodeIndex| component.contains(n);
    // Breadth-first from `start` back to `start`, neighbours in declaration order: the shortest loop.
    let mut previous: BTreeMap<NodeIndex, NodeIndex> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        let mut next: Vec<NodeIndex> = graph.neighbors(node).filter(inside).collect();
        next.sort_by_key(|n| graph[*n]);
        for n in next {
            if n == start {
                let mut cycle = vec![node];
                let mut at = node;
                while at != start {
                    at = previous[&at];
                    cycle.push(at);
                }
                cycle.reverse();
                return cycle;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = previous.entry(n) {
                e.insert(node);
                queue.push_back(n);
            }
        }
    }
    component.to_vec()
}

/// Kahn's algorithm, ties broken by declaration order, so the order is stable.
fn topological_order(graph: &DiGraph<usize, Edge>) -> Vec<usize> {
    let mut indegree: Vec<usize> = graph
        .node_indices()
        .map(|n| graph.neighbors_directed(n, petgraph::Incoming).count())
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = graph
        .node_indices()
        .filter(|n| indegree[n.index()] == 0)
        .map(|n| Reverse(graph[n]))
        .collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(Reverse(stage)) = ready.pop() {
        order.push(stage);
        for next in graph.neighbors(NodeIndex::new(stage)) {
            indegree[next.index()] -= 1;
            if indegree[next.index()] == 0 {
                ready.push(Reverse(graph[next]));
            }
        }
    }
    order
}

impl Dag {
    /// What stages left out of a partial graph write (empty for a whole one).
    pub fn written_elsewhere(&self) -> &[Location] {
        &self.elsewhere
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    pub fn stage(&self, index: usize) -> &Stage {
        &self.pipeline.stages[index]
    }

    /// The index of the stage named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.pipeline.stages.iter().position(|s| s.name == name)
    }

    /// The same stage's instance for the previous partition, when a check of `index` compares
    /// with it (`change: {against: previous}`): it must have ended before `index` is checked.
    pub fn previous_partition(&self, index: usize) -> Option<usize> {
        let stage = self.stage(index);
        let partition = stage.partition.as_ref()?;
        let compares = stage.checks.iter().any(|c| {
            matches!(
                c.check,
                imba_stages::checks::Check::Change {
                    against: imba_stages::checks::Against::Previous,
                    ..
                }
            )
        });
        if !compares {
            return None;
        }
        self.index_of(&partition.sibling(&stage.name, partition.previous.as_deref()?))
    }

    /// The inputs no stage writes (data from outside the pipeline), as (stage, input) indices in
    /// stage order.
    pub fn sources(&self) -> &[(usize, usize)] {
        &self.sources
    }

    /// Stage indices in a stable topological order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// For each stage index, its place in [`Dag::order`].
    pub fn positions(&self) -> Vec<usize> {
        let mut position = vec![0; self.order.len()];
        for (i, &stage) in self.order.iter().enumerate() {
            position[stage] = i;
        }
        position
    }

    /// The stages `index` needs, with the paths, in declaration order.
    pub fn needs(&self, index: usize) -> Vec<(usize, &Edge)> {
        let mut needs: Vec<(usize, &Edge)> = self
            .graph
            .edges_directed(NodeIndex::new(index), petgraph::Incoming)
            .map(|e| (self.graph[petgraph::visit::EdgeRef::source(&e)], e.weight()))
            .collect();
        needs.sort_by_key(|(s, _)| *s);
        needs
    }

    /// Every edge as (from, to, why), in the topological order of their endpoints.
    pub fn edges(&self) -> Vec<(usize, usize, &Edge)> {
        let position = self.positions();
        let mut edges: Vec<(usize, usize, &Edge)> = self
            .graph
            .edge_indices()
            .filter_map(|e| {
                let (a, b) = self.graph.edge_endpoints(e)?;
                Some((self.graph[a], self.graph[b], &self.graph[e]))
            })
            .collect();
        edges.sort_by_key(|(a, b, _)| (position[*a], position[*b]));
        edges
    }

    /// Every stage reachable from `from` along edges (not including `from` itself).
    pub fn descendants(
        &self,
        from: &std::collections::BTreeSet<usize>,
    ) -> std::collections::BTreeSet<usize> {
        self.reach(from, petgraph::Outgoing)
    }

    /// Every stage that `from` needs, directly or not.
    pub fn ancestors(
        &self,
        from: &std::collections::BTreeSet<usize>,
    ) -> std::collections::BTreeSet<usize> {
        self.reach(from, petgraph::Incoming)
    }

    fn reach(
        &self,
        from: &std::collections::BTreeSet<usize>,
        direction: petgraph::Direction,
    ) -> std::collections::BTreeSet<usize> {
        let mut seen = std::collections::BTreeSet::new();
        let mut stack: Vec<usize> = from.iter().copied().collect();
        while let Some(stage) = stack.pop() {
            for next in self
                .graph
                .neighbors_directed(NodeIndex::new(stage), direction)
            {
                let next = self.graph[next];
                if !from.contains(&next) && seen.insert(next) {
                    stack.push(next);
                }
            }
        }
        seen
    }

    /// The stages that read what `index` writes, in declaration order.
    pub fn dependents(&self, index: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .graph
            .neighbors(NodeIndex::new(index))
            .map(|n| self.graph[n])
            .collect();
        out.sort_unstable();
        out
    }

    pub fn edge_count(&self) -> usize {
        self.graph.edge_count()
    }
}
