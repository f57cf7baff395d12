//! Abuse resistance (catalogue §5, AUTH-05/06, MX-06, LOOP-01): a connection flood from one
//! address, AUTH brute force across reconnects, slowloris clients, a 1 GiB DATA stream, MX
//! records pointing at loopback, and a mail loop. Against the real `smtp-node` binary; every
//! loop bounded in count and time; all traffic on 127.0.0.0/8.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kubemail_e2e::hostile::nats::{Nats, NatsOptions};
use kubemail_e2e::hostile::node::{Node, PASSWORD, USER, enable_delivery};
use kubemail_e2e::hostile::peers::{Knot, Silent};
use kubemail_e2e::hostile::process::{RssSampler, free_port_on, raise_fd_limit, wait_until};
use kubemail_e2e::hostile::report::Case;
use kubemail_e2e::hostile::smtp::{SmtpTcp, SmtpTls, auth_plain, message, submit};
use kubemail_e2e::hostile::{runtime, scale};
use serde_json::json;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// DOS-01/04: 10,000 connections from one address.
#[test]
fn connection_flood_from_one_address() {
    let case = Case::begin(
        "DOS-01",
        "10,000 connections from 127.0.0.1 while 20 idle ones hold its per-IP slots",
        "every flood connection gets 421 4.7.0 (or is closed); a client from 127.0.0.2 is still served (220 ... 250)",
    );
    let limit = raise_fd_limit();
    case.note(format!("open-file limit of the test process: {limit}"));
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        c["maxConnections"] = json!(1000);
        c["maxConnectionsPerIp"] = json!(20);
        c["timeouts"] = json!({ "greeting": "60s" });
    });
    let rt = runtime();
    let total = 10_000usize;
    let mx = node.ports.mx;
    let rss_before = node.rss_kib();
    let sampler = RssSampler::start(node.pid());
    let (held, counts, other, elapsed) = rt.block_on(async move {
        // Fill the per-IP slots of 127.0.0.1 with idle sessions.
        let mut held = Vec::new();
        for i in 0..20 {
            let mut c = SmtpTcp::connect_from(ip(1), mx, &format!("held-{i}"))
                .await
                .expect("connect");
            c.verbose = i == 0;
            c.greeting("220").await;
            held.push(c);
        }
        let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
        let started = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(256));
        let mut tasks = Vec::with_capacity(total);
        for i in 0..total {
            let permit = sem.clone().acquire_owned().await.expect("semaphore");
            let counts = counts.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let slot = match SmtpTcp::connect_from(ip(1), mx, "flood").await {
                    Ok(mut c) => {
                        c.verbose = i == 0;
                        match c.reply(Duration::from_secs(10)).await {
                            Some(r) if r.starts_with("421") => 0,
                            Some(r) if r.starts_with("220") => 1,
                            _ => 2,
                        }
                    }
                    Err(_) => 3,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
            }));
            // While the flood runs, somebody else connects from another address.
        }
        let other = {
            let t = Instant::now();
            let mut c = SmtpTcp::connect_from(ip(2), mx, "other-client")
                .await
                .expect("connect from 127.0.0.2");
            let greeting = c.reply(Duration::from_secs(10)).await;
            let waited = t.elapsed();
            let _ = c.cmd("EHLO other.test", Duration::from_secs(10)).await;
            let reply = c
                .send_mail(
                    "a@relay.invalid",
                    "bob@example.test",
                    &message("FLOOD-OTHER"),
                )
                .await;
            (greeting, waited, reply)
        };
        for t in tasks {
            let _ = t.await;
        }
        (held, counts, other, started.elapsed())
    });
    let rss_max = sampler.finish();
    let [refused, greeted, closed, failed] =
        [0, 1, 2, 3].map(|i| counts[i].load(Ordering::Relaxed));
    case.note(format!(
        "sent {total} connections from 127.0.0.1 in {:.1}s: {refused} got 421, {greeted} got 220, {closed} closed/timed out without a reply, {failed} could not connect",
        elapsed.as_secs_f64()
    ));
    case.note(format!(
        "127.0.0.2 during the flood: greeting {:?} after {:?}, message {:?}",
        other.0.as_deref().map(str::trim_end),
        other.1,
        other.2.as_deref().map(str::trim_end)
    ));
    case.note(format!(
        "node RSS {rss_before} KiB before, {rss_max} KiB at most during the flood"
    ));
    drop(held);
    assert_eq!(greeted, 0, "the per-IP cap let flood connections in");
    assert!(
        refused + closed + failed == total && refused >= total * 9 / 10,
        "expected 421 for (nearly) every flood connection"
    );
    assert!(
        other.0.as_deref().is_some_and(|g| g.starts_with("220")),
        "127.0.0.2 was not greeted"
    );
    assert!(
        other.2.as_deref().is_some_and(|r| r.starts_with("250")),
        "127.0.0.2 could not send"
    );
    case.pass(format!(
        "{refused}/{total} refused with 421; another address served in {:?}",
        other.1
    ));
}

