//! Fault injection: every case holds the node to one rule,
//! **no accepted message lost, no `250` without a durable acknowledgement**. A message the
//! node answered `250` must be in the queue stream (or at its destination) after the fault;
//! a message that got a `4xx` or a dropped connection may be there or not (the client retries;
//! a duplicate is the accepted price, RFC 5321 §6.1 / RFC 1047).
//!
//! Durability runs use a 3-server JetStream cluster on loopback (`cluster {}` routes), the
//! node's stream with 3 replicas, and `sync_interval: always` on every server (fsync before
//! each acknowledgement).
//!
//! Not here: the operator killed during reconcile and during deletion; that needs the
//! operator's test harness and lives in `operator/tests/crash_reconcile.rs`.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kubemail_e2e::hostile::nats::{Nats, NatsOptions, read_stream};
use kubemail_e2e::hostile::node::{Node, enable_delivery};
use kubemail_e2e::hostile::peers::{Knot, Sink};
use kubemail_e2e::hostile::process::{free_port_on, wait_until};
use kubemail_e2e::hostile::report::Case;
use kubemail_e2e::hostile::smtp::{SmtpTcp, message, show, submit};
use kubemail_e2e::hostile::{runtime, scale, subject_tokens};
use serde_json::json;

/// What the clients were told, per message token.
#[derive(Debug, Default)]
struct Outcomes {
    accepted: BTreeSet<String>,
    refused: HashMap<String, String>,
    lost: BTreeSet<String>,
    /// (second since the load started, accepted?) per reply, for the timeline.
    timeline: Vec<(u64, bool)>,
}

impl Outcomes {
    fn record(&mut self, token: String, reply: Option<String>) {
        match reply {
            Some(r) if r.starts_with("250") => {
                self.accepted.insert(token);
            }
            Some(r) => {
                self.refused.insert(token, r.trim_end().to_owned());
            }
            None => {
                self.lost.insert(token);
            }
        }
    }

    fn merge(&mut self, other: Outcomes) {
        self.timeline.extend(other.timeline);
        self.accepted.extend(other.accepted);
        self.refused.extend(other.refused);
        self.lost.extend(other.lost);
    }

