//! The layering of the node's modules, read from the source: the listeners hand connections
//! to sessions and never the other way round, the state both share sits in leaves below them,
//! and the delivery consumer drives the workers without the workers knowing the consumer.

use std::path::Path;

use kubemail_test_support::module_graph::{Source, find_cycle, module_graph, restrict, sources};

fn src(below: &str) -> Vec<Source> {
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(below),
    )
}

#[test]
fn server_and_session_share_leaves_and_do_not_import_each_other_back() {
    let files = src("");
    let graph = module_graph(&files, "crate::");
    let layer = restrict(&graph, &["server", "session", "context", "connection"]);
    assert_eq!(find_cycle(&layer), None, "{layer:?}");
    assert!(layer["server"].contains("session"), "{layer:?}");
    assert!(!layer["session"].contains("server"), "{layer:?}");
    assert!(
        layer["connection"].is_empty(),
        "connection is a leaf: {layer:?}"
    );
    assert_eq!(
        layer["context"].iter().collect::<Vec<_>>(),
        ["connection"],
        "{layer:?}"
    );

    // The check would see the old back edge.
    let mut with_back_edge = files.clone();
    let session = with_back_edge
        .iter_mut()
        .find(|(m, _)| m == &["session"])
        .expect("session/mod.rs");
    session
        .1
        .insert_str(0, &format!("use crate::{}::ServerContext;\n", "server"));
    let layer = restrict(
        &module_graph(&with_back_edge, "crate::"),
        &["server", "session", "context", "connection"],
    );
    assert!(find_cycle(&layer).is_some(), "{layer:?}");
}

#[test]
fn delivery_worker_does_not_import_the_consumer() {
    let files = src("delivery");
    let graph = module_graph(&files, "crate::delivery::");
    let pair = restrict(&graph, &["consumer", "worker"]);
    assert_eq!(find_cycle(&pair), None, "{pair:?}");
    assert!(pair["consumer"].contains("worker"), "{pair:?}");
    assert!(pair["worker"].is_empty(), "{pair:?}");
}