/// One AUTH PLAIN attempt over implicit TLS from `source`; the replies to AUTH (all of them,
/// when `tries` > 1 in one session) and whether the server closed the session.
async fn auth_session(
    addr: SocketAddr,
    source: IpAddr,
    label: &str,
    passwords: &[&str],
) -> Vec<Option<String>> {
    auth_session_as(addr, source, label, USER, passwords).await
}

/// As [`auth_session`], logging in as `user`.
async fn auth_session_as(
    addr: SocketAddr,
    source: IpAddr,
    label: &str,
    user: &str,
    passwords: &[&str],
) -> Vec<Option<String>> {
    let mut c = SmtpTls::connect_tls(source, addr, label)
        .await
        .expect("TLS");
    c.greeting("220").await;
    c.expect("EHLO brute.test", "250").await;
    let mut replies = Vec::new();
    for p in passwords {
        let r = c
            .cmd(
                &format!("AUTH PLAIN {}", auth_plain(user, p)),
                Duration::from_secs(30),
            )
            .await;
        let stop = r.as_deref().is_none_or(|r| r.starts_with("421"));
        replies.push(r);
        if stop {
            break;
        }
    }
    replies
}

fn codes(replies: &[Option<String>]) -> Vec<String> {
    replies
        .iter()
        .map(|r| match r {
            Some(r) => r.chars().take(9).collect(),
            None => "closed".to_owned(),
        })
        .collect()
}

/// AUTH-05/06: brute force within a session, across reconnects, and the lockout's scope.
#[test]
fn auth_brute_force_rate_limit_and_lockout() {
    let case = Case::begin(
        "AUTH-06",
        "AUTH brute force on 465: wrong passwords in one session, then across reconnects from 127.0.0.3",
        "535 5.7.8 per wrong password; 421 4.7.0 after maxFailuresPerSession (3) in a session; 454 4.7.0 for every AUTH from that IP (even the right password) once more than failuresPerIpPerMinute (5) failed; other IPs unaffected",
    );
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        c["auth"] = json!({ "maxFailuresPerSession": 3, "failuresPerIpPerMinute": 5 });
    });
    let rt = runtime();
    let addr = node.ports.implicit_tls;
    let attacker = ip(3);
    let s1 = rt.block_on(auth_session(
        addr,
        attacker,
        "brute-1",
        &["guess1", "guess2", "guess3", "guess4"],
    ));
    case.note(format!("session 1 (4 wrong passwords): {:?}", codes(&s1)));
    let s2 = rt.block_on(auth_session(
        addr,
        attacker,
        "brute-2",
        &["guess5", "guess6", "guess7"],
    ));
    case.note(format!(
        "session 2 after reconnect (3 wrong): {:?}",
        codes(&s2)
    ));
    let s3 = rt.block_on(auth_session(addr, attacker, "brute-3", &["guess8"]));
    case.note(format!(
        "session 3, another guess (failure 7): {:?}",
        codes(&s3)
    ));
    let s4 = rt.block_on(auth_session(addr, attacker, "brute-4", &[PASSWORD]));
    case.note(format!(
        "session 4, the right password from the locked IP: {:?}",
        codes(&s4)
    ));
    let other = rt.block_on(auth_session(addr, ip(4), "other-ip", &[PASSWORD]));
    case.note(format!(
        "the right password from 127.0.0.4: {:?}",
        codes(&other)
    ));

    assert!(
        s1.iter()
            .take(2)
            .all(|r| r.as_deref().is_some_and(|r| r.starts_with("535 5.7.8"))),
        "wrong passwords must get 535 5.7.8: {s1:?}"
    );
    assert!(
        s1.last()
            .is_some_and(|r| r.as_deref().is_none_or(|r| r.starts_with("421"))),
        "the session must end with 421 after maxFailuresPerSession: {s1:?}"
    );
    // failuresPerIpPerMinute = 5: the 6th failure (the last of session 2) goes over it, so
    // every later AUTH from that address gets 454 until the rate falls.
    assert!(
        s3.first()
            .is_some_and(|r| r.as_deref().is_some_and(|r| r.starts_with("454 4.7.0"))),
        "the per-IP limit must hold across reconnects (454 4.7.0): {s3:?}"
    );
    assert!(
        s4.first()
            .is_some_and(|r| r.as_deref().is_some_and(|r| r.starts_with("454 4.7.0"))),
        "the lockout must hold for the right password too: {s4:?}"
    );
    assert!(
        other
            .first()
            .is_some_and(|r| r.as_deref().is_some_and(|r| r.starts_with("235"))),
        "another IP must not be locked out: {other:?}"
    );
    case.pass("535s, 421 in-session, then 454 across reconnects (right password too); 127.0.0.4 still authenticates");
}

