//! The benchmark harness itself, in `make test`: a smoke run of the headline rows (accept and
//! queue, relay) against the node binary of this build and a private Postfix on loopback. It
//! fails when a row of either system cannot be measured, so that a change which breaks the
//! harness (a config the node refuses, a peer that no longer starts) is found before a
//! `make bench` run reports nothing but failures. The figures of a smoke run mean nothing.

use std::time::Duration;

use kubemail_e2e::bench::runner::{RunOptions, run};
use kubemail_e2e::bench::scenario::{Outcome, ScenarioId, System};
use kubemail_e2e::hostile::process::smtp_node_binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_and_relay_rows_measure_both_systems() {
    let dir = tempfile::tempdir().expect("temp dir");
    let markdown = dir.path().join("BENCHMARKS.md");
    let json = dir.path().join("bench-results.json");
    let results = run(RunOptions {
        smtp_node: smtp_node_binary(),
        work_dir: Some(dir.path().join("work")),
        keep_work_dir: false,
        smoke: true,
        scenarios: vec![ScenarioId::AcceptAndQueue, ScenarioId::Relay],
        repetitions: Some(1),
        idle_count: None,
        idle_tls_count: None,
        idle_postfix_count: None,
        markdown: Some(markdown.clone()),
        json: Some(json.clone()),
        background_load: 0,
        cpu_pinning: "not pinned (test)".to_owned(),
        settle: Duration::ZERO,
    })
    .await
    .expect("the harness runs");

    for scenario in [ScenarioId::AcceptAndQueue, ScenarioId::Relay] {
        for system in [System::KubemailSyncAlways, System::Postfix] {
            let rows: Vec<_> = results
                .measurements
                .iter()
                .filter(|m| m.scenario == scenario && m.system == system)
                .collect();
            assert!(!rows.is_empty(), "no {scenario:?} row for {system:?}");
            for m in rows {
                assert_eq!(
                    m.outcome,
                    Outcome::Ok,
                    "{scenario:?} on {system:?}: {:?}",
                    m.notes
                );
                assert!(
                    m.msgs_per_sec.is_some_and(|r| r > 0.0),
                    "{scenario:?} on {system:?} measured no rate: {m:?}"
                );
            }
        }
    }
    let report = std::fs::read_to_string(&markdown).expect("BENCHMARKS.md written");
    assert!(
        report.contains("Smoke run"),
        "a smoke run says so: {report}"
    );
    assert!(json.is_file(), "bench-results.json written");
}
