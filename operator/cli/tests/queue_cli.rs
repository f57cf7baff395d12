//! The `kubectl-kubemail` binary against a real nats-server holding queue streams of 1,000
//! and 10,000 entries (written with the queue contract's codec, as the nodes write them):
//!
//! * the first page of 10,000 entries comes back quickly and filters select exactly the
//!   entries they name;
//! * listing all 10,000 entries needs no more memory than listing 1,000 (peak RSS, `VmHWM`);
//! * stats count per destination; hold, dry runs and deletes act as they say; a delete by
//!   filter without `--yes` only counts.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use bytes::Bytes;
use kubemail_queue::{Direction, QueueEntry, QueueId};
use kubemail_test_support::ports::free_port;
use kubemail_test_support::wait::wait_for_port;
use serde_json::Value;

struct Nats {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl Nats {
    fn start() -> Self {
        let store = tempfile::tempdir().unwrap();
        let port = free_port();
        let binary = tool("nats-server");
        let mut child = Command::new(binary)
            .args(["-js", "-sd"])
            .arg(store.path())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(
            ([127, 0, 0, 1], port).into(),
            "nats-server",
            &mut child,
            Duration::from_secs(20),
        );
        Self {
            child,
            port,
            _store: store,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tool(name: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH (e2e/tools/setup.sh installs it)"))
}

const DOMAINS: [&str; 3] = ["a.test", "b.test", "c.test"];

/// Entry `i` of a test queue: accepted `i` minutes ago, recipient domain `DOMAINS[i % 3]`;
/// every 5th deferred after a 421; every 7th held.
fn entry(i: usize, now: SystemTime) -> (QueueEntry, bool) {
    let deferred = i.is_multiple_of(5);
    let held = i.is_multiple_of(7);
    let e = QueueEntry {
        message_id: Some(format!("<m{i}@example.com>")),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        body_size: Some(2048),
        attempts: u32::from(deferred),
        not_before: deferred.then(|| now + Duration::from_secs(3600)),
        last_error: deferred.then(|| "mx.b.test said: 421 4.7.0 slow down".to_owned()),
        ..QueueEntry::new(
            QueueId::from(format!("q{i:06}")),
            format!("sender{}@example.com", i % 4),
            vec![format!("user{i}@{}", DOMAINS[i % 3])],
            Direction::Outbound,
            "example.com".into(),
            now - Duration::from_secs(60 * i as u64),
        )
    };
    (e, held)
}

/// A queue stream `stream` (subjects `<prefix>.>`) with `n` entries; bodies of 2 KiB.
async fn fill(url: &str, stream: &str, prefix: &str, n: usize) {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(Config {
        name: stream.to_owned(),
        subjects: vec![format!("{prefix}.>")],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        discard: DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    let body = Bytes::from(format!("Subject: test\r\n\r\n{}\r\n", "x".repeat(2000)));
    let now = SystemTime::now();
    let mut acks = Vec::new();
    for i in 0..n {
        let (e, held) = entry(i, now);
        let subject = if held {
            kubemail_queue::held_subject(prefix, &e.domain)
        } else {
            kubemail_queue::subject(prefix, &e.domain)
        };
        acks.push(
            js.publish_with_headers(subject, e.to_headers(&e.msg_id()), body.clone())
                .await
                .unwrap(),
        );
        if acks.len() == 500 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
}

struct Run {
    stdout: String,
    stderr: String,
    success: bool,
    /// Peak resident memory (`VmHWM`) in KiB, as last seen.
    hwm_kib: u64,
    took: Duration,
}

/// Runs the plugin with `args` against `stream`, sampling its peak memory while it runs.
fn cli(url: &str, stream: &str, prefix: &str, args: &[&str]) -> Run {
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_kubectl-kubemail"))
        .args([
            "--nats-url",
            url,
            "--stream",
            stream,
            "--subject-prefix",
            prefix,
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let sampler = std::thread::spawn(move || {
        let mut hwm = 0u64;
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let Some(v) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            else {
                break;
            };
            hwm = hwm.max(v);
            std::thread::sleep(Duration::from_millis(5));
        }
        hwm
    });
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        success: out.status.success(),
        hwm_kib: sampler.join().unwrap(),
        took,
    }
}

fn json(run: &Run) -> Value {
    assert!(run.success, "failed: {}\n{}", run.stdout, run.stderr);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

#[tokio::test(flavor = "multi_thread")]
async fn listing_ten_thousand_entries_is_quick_exact_and_bounded_in_memory() {
    let nats = Nats::start();
    let url = nats.url();
    fill(&url, "SMALL", "s.queue", 1_000).await;
    fill(&url, "LARGE", "l.queue", 10_000).await;

    // The first page of 10,000.
    let page = cli(&url, "LARGE", "l.queue", &["queue", "list", "-o", "json"]);
    let v = json(&page);
    assert_eq!(v["items"].as_array().unwrap().len(), 50);
    let next = v["next"].as_u64().expect("a next page");
    eprintln!("first page of 10,000 in {:?}", page.took);
    assert!(page.took < Duration::from_secs(5), "{:?}", page.took);
    let second = json(&cli(
        &url,
        "LARGE",
        "l.queue",
        &["queue", "list", "-o", "json", "--after", &next.to_string()],
    ));
    assert_eq!(
        second["items"][0]["sequence"].as_u64(),
        Some(next + 1),
        "the next page starts after the last entry shown"
    );

    // A filter selects exactly the entries it names.
    let filtered = json(&cli(
        &url,
        "LARGE",
        "l.queue",
        &[
            "queue",
            "list",
            "--limit",
            "0",
            "-o",
            "json",
            "--to-domain",
            "b.test",
            "--state",
            "deferred",
        ],
    ));
    let got: Vec<&str> = filtered["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["queueId"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..10_000)
        .filter(|i| i % 3 == 1 && i % 5 == 0 && i % 7 != 0)
        .map(|i| format!("q{i:06}"))
        .collect();
    assert_eq!(got, want);
    assert!(filtered.get("next").is_none());
    let old_held = json(&cli(
        &url,
        "LARGE",
        "l.queue",
        &[
            "queue",
            "list",
            "--limit",
            "0",
            "-o",
            "json",
            "--state",
            "held",
            "--older-than",
            "9990m",
            "--from",
            "@example.com",
        ],
    ));
    let got: Vec<&str> = old_held["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["queueId"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (9_990..10_000)
        .filter(|i| i % 7 == 0)
        .map(|i| format!("q{i:06}"))
        .collect();
    assert_eq!(got, want);

    // All of them, streamed: memory does not grow with the queue.
    let small = cli(
        &url,
        "SMALL",
        "s.queue",
        &["queue", "list", "--limit", "0", "-o", "json"],
    );
    let large = cli(
        &url,
        "LARGE",
        "l.queue",
        &["queue", "list", "--limit", "0", "-o", "json"],
    );
    assert_eq!(json(&small)["items"].as_array().unwrap().len(), 1_000);
    assert_eq!(json(&large)["items"].as_array().unwrap().len(), 10_000);
    eprintln!(
        "VmHWM: 1,000 entries {} KiB ({:?}), 10,000 entries {} KiB ({:?})",
        small.hwm_kib, small.took, large.hwm_kib, large.took
    );
    assert!(small.hwm_kib > 0 && large.hwm_kib > 0);
    assert!(
        large.hwm_kib <= small.hwm_kib + small.hwm_kib / 5 + 2048,
        "10x the entries took {} KiB instead of about {} KiB",
        large.hwm_kib,
        small.hwm_kib
    );
    // The table too.
    let table = cli(&url, "LARGE", "l.queue", &["queue", "list", "--limit", "3"]);
    assert!(table.success, "{}", table.stderr);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("QUEUE ID"), "{}", table.stdout);
    assert!(
        lines[1].starts_with("q000000") && lines[1].contains("held"),
        "{}",
        table.stdout
    );
    assert!(
        lines[4].starts_with("more entries: --after"),
        "{}",
        table.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_show_and_actions() {
    let nats = Nats::start();
    let url = nats.url();
    fill(&url, "Q", "q.queue", 30).await;
    let run = |args: &[&str]| cli(&url, "Q", "q.queue", args);

    let stats = json(&run(&["queue", "stats", "-o", "json"]));
    let b = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["destination"] == "b.test")
        .unwrap();
    // i % 3 == 1 below 30: 10 entries; deferred 10 and 25 (not held); held 7 and 28.
    assert_eq!(b["messages"], 10);
    assert_eq!(b["deferred"], 2);
    assert_eq!(b["held"], 2);
    assert_eq!(b["lastError"], "mx.b.test said: 421 4.7.0 slow down");

    let show = run(&[
        "queue",
        "show",
        "q000010",
        "--trace-url",
        "http://jaeger/trace/{trace_id}",
    ]);
    assert!(show.success, "{}", show.stderr);
    for needle in [
        "State:         deferred",
        "To:            user10@b.test",
        "Attempts:      1",
        "Trace:         http://jaeger/trace/0af7651916cd43dd8448eb211c80319c",
        "Planned attempts: unknown",
    ] {
        assert!(show.stdout.contains(needle), "{needle}:\n{}", show.stdout);
    }

    // Hold one, by id; a dry run of a release changes nothing.
    let hold = run(&["queue", "hold", "q000001", "--reason", "customer asked"]);
    assert!(
        hold.stdout.contains("1 matched, 1 changed"),
        "{}",
        hold.stdout
    );
    assert!(
        hold.stderr.contains("queue entry changed") && hold.stderr.contains("action=\"hold\"")
            || hold.stderr.contains("action=hold"),
        "the action is logged: {}",
        hold.stderr
    );
    let dry = run(&["queue", "release", "--state", "held", "--dry-run"]);
    assert!(
        dry.stdout.contains("6 matched, 6 would change"),
        "{}",
        dry.stdout
    );
    let held = json(&run(&["queue", "list", "-o", "json", "--state", "held"]));
    assert_eq!(held["items"].as_array().unwrap().len(), 6);

    // Deleting by filter only counts without --yes; with it, the entries are gone.
    let refused = run(&["queue", "delete", "--silent", "--to-domain", "a.test"]);
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("10 entries would be deleted"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        json(&run(&[
            "queue",
            "list",
            "-o",
            "json",
            "--to-domain",
            "a.test"
        ]))["items"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    let deleted = run(&[
        "queue",
        "delete",
        "--silent",
        "--to-domain",
        "a.test",
        "--yes",
    ]);
    assert!(
        deleted.stdout.contains("10 matched, 10 changed"),
        "{}",
        deleted.stdout
    );
    let left = json(&run(&["queue", "list", "-o", "json", "--limit", "0"]));
    assert_eq!(left["items"].as_array().unwrap().len(), 20);
    // Refuses to act on everything by accident.
    let everything = run(&["queue", "retry"]);
    assert!(!everything.success && everything.stderr.contains("--all"));
}