/// AUTH-06b (was finding F3): the AUTH failure limit was per client IP only (and per node, in
/// memory), so a guesser that stays under the per-IP limit on each of many addresses was
/// never slowed down for the targeted user (catalogue AUTH-06: "Also a per-username limit, to
/// stop distributed guessing ... counters are cluster-wide"). Now `auth.failuresPerUser`
/// counts a user name's failures over all addresses and all nodes sharing the NATS server.
#[test]
fn auth_distributed_guessing_is_throttled_per_user() {
    let case = Case::begin(
        "AUTH-06b",
        "one user guessed from 8 addresses (127.0.0.10-17), 4 wrong passwords each (under the per-IP limit of 5), alternately on two nodes sharing one NATS (replicas of one MailDomain)",
        "535 5.7.8 for the first failuresPerUser (10) failures over both nodes, then 454 4.7.0 for that user from any address on either node, even with the right password; another user name still gets 535",
    );
    let nats = Nats::single(NatsOptions::default());
    let auth = json!({
        "maxFailuresPerSession": 5,
        "failuresPerIpPerMinute": 5,
        "failuresPerUser": 10,
        "failuresPerUserWindow": "1h",
        // The counts below are exact only if no look-up gives up on NATS, whose store
        // fsyncs every write while the flood cases of this binary load the machine.
        "sharedCounterTimeout": "10s",
    });
    let a = Node::start(&nats.url(), |c, _| c["auth"] = auth.clone());
    // The second replica shares the first one's stream and subjects, as the operator renders
    // them for one MailDomain, and so its failure stream.
    let b = Node::start(&nats.url(), |c, _| {
        c["auth"] = auth.clone();
        c["nats"]["stream"] = json!(a.stream);
        c["nats"]["subjectPrefix"] = json!(a.subject_prefix);
        c["nats"]["bodyBucket"] = json!(a.bucket);
    });
    let rt = runtime();
    let failure_stream = format!("{}_AUTH_FAILURES", a.stream);
    rt.block_on(async {
        let js = async_nats::jetstream::new(
            async_nats::connect(nats.url())
                .await
                .expect("connect to NATS"),
        );
        // Failures before it exists would be counted by each node on its own only.
        let deadline = Instant::now() + Duration::from_secs(20);
        while js.get_stream(&failure_stream).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "stream {failure_stream} not created within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut all = Vec::new();
    for i in 10..18u8 {
        let node = if i % 2 == 0 { &a } else { &b };
        let r = rt.block_on(auth_session(
            node.ports.implicit_tls,
            ip(i),
            &format!("guesser-{i}"),
            &["a1", "a2", "a3", "a4"],
        ));
        all.extend(codes(&r));
    }
    case.note(format!("32 guesses, alternating nodes by address: {all:?}"));
    let right: Vec<Vec<String>> = [(&a, 18u8), (&b, 19)]
        .into_iter()
        .map(|(node, last)| {
            codes(&rt.block_on(auth_session(
                node.ports.implicit_tls,
                ip(last),
                "right-password",
                &[PASSWORD],
            )))
        })
        .collect();
    case.note(format!(
        "the right password from 127.0.0.18 (node A) and 127.0.0.19 (node B): {right:?}"
    ));
    let other = codes(&rt.block_on(auth_session_as(
        b.ports.implicit_tls,
        ip(20),
        "other-user",
        "mallory@example.test",
        &["m1"],
    )));
    case.note(format!("another user name from 127.0.0.20: {other:?}"));

    assert_eq!(all.len(), 32, "{all:?}");
    assert!(
        all[..10].iter().all(|c| c.starts_with("535 5.7.8")),
        "the first 10 failures over both nodes must be answered 535 5.7.8: {all:?}"
    );
    assert!(
        all[10..].iter().all(|c| c.starts_with("454 4.7.0")),
        "after 10 failures of {USER} every further attempt must get 454 4.7.0: {all:?}"
    );
    assert!(
        right
            .iter()
            .all(|r| r.first().is_some_and(|c| c.starts_with("454 4.7.0"))),
        "the lockout must hold for the right password, on both nodes: {right:?}"
    );
    assert!(
        other.first().is_some_and(|c| c.starts_with("535 5.7.8")),
        "another user name must not be locked out: {other:?}"
    );
    case.pass("10 guesses spread over 8 addresses and 2 nodes, then 454 for that user everywhere (right password too); another name unaffected");
}

/// DOS-04/05: slowloris in the command phase and in DATA.
#[test]
fn slowloris_clients_are_dropped() {
    let case = Case::begin(
        "DOS-05",
        "slowloris: a command trickled 1 byte / 400 ms; DATA trickled at 10 bytes/s",
        "command: 421 4.4.2 at the command deadline (3 s) however the bytes trickle; DATA: 421 4.4.2 at the data-rate floor (minDataRate 1000 B/s)",
    );
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        c["minDataRate"] = json!(1000);
        c["timeouts"] =
            json!({ "greeting": "3s", "command": "3s", "dataInit": "3s", "dataBlock": "3s" });
    });
    let rt = runtime();
    let mx = node.ports.mx;
    let limit = Duration::from_secs(scale(20, 60));
    let (cmd_result, cmd_time, data_result, data_time, data_sent) = rt.block_on(async move {
        // 1. A command line trickled byte by byte.
        let mut c = SmtpTcp::connect_from(ip(5), mx, "slow-command")
            .await
            .expect("connect");
        c.greeting("220").await;
        c.expect("EHLO slow.test", "250").await;
        let t = Instant::now();
        let line = b"MAIL FROM:<slow@relay.invalid>\r\n".repeat(8);
        let mut cmd_result = None;
        for b in line.iter() {
            if t.elapsed() > limit || c.send_quiet(&[*b]).await.is_err() {
                break;
            }
            if let Some(r) = c.reply(Duration::from_millis(400)).await {
                cmd_result = Some(r);
                break;
            }
        }
        let cmd_time = t.elapsed();
        // 2. DATA at 10 bytes per second.
        let mut c = SmtpTcp::connect_from(ip(6), mx, "slow-data")
            .await
            .expect("connect");
        c.greeting("220").await;
        c.expect("EHLO slow.test", "250").await;
        c.expect("MAIL FROM:<slow@relay.invalid>", "250").await;
        c.expect("RCPT TO:<bob@example.test>", "250").await;
        c.expect("DATA", "354").await;
        let t = Instant::now();
        let mut sent = 0usize;
        let mut data_result = None;
        let chunk = b"0123456789";
        while t.elapsed() < limit {
            if c.send_quiet(&chunk[..1]).await.is_err() {
                break;
            }
            sent += 1;
            if let Some(r) = c.reply(Duration::from_millis(100)).await {
                data_result = Some(r);
                break;
            }
        }
        (cmd_result, cmd_time, data_result, t.elapsed(), sent)
    });
    case.note(format!(
        "command trickle: got {:?} after {cmd_time:.1?}",
        cmd_result.as_deref().map(str::trim_end)
    ));
    case.note(format!(
        "DATA trickle: sent {data_sent} bytes in {data_time:.1?}, got {:?}",
        data_result.as_deref().map(str::trim_end)
    ));
    assert!(
        cmd_result
            .as_deref()
            .is_some_and(|r| r.starts_with("421 4.4.2")),
        "trickled command not cut off: {cmd_result:?}"
    );
    // 3 s deadline; the margin is for a loaded machine. A first complete line would take
    // 12.8 s and be answered with 250, not 421.
    assert!(
        cmd_time < Duration::from_secs(12),
        "command deadline not enforced ({cmd_time:?})"
    );
    assert!(
        data_result
            .as_deref()
            .is_some_and(|r| r.starts_with("421 4.4.2")),
        "trickled DATA not cut off: {data_result:?}"
    );
    // Without the floor the trickle would go on to the test's own limit (20 s or more).
    assert!(
        data_time < Duration::from_secs(15),
        "data-rate floor not enforced ({data_time:?})"
    );
    case.pass(format!(
        "command dropped after {cmd_time:.1?}, DATA after {data_time:.1?}"
    ));
}

