//! The module layering of both crates, checked from their sources: every module of `src/` uses
//! only the layers below its own, and no two files of `src/` or `stages/src/` import each other
//! in a circle. `src/lib.rs` documents the layers; this test keeps the code to them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/`'s layers, from the top. A module may use its own layer and those below it.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["ui"],
    &["report"],
    &["watch"],
    &["run"],
    &["plan"],
    &["state"],
    &["store"],
    &["graph"],
    &["config"],
    &["model"],
    &["diagnostic", "budget", "interrupt"],
];

/// Every `.rs` file under `root`, by its module path (`store/s3`, `config` for `config/mod.rs`).
fn modules(root: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(root).unwrap().with_extension("");
                let mut parts: Vec<String> = relative
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                if matches!(
                    parts.last().map(String::as_str),
                    Some("mod" | "lib" | "main")
                ) {
                    parts.pop();
                }
                if !parts.is_empty() {
                    out.insert(parts.join("/"), path);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The source without its test module: tests may reach anywhere.
fn without_tests(source: &str) -> &str {
    match source.find("#[cfg(test)]\nmod ") {
        Some(at) => &source[..at],
        None => source,
    }
}

/// The module paths a source names in code (not in comments), as `crate::a::b…` (grouped
/// `use crate::{a, b::c}` included) or `super::x`, resolved against `module`.
fn references(module: &str, source: &str) -> BTreeSet<Vec<String>> {
    let code: String = without_tests(source)
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let source = code.as_str();
    let mut found = BTreeSet::new();
    let bytes = source.as_bytes();
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent_of(module))] {
        let mut from = 0;
        while let Some(at) = source[from..].find(prefix) {
            let start = from + at;
            from = start + prefix.len();
            // `imba_stages::…`, `my_crate::…` are other paths.
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            for path in paths_at(&source[from..]) {
                let mut full = base.clone();
                full.extend(path);
                found.insert(full);
            }
        }
    }
    found
}

fn parent_of(module: &str) -> Vec<String> {
    let mut parts: Vec<String> = module.split('/').map(str::to_owned).collect();
    parts.pop();
    parts
}

/// The paths written at the start of `text`: `a::b::C`, or a `{…}` group of them.
fn paths_at(text: &str) -> Vec<Vec<String>> {
    if let Some(rest) = text.strip_prefix('{') {
        let mut depth = 1;
        let mut end = 0;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = i;
                break;
            }
        }
        let body = &rest[..end];
        let mut items = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&body[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        items.push(&body[start..]);
        return items
            .into_iter()
            .flat_map(|item| paths_at(item.trim()))
            .collect();
    }
    let mut segments = Vec::new();
    let mut rest = text;
    loop {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            break;
        }
        rest = &rest[name.len()..];
        segments.push(name);
        match rest.strip_prefix("::") {
            Some(after) if after.starts_with('{') => {
                return paths_at(after)
                    .into_iter()
                    .map(|tail| segments.iter().cloned().chain(tail).collect())
                    .collect();
            }
            Some(after) => rest = after,
            None => break,
        }
    }
    vec![segments]
}

/// The module (a key of `modules`) a path names: its longest prefix that is a module.
fn module_of(path: &[String], modules: &BTreeMap<String, PathBuf>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("/"))
        .find(|m| modules.contains_key(m))
}

/// Which file-level module imports which.
fn edges(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules(root);
    let mut edges = BTreeMap::new();
    for (module, file) in &modules {
        let source = std::fs::read_to_string(file).unwrap();
        let targets: BTreeSet<String> = references(module, &source)
            .into_iter()
            .filter(|p| p.first().is_none_or(|s| s != "self"))
            .filter_map(|p| module_of(&p, &modules))
            .filter(|target| target != module)
            // A module and its own submodules are one unit: `config` declares and calls
            // `config/raw`, and a submodule may use what its parents define.
            .filter(|target| !target.starts_with(&format!("{module}/")))
            .filter(|target| !module.starts_with(&format!("{target}/")))
            .collect();
        edges.insert(module.clone(), targets);
    }
    edges
}

