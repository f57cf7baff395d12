//! The operator speaks to the SMTP nodes only through the contract crates (node configuration,
//! queue contract, wire format, telemetry): it must never link the SMTP node itself. Checked on
//! the workspace's `Cargo.lock`, which lists every package with its resolved dependencies, so
//! the test sees normal, build and dev dependencies alike (what `cargo tree` would print).

use std::collections::{BTreeMap, BTreeSet};

/// `name -> dependency names` of every package in a `Cargo.lock` (version suffixes dropped:
/// `"base64 0.22.1"` is `base64`).
fn lock_graph(lock: &str) -> BTreeMap<String, Vec<String>> {
    let mut graph = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let mut name = None;
        let mut deps = Vec::new();
        let mut in_deps = false;
        for line in block.lines().map(str::trim) {
            if let Some(n) = line.strip_prefix("name = ") {
                name = Some(n.trim_matches('"').to_owned());
            } else if line.starts_with("dependencies = [") {
                in_deps = true;
            } else if in_deps && line == "]" {
                in_deps = false;
            } else if in_deps {
                let dep = line.trim_end_matches(',').trim_matches('"');
                let dep = dep.split_whitespace().next().unwrap_or(dep);
                deps.push(dep.to_owned());
            }
        }
        if let Some(name) = name {
            graph.entry(name).or_insert_with(Vec::new).extend(deps);
        }
    }
    graph
}

/// Every package reachable from `root`.
fn reachable(graph: &BTreeMap<String, Vec<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_owned()];
    while let Some(next) = todo.pop() {
        if seen.insert(next.clone()) {
            todo.extend(graph.get(&next).into_iter().flatten().cloned());
        }
    }
    seen
}

#[test]
fn the_operator_does_not_link_the_smtp_node() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock");
    let lock = std::fs::read_to_string(path).expect("read the workspace Cargo.lock");
    let graph = lock_graph(&lock);
    let deps = reachable(&graph, "kubemail-operator");
    for contract in [
        "kubemail-config",
        "kubemail-queue",
        "kubemail-smtp-protocol",
    ] {
        assert!(
            deps.contains(contract),
            "the operator should use the contract crate {contract}; the lock file parser or the layout is off"
        );
    }
    assert!(
        !deps.contains("kubemail-smtp-node"),
        "kubemail-operator depends (directly or through another crate) on kubemail-smtp-node"
    );
}

#[test]
fn the_lock_parser_sees_transitive_dependencies() {
    let lock = "[[package]]\nname = \"a\"\nversion = \"1\"\ndependencies = [\n \"b\",\n]\n\n\
                [[package]]\nname = \"b\"\nversion = \"1\"\ndependencies = [\n \"c 0.2.0\",\n]\n\n\
                [[package]]\nname = \"c\"\nversion = \"0.2.0\"\n";
    let deps = reachable(&lock_graph(lock), "a");
    assert_eq!(
        deps,
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    );
}