/// SIZE-05/06, DOS-06: a 1 GiB DATA stream against a 10 MiB limit.
#[test]
fn gigabyte_data_refused_with_flat_memory() {
    let size: u64 = 1 << 30;
    let case = Case::begin(
        "SIZE-06",
        "1 GiB of DATA (998-octet lines, no SIZE declared) against maxMessageSize 10Mi",
        "read to the end, then 552 5.3.4; nothing queued; the node's RSS stays flat (< 64 MiB above its start)",
    );
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        c["domains"][0]["limits"] = json!({ "maxMessageSize": "10Mi" });
        c["minDataRate"] = json!(0);
    });
    let rt = runtime();
    let rss_before = node.rss_kib();
    let sampler = RssSampler::start(node.pid());
    let mx = node.ports.mx;
    let (reply, elapsed) = rt.block_on(async move {
        let mut c = SmtpTcp::connect(mx, "gigabyte").await.expect("connect");
        c.greeting("220").await;
        c.expect("EHLO big.test", "250").await;
        c.expect("MAIL FROM:<big@relay.invalid>", "250").await;
        c.expect("RCPT TO:<bob@example.test>", "250").await;
        c.expect("DATA", "354").await;
        let line = format!("{}\r\n", "B".repeat(998));
        let block = line.repeat(1024); // 1,000,448 bytes
        let t = Instant::now();
        let mut sent = 0u64;
        c.send(format!("Subject: GIGABYTE\r\n\r\n{line}").as_bytes())
            .await
            .expect("send");
        while sent < size {
            c.send_quiet(block.as_bytes()).await.expect("send block");
            sent += block.len() as u64;
        }
        println!("  [gigabyte] C: ... {sent} bytes of 998-octet lines ...");
        c.send(b".\r\n").await.expect("dot");
        let reply = c.reply(Duration::from_secs(120)).await;
        (reply, t.elapsed())
    });
    let rss_max = sampler.finish();
    let stored = rt.block_on(node.entries(&nats.url())).len();
    case.note(format!(
        "sent 1 GiB in {:.1}s ({:.0} MiB/s); got {:?}",
        elapsed.as_secs_f64(),
        size as f64 / 1048576.0 / elapsed.as_secs_f64(),
        reply.as_deref().map(str::trim_end)
    ));
    case.note(format!(
        "node RSS: {} MiB before, {} MiB at most while receiving; stream entries: {stored}",
        rss_before / 1024,
        rss_max / 1024
    ));
    assert!(
        reply.as_deref().is_some_and(|r| r.starts_with("552 5.3.4")),
        "expected 552 5.3.4, got {reply:?}"
    );
    assert_eq!(stored, 0, "an over-size message was queued");
    assert!(
        rss_max.saturating_sub(rss_before) < 64 * 1024,
        "memory grew by {} MiB while receiving 1 GiB",
        rss_max.saturating_sub(rss_before) / 1024
    );
    case.pass(format!(
        "552 5.3.4 after 1 GiB; RSS grew {} MiB at most",
        rss_max.saturating_sub(rss_before) / 1024
    ));
}