/// The circles of a graph: its strongly connected components of more than one node.
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: order by finish time, then collect on the reversed graph.
    fn visit<'a>(
        node: &'a str,
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<&'a str>,
        order: &mut Vec<&'a str>,
    ) {
        if !seen.insert(node) {
            return;
        }
        for next in edges.get(node).into_iter().flatten() {
            visit(next, edges, seen, order);
        }
        order.push(node);
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for node in edges.keys() {
        visit(node, edges, &mut seen, &mut order);
    }
    let mut reversed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in edges {
        for to in tos {
            reversed.entry(to.clone()).or_default().insert(from.clone());
        }
    }
    let mut assigned = BTreeSet::new();
    let mut found = Vec::new();
    for node in order.into_iter().rev() {
        let mut component = Vec::new();
        visit(node, &reversed, &mut assigned, &mut component);
        if component.len() > 1 {
            component.sort();
            found.push(component.into_iter().map(str::to_owned).collect());
        }
    }
    found
}

fn crate_root(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

#[test]
fn no_file_of_either_crate_imports_in_a_circle() {
    for root in ["src", "stages/src"] {
        let edges = edges(&crate_root(root));
        assert!(edges.len() > 10, "{root}: found too few modules: {edges:?}");
        let found = circles(&edges);
        assert!(
            found.is_empty(),
            "{root}: modules importing each other: {found:?}"
        );
    }
}

#[test]
fn every_module_of_src_uses_only_the_layers_below_it() {
    let layer_of = |module: &str| {
        let top = module.split('/').next().unwrap();
        LAYERS.iter().position(|layer| layer.contains(&top))
    };
    let mut wrong = Vec::new();
    for (module, targets) in edges(&crate_root("src")) {
        if module.is_empty() {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            wrong.push(format!(
                "`{module}` is in no layer: add it to LAYERS and src/lib.rs"
            ));
            continue;
        };
        for target in targets {
            let top = |m: &str| m.split('/').next().unwrap().to_owned();
            if top(&target) == top(&module) {
                continue;
            }
            if layer_of(&target).is_some_and(|theirs| theirs < own) {
                wrong.push(format!("`{module}` uses `{target}`, a layer above it"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_relative_imports() {
    let source = "use crate::{a::{b, c::D}, e};\nuse super::f::G;\nfn x() { crate::h::i(); }";
    let found = references("p/q", source);
    let expected: BTreeSet<Vec<String>> = [
        vec!["a", "b"],
        vec!["a", "c", "D"],
        vec!["e"],
        vec!["p", "f", "G"],
        vec!["h", "i"],
    ]
    .into_iter()
    .map(|p| p.into_iter().map(str::to_owned).collect())
    .collect();
    assert_eq!(found, expected);
    let edges = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
        ("d".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(circles(&edges), vec![vec!["a", "b", "c"]]);
}

#[test]
fn only_the_store_and_the_model_look_at_a_locations_scheme() {
    let mut found = Vec::new();
    for (module, file) in modules(&crate_root("src")) {
        let top = module.split('/').next().unwrap_or_default();
        if top == "store" || top == "model" {
            continue;
        }
        let source = std::fs::read_to_string(&file).unwrap();
        for (n, line) in source.lines().enumerate() {
            if line.contains("Location::S3") || line.contains("Location::Local") {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn nothing_below_the_report_layer_prints() {
    let mut found = Vec::new();
    for (module, file) in modules(&crate_root("src")) {
        let top = module.split('/').next().unwrap_or_default();
        if matches!(top, "report" | "cli" | "main") {
            continue;
        }
        let source = std::fs::read_to_string(&file).unwrap();
        for (n, line) in without_tests(&source).lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if [
                "println!",
                "eprintln!",
                "print!(",
                "eprint!(",
                "stdout()",
                "stderr()",
            ]
            .iter()
            .any(|p| code.contains(p))
            {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
