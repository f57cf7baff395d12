//! The import graph of a directory of Rust modules, for tests that keep a layering acyclic
//! (a leaf module stays a leaf, two siblings never import each other). It reads the source
//! text: every `super::…` (resolved from where it is written) and every absolute path with the
//! directory's prefix (`crate::delivery::…`), including `{a, b}` groups, is an edge to the
//! sibling it names. Comment lines are skipped. An inline `mod x {` is taken to run to the end
//! of its file (where test modules sit), so its `super::` means the file's own module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The directory's own file (`mod.rs`, or `lib.rs` at a crate root), as a node of the graph.
pub const PARENT: &str = "mod";

/// One source file: its module path below the directory (`build/config.rs` is
/// `["build", "config"]`, `mod.rs` and `lib.rs` are `[]`) and its text.
pub type Source = (Vec<String>, String);

/// The `.rs` files of `dir` and its subdirectories with their module paths.
pub fn sources(dir: &Path) -> Vec<Source> {
    let mut out = Vec::new();
    collect(dir, &[], &mut out);
    out
}

fn collect(dir: &Path, prefix: &[String], out: &mut Vec<Source>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let Some(name) = path.file_stem().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        let mut module = prefix.to_vec();
        if path.is_dir() {
            module.push(name);
            collect(&path, &module, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let parent_file = name == "mod" || (prefix.is_empty() && name == "lib");
            if !parent_file {
                module.push(name);
            }
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            out.push((module, text));
        }
    }
}

/// Which sibling modules each module of `files` refers to. `absolute` is the directory's own
/// path with a trailing `::` (`crate::controller::mail_domain::`, or `crate::` at a crate root).
/// The parent file uses every module it declares.
pub fn module_graph(files: &[Source], absolute: &str) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<&str> = files
        .iter()
        .filter_map(|(m, _)| m.first().map(String::as_str))
        .collect();
    let node = |m: &[String]| m.first().cloned().unwrap_or_else(|| PARENT.to_owned());
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in files {
        let from = node(module);
        graph.entry(from.clone()).or_default();
        if module.is_empty() {
            for m in &modules {
                graph
                    .entry(from.clone())
                    .or_default()
                    .insert((*m).to_owned());
            }
        }
        let mut here = module.clone();
        for line in text.lines().map(str::trim) {
            if line.starts_with("//") {
                continue;
            }
            let declaration = line.strip_prefix("pub ").unwrap_or(line);
            if let Some(inner) = declaration.strip_prefix("mod ")
                && inner.ends_with('{')
            {
                here.push(inner.trim_end_matches('{').trim().to_owned());
            }
            for target in references(line, &here, absolute) {
                if modules.contains(target.as_str()) && target != from {
                    graph.entry(from.clone()).or_default().insert(target);
                }
            }
        }
    }
    graph
}

/// The first path segment below the directory of every reference on `line`, written in
/// module `here`.
fn references(line: &str, here: &[String], absolute: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(start) = rest.find(['s', 'c']) {
        let tail = &rest[start..];
        let preceded_by_ident = rest[..start]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        let resolved = if preceded_by_ident {
            None
        } else if let Some(after) = tail.strip_prefix(absolute) {
            Some((Vec::new(), after))
        } else if tail.starts_with("super::") {
            let mut base = here.to_vec();
            let mut after = tail;
            let mut above = false;
            while let Some(next) = after.strip_prefix("super::") {
                above |= base.pop().is_none();
                after = next;
            }
            (!above).then_some((base, after))
        } else {
            None
        };
        if let Some((base, after)) = resolved {
            let segments: Vec<&str> = match after.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .collect(),
                None => vec![after],
            };
            for segment in segments {
                let name: String = segment
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let first = base.first().cloned().unwrap_or(name);
                if !first.is_empty() && first != "self" {
                    found.push(first);
                }
            }
        }
        rest = &tail[1..];
    }
    found
}

/// `graph` restricted to the modules in `keep` (edges between them only).
pub fn restrict(
    graph: &BTreeMap<String, BTreeSet<String>>,
    keep: &[&str],
) -> BTreeMap<String, BTreeSet<String>> {
    graph
        .iter()
        .filter(|(from, _)| keep.contains(&from.as_str()))
        .map(|(from, to)| {
            let to = to
                .iter()
                .filter(|t| keep.contains(&t.as_str()))
                .cloned()
                .collect();
            (from.clone(), to)
        })
        .collect()
}

/// A cycle in `graph`, as the modules along it, if there is one.
pub fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}