/// MX-06: MX records of hostile domains pointing at the node's own side (loopback, the
/// unspecified address, IPv4-mapped loopback). Only loopback is used as a target: private
/// ranges are checked through the address policy without sending a packet.
#[test]
fn mx_pointing_at_loopback_is_refused() {
    let case = Case::begin(
        "MX-06",
        "MX of evil*.test at 127.0.0.1, 127.0.0.2, 0.0.0.0 and ::ffff:127.0.0.1 (delivery.allowedNetworks empty)",
        "no connection to any of them; the recipients are bounced or deferred, never delivered; private/metadata ranges refused by the policy",
    );
    let (a, b) = (ip(1), ip(2));
    let port = free_port_on(&[a, b]);
    let zones = [
        (
            "evil1.test",
            "@ IN MX 10 mx\nmx IN A 127.0.0.1\n".to_owned(),
        ),
        (
            "evil2.test",
            "@ IN MX 10 mx\nmx IN A 127.0.0.2\n".to_owned(),
        ),
        ("evil3.test", "@ IN MX 10 mx\nmx IN A 0.0.0.0\n".to_owned()),
        (
            "evil4.test",
            "@ IN MX 10 mx\nmx IN AAAA ::ffff:127.0.0.1\n".to_owned(),
        ),
    ];
    let knot = Knot::start(&zones);
    let listeners = [
        Silent::start(SocketAddr::new(a, port)),
        Silent::start(SocketAddr::new(b, port)),
    ];
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        enable_delivery(c, &knot.addr(), port, false)
    });
    let rt = runtime();
    for i in 1..=4 {
        let reply = rt.block_on(submit(
            node.ports.implicit_tls,
            &format!("victim@evil{i}.test"),
            &message(&format!("EVIL-{i}")),
            &format!("submit-evil{i}"),
        ));
        assert!(
            reply.as_deref().is_some_and(|r| r.starts_with("250")),
            "{reply:?}"
        );
    }
    let prefix = "kubemail_smtp_delivery_recipients_total";
    let settled = wait_until(
        Duration::from_secs(30),
        "a verdict for all four recipients",
        || {
            let bounced = node.counter_with(prefix, "result=\"bounced\"");
            let deferred = node.counter_with(prefix, "result=\"deferred\"");
            (bounced + deferred >= 4.0).then_some((bounced, deferred))
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let delivered = node.delivered();
    let connections: Vec<usize> = listeners.iter().map(Silent::accepted).collect();
    let log = node.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("blocked range"))
        .take(4)
        .collect();
    case.note(format!(
        "recipients: {} bounced, {} deferred, {delivered} delivered; connections to 127.0.0.1:{port} / 127.0.0.2:{port}: {connections:?}",
        settled.0, settled.1
    ));
    for r in &refusals {
        case.note(format!("node: {}", r.get(..r.len().min(200)).unwrap_or(r)));
    }
    assert_eq!(connections, [0, 0], "the node connected to a loopback MX");
    assert_eq!(
        delivered, 0.0,
        "a recipient behind a loopback MX was delivered"
    );

    // Private, shared, link-local (cloud metadata), ULA and embedded-IPv4 forms: the same
    // policy the worker applies, checked without sending anything.
    use kubemail_smtp_node::delivery::address_policy::AddressPolicy;
    let policy = AddressPolicy::new(&[], &[]).expect("policy");
    let hostile = [
        "10.0.0.5",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "127.255.255.254",
        "224.0.0.1",
        "::",
        "::1",
        "fd00::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",
        "64:ff9b::7f00:1",
    ];
    let mut allowed = Vec::new();
    for h in hostile {
        let ip: IpAddr = h.parse().expect("ip");
        if policy.check(ip).is_ok() {
            allowed.push(h);
        }
    }
    case.note(format!(
        "policy check of {} private/special addresses: allowed {allowed:?}",
        hostile.len()
    ));
    assert!(
        allowed.is_empty(),
        "the address policy lets these through: {allowed:?}"
    );
    case.pass(format!(
        "no connection to loopback MX hosts ({} bounced, {} deferred); all {} special ranges refused",
        settled.0,
        settled.1,
        hostile.len()
    ));
}