    /// Per second: how many 250 and how many refusals.
    fn timeline(&self) -> String {
        let mut secs: std::collections::BTreeMap<u64, (usize, usize)> = Default::default();
        for (t, ok) in &self.timeline {
            let e = secs.entry(*t).or_default();
            if *ok {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        secs.iter()
            .map(|(t, (ok, no))| format!("{t}s:{ok}/{no}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Reply codes seen for refused messages, with counts.
    fn refusal_codes(&self) -> String {
        let mut codes: HashMap<String, usize> = HashMap::new();
        for r in self.refused.values() {
            *codes.entry(r.chars().take(9).collect()).or_default() += 1;
        }
        format!("{codes:?}")
    }
}

/// One MX client sending messages tagged `prefix-<n>` until `stop` or `max` messages;
/// reconnects after a lost connection.
async fn mx_load(
    addr: SocketAddr,
    prefix: String,
    max: usize,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> Outcomes {
    let mut out = Outcomes::default();
    let mut n = 0;
    while n < max && !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = SmtpTcp::connect(addr, &prefix).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        c.verbose = false;
        if c.reply(Duration::from_secs(10)).await.is_none()
            || c.cmd("EHLO load.test", Duration::from_secs(10))
                .await
                .is_none()
        {
            continue;
        }
        while n < max && !stop.load(Ordering::Relaxed) {
            let token = format!("{prefix}-{n}");
            n += 1;
            let mail = c
                .cmd("MAIL FROM:<load@relay.invalid>", Duration::from_secs(10))
                .await;
            let rcpt = c
                .cmd("RCPT TO:<bob@example.test>", Duration::from_secs(10))
                .await;
            let data = c.cmd("DATA", Duration::from_secs(10)).await;
            if !data.as_deref().is_some_and(|r| r.starts_with("354")) {
                out.record(token, data.or(rcpt).or(mail));
                break;
            }
            let sent = c
                .send_quiet(message(&format!("{prefix}-{}", n - 1)).as_bytes())
                .await;
            let dot = c.send_quiet(b"\r\n.\r\n").await;
            let reply = if sent.is_ok() && dot.is_ok() {
                c.reply(Duration::from_secs(20)).await
            } else {
                None
            };
            let closed = reply.is_none();
            let ok = reply.as_deref().is_some_and(|r| r.starts_with("250"));
            out.timeline.push((t0.elapsed().as_secs(), ok));
            out.record(token, reply);
            if closed {
                break;
            }
            if !ok {
                // A refused client waits a little before retrying, as real ones do.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    out
}

/// Entries of `stream` read through the live servers, retried while the cluster settles.
fn stream_texts(nats: &mut Nats, stream: &str) -> Vec<String> {
    let rt = runtime();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let url = nats.live_url();
        match rt.block_on(read_stream(&url, stream)) {
            Ok(entries) => return entries.iter().map(|e| e.text()).collect(),
            Err(e) if Instant::now() < deadline => {
                println!("  (stream not readable yet: {e})");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("cannot read stream {stream}: {e}\n{}", nats.logs()),
        }
    }
}

/// Every 500 ms until `stop`: whether a fresh client gets the stream's info from any live
/// server within 1 s. Returns "second:ok/failed" buckets.
async fn stream_probe(
    urls: Vec<String>,
    stream: String,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> String {
    let mut buckets: std::collections::BTreeMap<u64, (u32, u32)> = Default::default();
    while !stop.load(Ordering::Relaxed) {
        let mut ok = false;
        for url in &urls {
            let attempt = async {
                let client = async_nats::connect(url.as_str()).await.ok()?;
                let js = async_nats::jetstream::new(client);
                let mut s = js.get_stream(&stream).await.ok()?;
                s.info().await.ok().map(|_| ())
            };
            if let Ok(Some(())) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
                ok = true;
                break;
            }
        }
        let e = buckets.entry(t0.elapsed().as_secs()).or_default();
        if ok {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    buckets
        .iter()
        .map(|(t, (ok, no))| format!("{t}s:{ok}/{no}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// DUR-02/06 with R3: nats-servers SIGKILLed and restarted while clients send.
#[test]
fn nats_servers_killed_and_restarted_under_load() {
    let case = Case::begin(
        "DUR-R3",
        "nats-server SIGKILLed and restarted under load (3-server cluster, R3 stream, sync_interval: always)",
        "every 250 is in the stream afterwards; while the queue cannot ack, clients get 451/452, never 250",
    );
    let mut nats = Nats::cluster3(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        c["nats"]["replicas"] = json!(3);
    });
    case.note(format!(
        "cluster {} (sync_interval: always on each), stream {} with 3 replicas; the node gets \
         n0's URL and learns n1/n2 from it (a URL list does not work, finding F2)",
        nats.url_list(),
        node.stream
    ));
    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let clients = scale(4, 8);
    // Bounded in count and in time: the clients stop when the fault schedule ends.
    let per_client = scale(3000, 50_000);
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            rt.spawn(mx_load(
                node.ports.mx,
                format!("R3C{i}"),
                per_client,
                stop.clone(),
                t0,
            ))
        })
        .collect();
    // An independent probe: can a fresh client read the stream's info (it needs the stream
    // leader)? Compared with the node's replies it tells "the cluster cannot ack" from "the
    // node does not try".
    let probe_urls: Vec<String> = nats.url_list().split(',').map(str::to_owned).collect();
    let probe_stream = node.stream.clone();
    let probe = rt.spawn(stream_probe(probe_urls, probe_stream, stop.clone(), t0));
    // The fault schedule: the node's seed server down alone (quorum kept: the cluster should
    // keep acknowledging), back, then two servers down (quorum lost: nothing may get 250),
    // back. Long runs repeat it with each server as the single victim.
    let cycles = scale(1, 3);
    for cycle in 0..cycles {
        let victim = cycle % nats.len();
        std::thread::sleep(Duration::from_secs(2));
        case.note(format!(
            "t={}s: SIGKILL nats-server n{victim} (2 of 3 left)",
            t0.elapsed().as_secs()
        ));
        nats.kill(victim);
        std::thread::sleep(Duration::from_secs(6));
        case.note(format!("t={}s: restart n{victim}", t0.elapsed().as_secs()));
        nats.restart(victim);
        std::thread::sleep(Duration::from_secs(6));
        let (a, b) = ((victim + 1) % 3, (victim + 2) % 3);
        case.note(format!(
            "t={}s: SIGKILL n{a} and n{b} (quorum lost)",
            t0.elapsed().as_secs()
        ));
        nats.kill(a);
        nats.kill(b);
        std::thread::sleep(Duration::from_secs(3));
        case.note(format!(
            "t={}s: restart n{a} and n{b}",
            t0.elapsed().as_secs()
        ));
        nats.restart(a);
        nats.restart(b);
    }
    // Time to recover: keep the load on after the last restart.
    std::thread::sleep(Duration::from_secs(scale(10, 15)));
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Outcomes::default();
    for h in handles {
        outcomes.merge(rt.block_on(h).expect("load task"));
    }
    let probe = rt.block_on(probe).expect("probe task");
    case.note(format!(
        "node timeline (second:250s/refusals): {}",
        outcomes.timeline()
    ));
    case.note(format!("stream-info probe (second:ok/failed): {probe}"));
    let log = node.log();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("NATS") || l.contains("stream") || l.contains("JetStream"))
        .filter(|l| !l.contains("queueing failed"))
        .take(40)
        .collect();
    for e in &events {
        case.note(format!("node: {}", e.get(..e.len().min(220)).unwrap_or(e)));
    }
    nats.wait_jetstream(Duration::from_secs(30));
    let texts = stream_texts(&mut nats, &node.stream);
    let stored = subject_tokens(texts.iter().map(String::as_str), "R3C");
    let stored_set: BTreeSet<&String> = stored.iter().collect();
    let missing: Vec<&String> = outcomes
        .accepted
        .iter()
        .filter(|t| !stored_set.contains(t))
        .collect();
    let duplicates = stored.len() - stored_set.len();
    let refused_stored = outcomes
        .refused
        .keys()
        .chain(outcomes.lost.iter())
        .filter(|t| stored_set.contains(t))
        .count();
    case.note(format!(
        "sent {} messages: {} got 250, {} refused ({}), {} connections lost before a reply",
        outcomes.accepted.len() + outcomes.refused.len() + outcomes.lost.len(),
        outcomes.accepted.len(),
        outcomes.refused.len(),
        outcomes.refusal_codes(),
        outcomes.lost.len()
    ));
    case.note(format!(
        "stream holds {} entries of this run ({duplicates} duplicates; {refused_stored} of the refused/lost ones stored anyway, allowed)",
        stored.len()
    ));
    assert!(
        missing.is_empty(),
        "LOST {} messages that got 250: {:?}",
        missing.len(),
        missing.iter().take(20).collect::<Vec<_>>()
    );
    assert!(
        !outcomes.accepted.is_empty(),
        "no message was accepted at all: the case measured nothing"
    );
    assert!(
        outcomes
            .refused
            .values()
            .all(|r| r.starts_with("451") || r.starts_with("452") || r.starts_with("421")),
        "unexpected refusals: {:?}",
        outcomes.refused
    );
    case.pass(format!(
        "{} accepted, all {} in the R3 stream after {} kill/restart rounds",
        outcomes.accepted.len(),
        outcomes.accepted.len(),
        cycles
    ));
}

/// DUR-07 / SYN-20 and DUR-06: the node SIGKILLed in the middle of DATA, and right after
/// the final dot.
#[test]
fn node_sigkilled_mid_data() {
    let case = Case::begin(
        "DUR-07",
        "smtp-node SIGKILLed mid-DATA, then right after the final dot",
        "mid-DATA: nothing (no partial message) in the stream, the retry gets 250 and is stored once; after the dot: a 250 is always stored",
    );
    let nats = Nats::single(NatsOptions::default());
    let mut node = Node::start(&nats.url(), |_, _| {});
    let rt = runtime();
    let url = nats.url();
    let count = |node: &Node, token: &str| {
        rt.block_on(node.entries(&url))
            .iter()
            .filter(|e| e.text().contains(&format!("Subject: {token}\r\n")))
            .count()
    };

    // 1. Killed mid-DATA.
    let token = "MIDDATA-1";
    let full = message(token);
    let (head, _) = full.split_at(full.len() / 2);
    let mut c = rt
        .block_on(SmtpTcp::connect(node.ports.mx, "mid-data"))
        .expect("connect");
    rt.block_on(async {
        c.greeting("220").await;
        c.expect("EHLO client.test", "250").await;
        c.expect("MAIL FROM:<a@relay.invalid>", "250").await;
        c.expect("RCPT TO:<bob@example.test>", "250").await;
        c.expect("DATA", "354").await;
        c.send(head.as_bytes()).await.expect("send half");
    });
    std::thread::sleep(Duration::from_millis(300));
    case.note(format!(
        "SIGKILL smtp-node (pid {}) with half a message received",
        node.pid()
    ));
    node.kill();
    let closed = rt.block_on(c.closed(Duration::from_secs(5)));
    assert!(closed, "the connection survived the node");
    node.restart();
    let after_kill = count(&node, token);
    case.note(format!(
        "stream entries with {token} after the kill: {after_kill}"
    ));
    assert_eq!(after_kill, 0, "a partial message was queued");
    let reply = rt.block_on(async {
        let mut c = SmtpTcp::connect(node.ports.mx, "retry")
            .await
            .expect("connect");
        c.greeting("220").await;
        c.expect("EHLO client.test", "250").await;
        c.send_mail("a@relay.invalid", "bob@example.test", &full)
            .await
    });
    assert!(
        reply.as_deref().is_some_and(|r| r.starts_with("250")),
        "retry not accepted: {reply:?}"
    );
    assert_eq!(
        count(&node, token),
        1,
        "the retried message is not stored exactly once"
    );

    // 2. Killed right after the final dot: whatever the client saw, a 250 means stored.
    let mut stored_after_250 = 0;
    let rounds = scale(3, 20);
    for i in 0..rounds {
        let token = format!("AFTERDOT-{i}");
        let mut c = rt
            .block_on(SmtpTcp::connect(node.ports.mx, "after-dot"))
            .expect("connect");
        rt.block_on(async {
            c.greeting("220").await;
            c.expect("EHLO client.test", "250").await;
            c.expect("MAIL FROM:<a@relay.invalid>", "250").await;
            c.expect("RCPT TO:<bob@example.test>", "250").await;
            c.expect("DATA", "354").await;
            c.send(message(&token).as_bytes()).await.expect("send");
            c.send(b"\r\n.\r\n").await.expect("dot");
        });
        // Vary the moment: from "before the node read the dot" to "after it answered".
        std::thread::sleep(Duration::from_millis(u64::try_from(i).unwrap_or(0) * 7));
        node.kill();
        let reply = rt.block_on(c.reply(Duration::from_secs(3)));
        node.restart();
        let n = count(&node, &token);
        case.note(format!(
            "{token}: client got {:?}, stream has {n}",
            reply.as_deref().map(str::trim_end)
        ));
        if reply.as_deref().is_some_and(|r| r.starts_with("250")) {
            assert_eq!(n, 1, "{token} got 250 but is not in the stream");
            stored_after_250 += 1;
        }
    }
    case.pass(format!(
        "mid-DATA kill queued nothing, retry stored once; {stored_after_250}/{rounds} kills after the dot had answered 250 and those are stored"
    ));
}

/// Zones where `<name>.test` has its MX at `ip`.
fn mx_zone(name: &str, ip: &str) -> (String, String) {
    (
        format!("{name}.test"),
        format!("@ IN MX 10 mx\nmx IN A {ip}\n"),
    )
}

fn knot_for(zones: &[(String, String)]) -> Knot {
    let z: Vec<(&str, String)> = zones.iter().map(|(o, r)| (o.as_str(), r.clone())).collect();
    Knot::start(&z)
}

/// DUR-08: the node SIGKILLed while it delivers (remote stalls its reply to the final dot).
#[test]
fn node_sigkilled_mid_delivery() {
    let case = Case::begin(
        "DUR-08",
        "smtp-node SIGKILLed mid-delivery (remote MX holds its reply to the final dot)",
        "after a restart the message is redelivered (ack wait) and delivered; never lost (a duplicate is allowed)",
    );
    let ip: IpAddr = [127, 0, 0, 31].into();
    let port = free_port_on(&[ip]);
    let knot = knot_for(&[mx_zone("remote", "127.0.0.31")]);
    let mut sink = Sink::start(ip, port, &["-W", ".:20"]);
    let nats = Nats::single(NatsOptions::default());
    let mut node = Node::start(&nats.url(), |c, _| {
        enable_delivery(c, &knot.addr(), port, true);
        c["delivery"]["timeouts"]["dataTermination"] = json!("30s");
    });
    let rt = runtime();
    let token = "MIDDELIVERY-1";
    let reply = rt.block_on(submit(
        node.ports.implicit_tls,
        "carol@remote.test",
        &message(token),
        "submit",
    ));
    assert!(
        reply.as_deref().is_some_and(|r| r.starts_with("250")),
        "{reply:?}"
    );
    // Delivery starts at once; the remote then sits on the final dot for 20 s. Kill the
    // node only once its connection to the remote is established (ss shows it).
    let filter = format!("dst {ip}:{port}");
    wait_until(
        Duration::from_secs(20),
        "the node's delivery connection",
        || {
            let out = Command::new("ss")
                .args(["-Htn", "state", "established"])
                .args(filter.split(' '))
                .output()
                .ok()?;
            (!out.stdout.is_empty()).then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    case.note(format!(
        "delivery connection to {ip}:{port} established (remote holds the dot reply)"
    ));
    case.note(format!(
        "SIGKILL smtp-node (pid {}) while the remote holds the dot",
        node.pid()
    ));
    node.kill();
    sink.restart(&[]);
    case.note("remote MX restarted without delay; node restarted");
    node.restart();
    // The restarted process counts only its own deliveries: this one is the redelivery.
    // (smtp-sink already holds a dump of the interrupted attempt, written at its dot.)
    wait_until(
        Duration::from_secs(40),
        "redelivery after the crash",
        || (node.delivered() >= 1.0).then_some(()),
    );
    let delivered = sink.count(&format!("Subject: {token}"));
    assert!(delivered >= 1, "the remote has no copy of {token}");
    case.note(format!("remote MX got {token} {delivered} time(s)"));
    case.pass(format!(
        "delivered {delivered}x after the crash (at-least-once)"
    ));
}

/// TMO-06: the remote MX drops the connection after the final dot, without a reply.
#[test]
fn remote_drops_connection_after_final_dot() {
    let case = Case::begin(
        "TMO-06",
        "remote MX disconnects after the final dot without replying (smtp-sink -q .)",
        "deferred (not bounced), retried, delivered once the remote behaves; no DSN",
    );
    let ip: IpAddr = [127, 0, 0, 32].into();
    let port = free_port_on(&[ip]);
    let knot = knot_for(&[mx_zone("remote", "127.0.0.32")]);
    let mut sink = Sink::start(ip, port, &["-q", "."]);
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        enable_delivery(c, &knot.addr(), port, true)
    });
    let rt = runtime();
    let token = "DROPDOT-1";
    let reply = rt.block_on(submit(
        node.ports.implicit_tls,
        "carol@remote.test",
        &message(token),
        "submit",
    ));
    assert!(
        reply.as_deref().is_some_and(|r| r.starts_with("250")),
        "{reply:?}"
    );
    let deferred = wait_until(Duration::from_secs(30), "a deferred attempt", || {
        let d = node.counter_with(
            "kubemail_smtp_delivery_recipients_total",
            "result=\"deferred\"",
        );
        (d >= 1.0).then_some(d)
    });
    case.note(format!(
        "node deferred after the dropped dot ({deferred} deferral(s) so far)"
    ));
    sink.restart(&[]);
    // Judged by the node: smtp-sink keeps a dump of the dropped attempt too.
    wait_until(
        Duration::from_secs(40),
        "delivery after the remote recovered",
        || (node.delivered() >= 1.0).then_some(()),
    );
    let delivered = sink.count(&format!("Subject: {token}"));
    assert!(delivered >= 1, "the remote has no copy of {token}");
    let dsns = node.counter("kubemail_smtp_delivery_dsns_total");
    let bounced = node.counter_with(
        "kubemail_smtp_delivery_recipients_total",
        "result=\"bounced\"",
    );
    case.note(format!(
        "remote got {token} {delivered}x; DSNs {dsns}, bounced {bounced}"
    ));
    assert_eq!(
        bounced, 0.0,
        "a dropped connection after the dot bounced the message"
    );
    assert_eq!(dsns, 0.0, "a DSN was generated");
    case.pass(format!(
        "deferred, then delivered ({delivered}x); no bounce"
    ));
}

/// TMO-05: a remote that is slow past every client timeout, one remote per SMTP phase.
#[test]
fn remote_slow_past_every_timeout() {
    let case = Case::begin(
        "TMO-05",
        "remote MX slower than the client timeout at each phase (greeting, EHLO, MAIL, RCPT, DATA, final dot)",
        "each attempt times out and is deferred (never bounced); all six are delivered once the remotes are fast",
    );
    let phases = ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "."];
    let ips: Vec<IpAddr> = (0..phases.len())
        .map(|i| IpAddr::from([127, 0, 0, 40 + u8::try_from(i).unwrap_or(0)]))
        .collect();
    let port = free_port_on(&ips);
    let zones: Vec<(String, String)> = (0..phases.len())
        .map(|i| mx_zone(&format!("slow{i}"), &ips[i].to_string()))
        .collect();
    let knot = knot_for(&zones);
    let mut sinks: Vec<Sink> = phases
        .iter()
        .zip(&ips)
        .map(|(phase, ip)| Sink::start(*ip, port, &["-W", &format!("{phase}:30")]))
        .collect();
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        enable_delivery(c, &knot.addr(), port, true)
    });
    let rt = runtime();
    for (i, phase) in phases.iter().enumerate() {
        let token = format!("SLOW-{i}");
        let reply = rt.block_on(submit(
            node.ports.implicit_tls,
            &format!("carol@slow{i}.test"),
            &message(&token),
            &format!("submit-{phase}"),
        ));
        assert!(
            reply.as_deref().is_some_and(|r| r.starts_with("250")),
            "{reply:?}"
        );
    }
    let deferred = wait_until(
        Duration::from_secs(40),
        "every slow remote to time out",
        || {
            let d = node.counter_with(
                "kubemail_smtp_delivery_recipients_total",
                "result=\"deferred\"",
            );
            (d >= phases.len() as f64).then_some(d)
        },
    );
    case.note(format!(
        "{deferred} deferrals after the 2 s client timeouts (6 remotes stalled for 30 s each)"
    ));
    for sink in &mut sinks {
        sink.restart(&[]);
    }
    case.note("remotes restarted without delays");
    for (i, sink) in sinks.iter().enumerate() {
        let token = format!("SLOW-{i}");
        let n = wait_until(
            Duration::from_secs(60),
            &format!("{token} delivered"),
            || {
                let n = sink.count(&format!("Subject: {token}"));
                (n > 0).then_some(n)
            },
        );
        case.note(format!(
            "stalled at {}: delivered {n}x after recovery",
            phases[i]
        ));
    }
    let bounced = node.counter_with(
        "kubemail_smtp_delivery_recipients_total",
        "result=\"bounced\"",
    );
    assert_eq!(bounced, 0.0, "a slow remote made the node bounce");
    case.pass("six stalls deferred, all six delivered later, nothing bounced");
}

/// Mounts a tmpfs of `size` at a new directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {} (the disk-full case needs root / CAP_SYS_ADMIN)",
            dir.path().display()
        );
        Self { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the queue with 64 KiB messages until the node refuses five in a row; returns the
/// outcomes.
fn fill_queue(case: &Case, node: &Node, prefix: &str, max: usize) -> Outcomes {
    let rt = runtime();
    let filler = "x".repeat(998);
    let body: String = (0..64).map(|_| format!("{filler}\r\n")).collect();
    rt.block_on(async {
        let mut out = Outcomes::default();
        let mut c = SmtpTcp::connect(node.ports.mx, prefix)
            .await
            .expect("connect");
        c.verbose = false;
        c.reply(Duration::from_secs(10)).await;
        c.cmd("EHLO fill.test", Duration::from_secs(10)).await;
        let mut refused_in_row = 0;
        for i in 0..max {
            let token = format!("{prefix}-{i}");
            c.cmd("MAIL FROM:<a@relay.invalid>", Duration::from_secs(10))
                .await;
            c.cmd("RCPT TO:<bob@example.test>", Duration::from_secs(10))
                .await;
            let data = c.cmd("DATA", Duration::from_secs(10)).await;
            if !data.as_deref().is_some_and(|r| r.starts_with("354")) {
                case.note(format!("{token}: DATA got {data:?}"));
                out.record(token, data);
                break;
            }
            let text = format!("{}{body}", message(&token));
            let _ = c.send_quiet(text.as_bytes()).await;
            let _ = c.send_quiet(b"\r\n.\r\n").await;
            let reply = c.reply(Duration::from_secs(20)).await;
            if !reply.as_deref().is_some_and(|r| r.starts_with("250")) {
                refused_in_row += 1;
                case.note(format!(
                    "{token}: sent {} bytes, got {:?}",
                    text.len(),
                    reply.as_deref().map(|r| show(r.trim_end().as_bytes()))
                ));
            } else {
                refused_in_row = 0;
            }
            let closed = reply.is_none();
            out.record(token, reply);
            if refused_in_row >= 5 || closed {
                break;
            }
        }
        out
    })
}

fn check_fill(case: &Case, nats: &mut Nats, node: &Node, prefix: &str, outcomes: &Outcomes) {
    case.note(format!(
        "{} accepted, {} refused ({}), {} lost connections",
        outcomes.accepted.len(),
        outcomes.refused.len(),
        outcomes.refusal_codes(),
        outcomes.lost.len()
    ));
    assert!(
        !outcomes.refused.is_empty(),
        "the store never filled up: the case measured nothing"
    );
    assert!(
        outcomes
            .refused
            .values()
            .all(|r| r.starts_with("452") || r.starts_with("451")),
        "a full store must give 452 4.3.1 or 451 4.3.0: {:?}",
        outcomes.refused
    );
    let texts = stream_texts(nats, &node.stream);
    let stored: BTreeSet<String> = subject_tokens(texts.iter().map(String::as_str), prefix)
        .into_iter()
        .collect();
    let missing: Vec<&String> = outcomes.accepted.difference(&stored).collect();
    case.note(format!("stream holds {} of them", stored.len()));
    assert!(
        missing.is_empty(),
        "LOST messages that got 250: {missing:?}"
    );
}

/// DUR-05 / SIZE-03: the NATS store's disk is full (a 6 MiB tmpfs).
#[test]
fn nats_store_disk_full() {
    let case = Case::begin(
        "DUR-05a",
        "the NATS store's file system is full (6 MiB tmpfs under store_dir)",
        "452 4.3.1 (or 451 4.3.0), never 250 for a message that is not stored",
    );
    let disk = Tmpfs::mount("6m");
    let mut nats = Nats::single(NatsOptions {
        store_dirs: vec![disk.dir.path().to_owned()],
        ..NatsOptions::default()
    });
    let node = Node::start(&nats.url(), |_, _| {});
    let outcomes = fill_queue(&case, &node, "DISKFULL", scale(300, 1000));
    // JetStream may have switched itself off on a write error: bring it back to read.
    nats.restart(0);
    nats.wait_jetstream(Duration::from_secs(30));
    check_fill(&case, &mut nats, &node, "DISKFULL", &outcomes);
    case.pass("refused with 4xx when the disk filled; every 250 is stored");
}

/// DUR-05 / JS-CFG-02: the server's JetStream file store limit (`max_file_store`) reached.
#[test]
fn nats_store_limit_reached() {
    let case = Case::begin(
        "DUR-05b",
        "JetStream max_file_store (4MB) reached",
        "452 4.3.1 (or 451 4.3.0), never 250 for a message that is not stored",
    );
    let mut nats = Nats::single(NatsOptions {
        max_file_store: Some("4MB".to_owned()),
        ..NatsOptions::default()
    });
    let node = Node::start(&nats.url(), |_, _| {});
    let outcomes = fill_queue(&case, &node, "STORELIMIT", scale(300, 1000));
    check_fill(&case, &mut nats, &node, "STORELIMIT", &outcomes);
    case.pass("refused with 4xx at the store limit; every 250 is stored");
}

/// Was finding F2 (fixed): `nats.url` is documented as "Server URL(s), comma separated", but
/// the node handed the string to `async_nats::connect(&str)`, which parses exactly one URL:
/// with `nats://a:4222,nats://b:4222` the node never connected ("failed to parse server or
/// server list: NATS server URL is invalid: invalid port number"), so a config listing the
/// three servers of an R3 cluster gave a node that could not queue anything. The node now
/// splits the list and connects with every address.
#[test]
fn node_accepts_the_documented_comma_separated_nats_url() {
    let case = Case::begin(
        "NATS-URLS",
        "node configured with the three cluster URLs, comma separated (as config.rs documents)",
        "the node connects and becomes ready",
    );
    let mut nats = Nats::cluster3(NatsOptions::default());
    let list = nats.url_list();
    case.note(format!("sent: nats.url = {list:?}"));
    let mut node = Node::start_with(&list, false, |c, _| {
        c["nats"]["replicas"] = json!(3);
    });
    let ready = wait_ready_within(&mut node, Duration::from_secs(15));
    let log = node.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .take(3)
        .collect();
    case.note(format!("got: ready={ready}; log: {errors:?}"));
    nats.wait_jetstream(Duration::from_secs(5));
    assert!(
        ready,
        "node with a comma-separated nats.url never became ready"
    );
    case.pass("ready with the URL list");
}

fn wait_ready_within(node: &mut Node, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if kubemail_e2e::hostile::node::http_get(node.ports.admin, "/readyz")
            .starts_with("HTTP/1.1 200")
        {
            return true;
        }
        if !node.running() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// One client of the atomicity case: a transaction for two local domains (two queue entries),
/// its ~20 KiB body above the node's inline limit (so it goes through the object store).
async fn two_domain_transaction(mx: SocketAddr, token: &str) -> Option<String> {
    let mut c = SmtpTcp::connect(mx, token).await.ok()?;
    c.verbose = false;
    c.reply(Duration::from_secs(10)).await?;
    c.cmd("EHLO atom.test", Duration::from_secs(10)).await?;
    c.cmd("MAIL FROM:<atom@relay.invalid>", Duration::from_secs(10))
        .await?;
    c.cmd("RCPT TO:<bob@example.test>", Duration::from_secs(10))
        .await?;
    c.cmd("RCPT TO:<carol@other.test>", Duration::from_secs(10))
        .await?;
    let data = c.cmd("DATA", Duration::from_secs(10)).await?;
    if !data.starts_with("354") {
        return Some(data);
    }
    c.send_quiet(atom_message(token).as_bytes()).await.ok()?;
    c.send_quiet(b".\r\n").await.ok()?;
    c.reply(Duration::from_secs(30)).await
}

fn atom_message(token: &str) -> String {
    let mut m = message(token);
    for i in 0..200 {
        m.push_str(&format!("{token} line {i:04} {}\r\n", "a".repeat(80)));
    }
    m
}

/// Hostile finding 8: the entries of one message are published as one unit, a client's retry
/// of a transaction the stream had stored anyway is not queued twice, and no body object is
/// left that no entry refers to. nats-server is SIGKILLed mid-transaction while clients send
/// two-domain transactions with large bodies; every client sends each message that did not
/// get a 250 again, the same octets, once the server is back.
#[test]
fn enqueue_atomicity_with_nats_killed_mid_transaction() {
    use kubemail_smtp_node::config::NatsConfig;
    let case = Case::begin(
        "ATOM-08",
        "nats-server SIGKILLed while 12 clients send two-domain transactions (bodies in the object store); refused ones are retried",
        "every message is in the stream exactly once per domain (never half, never twice); after a sweep no body object lacks its entry, and every entry's body is there",
    );
    let mut nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        c["domains"].as_array_mut().expect("domains").push(json!({
            "name": "other.test",
            "recipients": ["carol"],
            // RCPT refuses a domain without an inbound target; nothing is delivered here.
            "inbound": { "host": "127.0.0.1", "port": 9, "protocol": "smtp" },
        }));
        c["nats"]["inlineBodyLimit"] = json!("8Ki");
        c["nats"]["publishTimeout"] = json!("2s");
    });
    let rt = runtime();
    let mx = node.ports.mx;
    let stop = Arc::new(AtomicBool::new(false));
    let retry = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..12)
        .map(|k| {
            let (stop, retry) = (stop.clone(), retry.clone());
            rt.spawn(async move {
                let mut sent: Vec<(String, Vec<String>)> = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < scale(40, 400) {
                    let token = format!("ATOM-{k}-{n}");
                    n += 1;
                    let reply = two_domain_transaction(mx, &token)
                        .await
                        .unwrap_or_else(|| "lost".to_owned());
                    sent.push((token, vec![reply]));
                }
                while !retry.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let deadline = Instant::now() + Duration::from_secs(90);
                for (token, replies) in &mut sent {
                    while !replies.last().is_some_and(|r| r.starts_with("250"))
                        && Instant::now() < deadline
                    {
                        let reply = two_domain_transaction(mx, token)
                            .await
                            .unwrap_or_else(|| "lost".to_owned());
                        if !reply.starts_with("250") {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        replies.push(reply);
                    }
                }
                sent
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    case.note("SIGKILL nats-server mid-load");
    nats.kill(0);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    nats.restart(0);
    nats.wait_jetstream(Duration::from_secs(30));
    case.note("nats-server restarted; clients retry what was refused");
    retry.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for c in clients {
        sent.extend(rt.block_on(c).expect("client task"));
    }
    let refused = sent.iter().filter(|(_, r)| r.len() > 1).count();
    case.note(format!(
        "{} transactions, {refused} refused or lost at first and sent again",
        sent.len()
    ));
    assert!(
        refused > 0,
        "the kill refused nothing: not a test of anything"
    );
    for (token, replies) in &sent {
        assert!(
            replies.last().is_some_and(|r| r.starts_with("250")),
            "{token} never accepted: {replies:?}"
        );
    }

    // The orphans a failed publish left: what the node's sweeper removes after its grace
    // period, swept here at once.
    let url = nats.url();
    let nats_config = NatsConfig {
        url: url.clone(),
        stream: node.stream.clone(),
        subject_prefix: node.subject_prefix.clone(),
        body_bucket: node.bucket.clone(),
        ..NatsConfig::default()
    };
    let (swept, objects, entries) = rt.block_on(async {
        use futures::StreamExt as _;
        use tokio::io::AsyncReadExt as _;
        let client = async_nats::connect(&url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        // One body bucket per domain: sweep and list each.
        let mut swept = 0;
        let mut names = BTreeSet::new();
        let mut stores = HashMap::new();
        for domain in ["example.test", "other.test"] {
            let bucket = kubemail_queue::body_bucket(&node.bucket, domain);
            let store = js.get_object_store(&bucket).await.expect("bucket");
            swept += kubemail_smtp_node::queue::sweeper::sweep(
                &js,
                &nats_config,
                domain,
                &store,
                Duration::ZERO,
            )
            .await
            .expect("sweep");
            let mut list = store.list().await.expect("list");
            while let Some(info) = list.next().await {
                let info = info.expect("object info");
                if !info.deleted {
                    names.insert(format!("{bucket}/{}", info.name));
                }
            }
            stores.insert(bucket, store);
        }
        let entries = node.entries(&url).await;
        let mut bodies = Vec::new();
        for e in &entries {
            let reference = e.headers.get("Kubemail-Body-Ref").cloned();
            let body = match reference
                .as_deref()
                .and_then(kubemail_queue::split_body_ref)
            {
                Some((bucket, name)) => {
                    let store = stores.get(bucket).expect("the entry's domain bucket");
                    let mut object = store.get(name).await.expect("an entry's body object");
                    // The payload (empty, or a header section), then the object.
                    let mut body = e.payload.clone();
                    object.read_to_end(&mut body).await.expect("read body");
                    body
                }
                None => e.payload.clone(),
            };
            bodies.push((e.headers.clone(), reference, body));
        }
        (swept, names, bodies)
    });
    let mut per_token: HashMap<String, Vec<String>> = HashMap::new();
    let mut referenced = BTreeSet::new();
    for (headers, reference, body) in &entries {
        let text = String::from_utf8_lossy(body);
        let token = text
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .expect("subject")
            .to_owned();
        assert!(
            text.ends_with(&atom_message(&token)),
            "{token}: the stored body is the message"
        );
        per_token
            .entry(token)
            .or_default()
            .push(headers.get("Kubemail-Domain").cloned().unwrap_or_default());
        // As `<bucket>/<object>`, the form of the names listed above.
        if let Some((bucket, object)) = reference
            .as_deref()
            .and_then(kubemail_queue::split_body_ref)
        {
            referenced.insert(kubemail_queue::body_ref(bucket, object));
        }
    }
    for (token, _) in &sent {
        let mut domains = per_token.get(token).cloned().unwrap_or_default();
        domains.sort();
        assert_eq!(
            domains,
            ["example.test", "other.test"],
            "{token}: one entry per domain, never half a transaction, never a duplicate"
        );
    }
    let unreferenced: Vec<&String> = objects.difference(&referenced).collect();
    case.note(format!(
        "{} entries; {} body objects, {swept} orphans removed by the sweep",
        entries.len(),
        objects.len()
    ));
    assert!(
        unreferenced.is_empty(),
        "body objects no entry refers to after the sweep: {unreferenced:?}"
    );
    case.pass(format!(
        "{} transactions stored exactly once per domain; {swept} orphaned bodies swept; none left",
        sent.len()
    ));
}
