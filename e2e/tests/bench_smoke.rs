//! The benchmark harness itself, in `make test`: a smoke run of the headline rows (accept and
//! queue, relay) against the node binary of this build and a private Postfix on loopback. It
//! fails when a row of either system cannot be measured, so that a change which breaks the
//! harness (a config the node refuses, a peer that no longer starts) is found before a
//! `make bench` run reports nothing but failures. It runs both loaded parts too (beside a
//! busy loop in the servers' cgroup, and in a cgroup of its own). The figures of a smoke run
//! mean nothing.

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
        background_load: 1,
        cpu_pinning: "not pinned (test)".to_owned(),
        cgroup_load: true,
        settle: Duration::ZERO,
    })
    .await
    .expect("the harness runs");

    // Where this machine lets the run make CPU cgroups (root, a writable `cpu` controller),
    // the third run, with the busy loop in a cgroup of its own, is measured too; elsewhere
    // the report says why not.
    let cgroups = results
        .meta
        .cgroup_load
        .as_deref()
        .expect("a loaded run reports its cgroup part");
    let loaded_parts: &[(u32, bool)] = if cgroups.starts_with("not run") {
        assert!(cgroups.contains("no writable CPU cgroup"), "{cgroups}");
        &[(0, false), (1, false)]
    } else {
        assert!(
            cgroups.contains("1 busy processes in a cgroup of their own"),
            "{cgroups}"
        );
        &[(0, false), (1, false), (1, true)]
    };
    for &(load, in_cgroup) in loaded_parts {
        for scenario in [ScenarioId::AcceptAndQueue, ScenarioId::Relay] {
            for system in [System::KubemailSyncAlways, System::Postfix] {
                let rows: Vec<_> = results
                    .measurements
                    .iter()
                    .filter(|m| {
                        m.scenario == scenario
                            && m.system == system
                            && m.background_load == load
                            && m.background_cgroups == in_cgroup
                    })
                    .collect();
                assert!(
                    !rows.is_empty(),
                    "no {scenario:?} row for {system:?} (background load {load}, own cgroup {in_cgroup})"
                );
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
    }
    let report = std::fs::read_to_string(&markdown).expect("BENCHMARKS.md written");
    assert!(
        report.contains("Smoke run"),
        "a smoke run says so: {report}"
    );
    if !cgroups.starts_with("not run") {
        assert!(
            report.contains("### The same beside 1 busy loops in a cgroup of their own"),
            "{report}"
        );
    }
    assert!(json.is_file(), "bench-results.json written");
}