/// LOOP-01 (was finding F4, fixed): the node had no hop-count limit. A message that already
/// carried more `Received:` headers than any sane path (Postfix `hopcount_limit` 50; RFC 5321
/// §6.3 suggests a threshold of 100) was accepted and queued again, so a forwarding loop
/// between two MTAs never ended. Now: `554 5.4.6` (routing loop detected) at the end of DATA.
#[test]
fn mail_loop_is_refused_at_the_hop_limit() {
    let case = Case::begin(
        "LOOP-01",
        "a message with 101 Received: headers to bob@example.test on the MX port",
        "554 5.4.6 (routing loop), nothing queued",
    );
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |_, _| {});
    let rt = runtime();
    let hops: String = (0..101)
        .map(|i| format!("Received: from hop{i}.relay.invalid by hop{}.relay.invalid; Sat, 28 Nov 2026 00:00:00 +0000\r\n", i + 1))
        .collect();
    let text = format!("{hops}{}", message("LOOP-1"));
    let reply = rt.block_on(async {
        let mut c = SmtpTcp::connect(node.ports.mx, "loop")
            .await
            .expect("connect");
        c.greeting("220").await;
        c.expect("EHLO hop101.relay.invalid", "250").await;
        c.send_mail("a@relay.invalid", "bob@example.test", &text)
            .await
    });
    let stored = rt.block_on(node.entries(&nats.url())).len();
    case.note(format!(
        "got {:?}; stream entries: {stored}",
        reply.as_deref().map(str::trim_end)
    ));
    assert!(
        reply.as_deref().is_some_and(|r| r.starts_with("554 5.4.6")),
        "a looping message was not refused: {reply:?}"
    );
    assert_eq!(stored, 0);
    case.pass("refused with 554 5.4.6");
}

/// The node's peak resident memory so far (`VmHWM` of `/proc/<pid>/status`), in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A near-limit message of client `k`: every line names the client and its number, so a
/// stored copy that lost, doubled or mixed up octets does not compare equal.
fn big_message(k: usize, size: usize) -> String {
    let mut m = format!("From: <load@relay.invalid>\r\nSubject: MEM-{k}\r\n\r\n");
    let mut i = 0u64;
    while m.len() < size {
        m.push_str(&format!("{k:03}-{i:08} {}\r\n", "x".repeat(80)));
        i += 1;
    }
    m
}

/// Sends `message` once; `trickle` first sends its first 20 KiB at about 1 KiB/s (twice the
/// minimum data rate). Returns the reply to the final dot (`None`: connection lost).
async fn send_big(mx: SocketAddr, label: &str, message: &str, trickle: bool) -> Option<String> {
    let mut c = SmtpTcp::connect(mx, label).await.ok()?;
    c.verbose = false;
    c.reply(Duration::from_secs(10)).await?;
    c.cmd("EHLO load.test", Duration::from_secs(10)).await?;
    c.cmd("MAIL FROM:<load@relay.invalid>", Duration::from_secs(10))
        .await?;
    c.cmd("RCPT TO:<bob@example.test>", Duration::from_secs(10))
        .await?;
    let data = c.cmd("DATA", Duration::from_secs(30)).await?;
    if !data.starts_with("354") {
        return Some(data);
    }
    let mut rest = message.as_bytes();
    if trickle {
        for _ in 0..20 {
            let (head, tail) = rest.split_at(1024);
            c.send_quiet(head).await.ok()?;
            rest = tail;
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    }
    for chunk in rest.chunks(64 * 1024) {
        c.send_quiet(chunk).await.ok()?;
    }
    c.send_quiet(b".\r\n").await.ok()?;
    c.reply(Duration::from_secs(60)).await
}

/// Every stored message of `node`, bodies read from the object store where they are there,
/// by `Subject:` token.
async fn stored_messages(
    url: &str,
    node: &Node,
) -> std::collections::HashMap<String, Vec<Vec<u8>>> {
    let client = async_nats::connect(url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut out: std::collections::HashMap<String, Vec<Vec<u8>>> = Default::default();
    for e in node.entries(url).await {
        let mut body = e.payload.clone();
        // The reference names the bucket (per domain) and the object in it.
        if let Some((bucket, name)) = e
            .headers
            .get("Kubemail-Body-Ref")
            .and_then(|r| r.split_once('/'))
        {
            use tokio::io::AsyncReadExt as _;
            let store = js.get_object_store(bucket).await.expect("body bucket");
            let mut object = store.get(name).await.expect("body object");
            body.clear();
            object.read_to_end(&mut body).await.expect("read body");
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
        let token = text
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap_or_default()
            .to_owned();
        out.entry(token).or_default().push(body);
    }
    out
}

/// Hostile finding 2: many honest, near-limit messages at once (some trickling at the
/// minimum data rate) against a node whose message memory budget holds only a few of them.
#[test]
fn memory_budget_holds_under_many_near_limit_messages() {
    const BUDGET_MIB: u64 = 32;
    const OVERHEAD_MIB: u64 = 64;
    let case = Case::begin(
        "MEM-02",
        "20 concurrent 7.5 MiB messages (maxMessageSize 8Mi), 4 of them trickling, against limits.messageBytesInMemory 32Mi",
        "peak RSS (VmHWM) stays below the RSS at start + 32 MiB + 64 MiB; sessions without room wait and get 452 4.3.1, retry and are accepted; every 250 is in the stream octet for octet",
    );
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        c["domains"][0]["limits"] = json!({ "maxMessageSize": "8Mi" });
        c["limits"] =
            json!({ "messageBytesInMemory": format!("{BUDGET_MIB}Mi"), "memoryWait": "3s" });
        c["nats"]["publishTimeout"] = json!("10s");
    });
    let rt = runtime();
    let rss_before = node.rss_kib();
    let mx = node.ports.mx;
    let clients = 20usize;
    let messages: Vec<Arc<String>> = (0..clients)
        .map(|k| Arc::new(big_message(k, 7_500_000)))
        .collect();
    let started = Instant::now();
    let results = rt.block_on(async {
        let tasks: Vec<_> = messages
            .iter()
            .enumerate()
            .map(|(k, m)| {
                let m = m.clone();
                tokio::spawn(async move {
                    let mut replies = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(180);
                    // A refused client tries again, as real ones do; bounded in time.
                    while Instant::now() < deadline {
                        let reply =
                            send_big(mx, &format!("mem-{k}"), &m, k < 4 && replies.is_empty())
                                .await
                                .unwrap_or_else(|| "lost".to_owned());
                        let ok = reply.starts_with("250");
                        replies.push(reply);
                        if ok {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    (k, replies)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    });
    let hwm = vm_hwm_kib(node.pid());
    let refusals: Vec<String> = results
        .iter()
        .flat_map(|(_, r)| r.iter().filter(|r| !r.starts_with("250")))
        .map(|r| r.chars().take(9).collect())
        .collect();
    case.note(format!(
        "{} messages in {:.1}s; {} refusals before acceptance ({:?}...)",
        clients,
        started.elapsed().as_secs_f64(),
        refusals.len(),
        refusals.iter().take(5).collect::<Vec<_>>()
    ));
    case.note(format!(
        "node RSS {} MiB at start, peak (VmHWM) {} MiB; limit {} MiB",
        rss_before / 1024,
        hwm / 1024,
        (rss_before / 1024) + BUDGET_MIB + OVERHEAD_MIB
    ));
    assert!(
        refusals
            .iter()
            .all(|r| r.starts_with("452 4.3.1") || r.starts_with("lost")),
        "only 452 4.3.1 while waiting for memory: {refusals:?}"
    );
    assert!(
        hwm <= rss_before + (BUDGET_MIB + OVERHEAD_MIB) * 1024,
        "peak RSS {} MiB exceeds start {} MiB + budget {BUDGET_MIB} MiB + {OVERHEAD_MIB} MiB",
        hwm / 1024,
        rss_before / 1024
    );
    let stored = rt.block_on(stored_messages(&nats.url(), &node));
    for (k, replies) in &results {
        assert!(
            replies.last().is_some_and(|r| r.starts_with("250")),
            "MEM-{k} never accepted: {replies:?}"
        );
        let copies = stored.get(&format!("MEM-{k}")).cloned().unwrap_or_default();
        assert_eq!(copies.len(), 1, "MEM-{k}: one stored copy");
        let original = messages[*k].as_bytes();
        let copy = &copies[0];
        assert!(
            copy.ends_with(original) && copy.starts_with(b"Received: "),
            "MEM-{k}: the stored message is our Received header and the message octet for octet ({} stored, {} sent)",
            copy.len(),
            original.len()
        );
        assert!(
            !copy[..copy.len() - original.len()]
                .windows(9)
                .any(|w| w == b"Subject: "),
            "MEM-{k}: nothing but our header in front"
        );
    }
    case.pass(format!(
        "peak RSS {} MiB (start {} MiB, budget {BUDGET_MIB} MiB); all {clients} accepted intact after {} refusals",
        hwm / 1024,
        rss_before / 1024,
        refusals.len()
    ));
}
