//! Abuse resistance: a connection flood from one
//! address, AUTH brute force across reconnects, slowloris clients, a 1 GiB DATA stream, MX
//! records pointing at loopback, and a mail loop; then the second round (R2-*): backscatter,
//! IPv6 prefixes and AUTH floods, forged `Authentication-Results`, DKIM for a foreign
//! `From:`, PROXY headers from untrusted peers, junk commands, NUL in DATA and IPv6 forms of
//! blocked IPv4 addresses; and many near-limit messages against the node's memory budget.
//! Against the real `smtp-node` binary; every loop bounded in count and time; all traffic on
//! 127.0.0.0/8.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kubemail_e2e::hostile::nats::{Nats, NatsOptions};
use kubemail_e2e::hostile::node::{Node, PASSWORD, USER, enable_delivery};
use kubemail_e2e::hostile::peers::{Knot, MailStore, Silent, Sink};
use kubemail_e2e::hostile::process::{
    RssSampler, free_port, free_port_on, raise_fd_limit, wait_until,
};
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
/// never slowed down for the targeted user (AUTH-06: "Also a per-username limit, to
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

// ---- round two: what the first suite did not cover ------------------------------------------

/// The metric lines of `node` that start with `prefix` and contain `label`, summed.
fn metric(node: &Node, prefix: &str, label: &str) -> f64 {
    node.counter_with(prefix, label)
}

/// R2-1 (backscatter): a failed inbound message was bounced to its envelope sender, whoever
/// that really was, with the original attached and signed with our key; a catch-all domain
/// took every local part and bounced what its mail store refused; a domain without an inbound
/// target queued mail to expire after five days (and bounce). Now recipients are checked at
/// RCPT (the catch-all domain's store is asked, answers cached, a store that cannot say gets
/// `451`), a domain without a target refuses them, a DSN about inbound mail goes only to a
/// sender that passed SPF or aligned DKIM, and carries only the original's header.
#[test]
fn backscatter_unknown_recipients_are_refused_at_rcpt_and_forged_senders_get_no_bounce() {
    let case = Case::begin(
        "R2-1",
        "MX mail from a forged sender (SPF -all) and from an SPF-passing one to a domain without an inbound target, and to a catch-all domain whose LMTP store knows bob, refuses others, is busy for busy@ and accepts gone@ at RCPT but refuses it after the data",
        "550 5.1.1 at RCPT for the domain without a target and for unknown catch-all recipients (the second time from the cache), 451 4.4.3 for busy@; after delivery fails for gone@, no DSN to the forged sender, one DSN to the SPF-passing sender with only the original's header (long run: 200 made-up recipients asked twice cost the store 200 probes)",
    );
    let store = MailStore::start(&["bob"], &["gone"]);
    let sink_port = free_port_on(&[ip(1)]);
    let sink = Sink::start(ip(1), sink_port, &[]);
    let knot = Knot::start(&[
        (
            "sender.test",
            "@ IN MX 10 mx\nmx IN A 127.0.0.1\n@ IN TXT \"v=spf1 ip4:127.0.0.0/8 -all\"\n"
                .to_owned(),
        ),
        (
            "forged.test",
            "@ IN MX 10 mx\nmx IN A 127.0.0.1\n@ IN TXT \"v=spf1 -all\"\n".to_owned(),
        ),
    ]);
    let nats = Nats::single(NatsOptions::default());
    let store_port = store.addr.port();
    let node = Node::start(&nats.url(), |c, _| {
        enable_delivery(c, &knot.addr(), sink_port, true);
        c["inboundAuth"] = json!({ "enabled": true, "timeout": "5s" });
        c["recipientVerification"] = json!({ "enabled": true, "timeout": "5s" });
        let domains = c["domains"].as_array_mut().expect("domains");
        domains.push(json!({
            "name": "catch.test",
            "catchAll": true,
            "inbound": { "host": "127.0.0.1", "port": store_port, "protocol": "lmtp", "tls": "none" },
        }));
        domains.push(json!({ "name": "nothing.test", "recipients": ["postmaster"] }));
    });
    let rt = runtime();
    let mx = node.ports.mx;
    let body_marker = "backscatter body text";
    let (replies, probes_before, probes_after, dots) = rt.block_on(async {
        let mut c = SmtpTcp::connect_from(ip(1), mx, "forged-sender")
            .await
            .expect("connect");
        c.greeting("220").await;
        c.expect("EHLO client.forged.test", "250").await;
        c.expect("MAIL FROM:<x@forged.test>", "250").await;
        let mut replies = Vec::new();
        for rcpt in ["postmaster@nothing.test", "nobody@catch.test"] {
            replies.push(c.cmd(&format!("RCPT TO:<{rcpt}>"), Duration::from_secs(20)).await);
        }
        let probes_before = store.rcpt_commands();
        replies.push(c.cmd("RCPT TO:<nobody@catch.test>", Duration::from_secs(20)).await);
        let probes_after = store.rcpt_commands();
        for rcpt in ["busy@catch.test", "gone@catch.test"] {
            replies.push(c.cmd(&format!("RCPT TO:<{rcpt}>"), Duration::from_secs(20)).await);
        }
        let mut dots = Vec::new();
        c.expect("DATA", "354").await;
        let forged = format!(
            "From: <x@forged.test>\r\nTo: <gone@catch.test>\r\nSubject: BACKSCATTER-FORGED\r\n\r\n{body_marker}\r\n"
        );
        c.send(forged.as_bytes()).await.expect("send");
        c.send(b"\r\n.\r\n").await.expect("dot");
        dots.push(c.reply(Duration::from_secs(30)).await);
        let mut c = SmtpTcp::connect_from(ip(1), mx, "spf-sender")
            .await
            .expect("connect");
        c.greeting("220").await;
        c.expect("EHLO client.sender.test", "250").await;
        let genuine = format!(
            "From: <a@sender.test>\r\nTo: <gone@catch.test>\r\nSubject: BACKSCATTER-SPF\r\n\r\n{body_marker}\r\n"
        );
        dots.push(c.send_mail("a@sender.test", "gone@catch.test", &genuine).await);
        (replies, probes_before, probes_after, dots)
    });
    let codes: Vec<&str> = replies
        .iter()
        .map(|r| r.as_deref().map_or("none", |r| r.get(..9).unwrap_or(r)))
        .collect();
    case.note(format!(
        "RCPT nothing.test, nobody, nobody again, busy, gone: {codes:?}; store RCPTs around the repeated nobody: {probes_before} -> {probes_after}"
    ));
    case.note(format!(
        "end of data: {:?}",
        dots.iter()
            .map(|d| d.as_deref().map(str::trim_end))
            .collect::<Vec<_>>()
    ));
    assert!(
        codes[0].starts_with("550 5.1.1"),
        "a domain without an inbound target took a recipient: {replies:?}"
    );
    assert!(
        codes[1].starts_with("550 5.1.1") && codes[2].starts_with("550 5.1.1"),
        "a catch-all domain took a recipient its store does not know: {replies:?}"
    );
    assert_eq!(
        probes_before, probes_after,
        "the negative answer was not cached"
    );
    assert!(
        codes[3].starts_with("451 4.4.3"),
        "a store that cannot say must get 451 4.4.3, not acceptance: {replies:?}"
    );
    assert!(codes[4].starts_with("250"), "{replies:?}");
    assert!(
        dots.iter()
            .all(|d| d.as_deref().is_some_and(|d| d.starts_with("250"))),
        "{dots:?}"
    );

    // Both messages reach the store, which refuses gone@ after the data.
    wait_until(
        Duration::from_secs(60),
        "both messages at the store",
        || (store.messages().len() >= 2).then_some(()),
    );
    // Long run (after the deliveries, whose RCPTs the store counts too): a dictionary of
    // made-up recipients, asked twice. Each address costs the store one probe, the second
    // round none; sessions of 10 stay under maxErrorsPerSession.
    let dictionary = scale(0usize, 200);
    if dictionary > 0 {
        let before = store.rcpt_commands();
        let refused = rt.block_on(async {
            let mut refused = 0;
            for _round in 0..2 {
                for chunk in 0..dictionary / 10 {
                    let mut c = SmtpTcp::connect_from(ip(1), mx, "dictionary")
                        .await
                        .expect("connect");
                    c.verbose = false;
                    c.greeting("220").await;
                    c.expect("EHLO dict.forged.test", "250").await;
                    c.expect("MAIL FROM:<x@forged.test>", "250").await;
                    for i in 0..10 {
                        let rcpt = format!("RCPT TO:<guess{}@catch.test>", chunk * 10 + i);
                        if c.cmd(&rcpt, Duration::from_secs(20))
                            .await
                            .is_some_and(|r| r.starts_with("550 5.1.1"))
                        {
                            refused += 1;
                        }
                    }
                    let _ = c.cmd("QUIT", Duration::from_secs(5)).await;
                }
            }
            refused
        });
        let probes = store.rcpt_commands() - before;
        case.note(format!(
            "dictionary of {dictionary}, asked twice: {refused} refused, {probes} store RCPTs"
        ));
        assert_eq!(refused, 2 * dictionary);
        assert_eq!(
            probes, dictionary,
            "one probe per address, the second round cached"
        );
    }

    let dsn = wait_until(Duration::from_secs(60), "the DSN to a@sender.test", || {
        sink.transactions()
            .into_iter()
            .find(|t| t.contains("BACKSCATTER-SPF"))
    });
    // Time for a (wrong) second DSN to the forged sender to arrive as well.
    wait_until(
        Duration::from_secs(30),
        "the forged sender's failure to be dropped",
        || {
            (metric(
                &node,
                "kubemail_smtp_delivery_recipients_total",
                "result=\"dropped\"",
            ) >= 1.0)
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let to_forged = sink.count("BACKSCATTER-FORGED");
    let first_line = |needle: &str| {
        dsn.lines()
            .find(|l| l.contains(needle))
            .unwrap_or("")
            .to_owned()
    };
    case.note(format!(
        "DSN at sender.test's MX: {} / {}; DSNs about the forged message: {to_forged}",
        first_line("Final-Recipient"),
        first_line("Content-Type: text/rfc822-headers")
    ));
    assert_eq!(to_forged, 0, "a bounce went to the forged sender");
    assert!(dsn.contains("a@sender.test"), "{dsn}");
    assert!(
        dsn.contains("Content-Type: text/rfc822-headers"),
        "the DSN to an outside sender must carry only the original's header:\n{dsn}"
    );
    assert!(
        !dsn.contains(body_marker),
        "the DSN returned the original's body to an outside sender:\n{dsn}"
    );
    assert_eq!(
        sink.count("Undelivered Mail"),
        1,
        "exactly one DSN: to the sender that passed SPF"
    );
    case.pass("refused at RCPT (cached, 451 when the store cannot say), no DSN to the forged sender, a headers-only DSN to the SPF-passing one");
}

/// Sends a PROXY v1 header claiming `source` (IPv4 or IPv6) on a fresh connection to `addr`.
async fn proxied(addr: SocketAddr, source: IpAddr, label: &str) -> SmtpTcp {
    let mut c = SmtpTcp::connect(addr, label).await.expect("connect");
    let (family, dest) = if source.is_ipv6() {
        ("TCP6", "2001:db8::25")
    } else {
        ("TCP4", "192.0.2.25")
    };
    c.send(format!("PROXY {family} {source} {dest} 40000 25\r\n").as_bytes())
        .await
        .expect("PROXY header");
    c
}

/// R2-3a (IPv6 prefixes): the per-client connection and AUTH-failure limits keyed on the
/// whole address, so a host with a /64 (2^64 addresses) was never limited. Now IPv6 clients
/// are grouped by `clientIpv6Prefix` (default /64). The addresses come in PROXY headers from
/// a trusted 127.0.0.1, as they would behind a load balancer.
#[test]
fn ipv6_prefix_shares_connection_and_auth_limits() {
    let attempts = scale(8u16, 1000);
    let case = Case::begin(
        "R2-3a",
        &format!(
            "{attempts} connections from distinct addresses of 2001:db8:1:2::/64 (PROXY from 127.0.0.1) while 3 of them hold slots; AUTH failures from 4 addresses of 2001:db8:7:7::/64, then the right password from a 5th"
        ),
        "maxConnectionsPerIp (3) and failuresPerIpPerMinute (3) count the /64 as one client: 421 4.7.0 for the others of the /64 and 454 4.7.0 for the 5th AUTH; the next /64 is served",
    );
    let nats = Nats::single(NatsOptions::default());
    let sub_port = free_port();
    let node = Node::start(&nats.url(), |c, p| {
        c["maxConnectionsPerIp"] = json!(3);
        c["auth"] = json!({ "failuresPerIpPerMinute": 3, "maxFailuresPerSession": 5 });
        c["listeners"][0]["proxyProtocol"] = json!(true);
        c["listeners"][0]["trustedProxies"] = json!(["127.0.0.0/8"]);
        c["listeners"]
            .as_array_mut()
            .expect("listeners")
            .push(json!({
                "name": "subproxy", "kind": "submission",
                "address": SocketAddr::new(p.mx.ip(), sub_port).to_string(),
                "proxyProtocol": true, "trustedProxies": ["127.0.0.1/32"], "requireTls": false,
            }));
    });
    let rt = runtime();
    let mx = node.ports.mx;
    let sub = SocketAddr::new(mx.ip(), sub_port);
    let v6 = |net: u16, host: u16| IpAddr::from([0x2001, 0xdb8, 1, net, 0, 0, 0, host]);
    let (held_ok, refused, next, auth) = rt.block_on(async {
        let mut held = Vec::new();
        let mut held_ok = 0;
        for host in 1..=3 {
            let mut c = proxied(mx, v6(2, host), &format!("held-{host}")).await;
            if c.greeting("220").await.starts_with("220") {
                held_ok += 1;
            }
            held.push(c);
        }
        let mut refused = 0;
        for host in 0..attempts {
            let mut c = proxied(mx, v6(2, 0x100 + host), "same-64").await;
            c.verbose = host == 0;
            if c.reply(Duration::from_secs(10))
                .await
                .is_some_and(|r| r.starts_with("421 4.7.0"))
            {
                refused += 1;
            }
        }
        let mut other = proxied(mx, v6(3, 1), "next-64").await;
        let next = other.reply(Duration::from_secs(10)).await;
        drop(held);

        let mut auth = Vec::new();
        let user_net = |host: u16| IpAddr::from([0x2001, 0xdb8, 7, 7, 0, 0, 0, host]);
        let tries = [
            (1, "guess1"),
            (2, "guess2"),
            (3, "guess3"),
            (4, "guess4"),
            (5, PASSWORD),
        ];
        for (host, password) in tries {
            let mut c = proxied(sub, user_net(host), &format!("auth-{host}")).await;
            c.greeting("220").await;
            c.expect("EHLO v6.test", "250").await;
            auth.push(
                c.cmd(
                    &format!("AUTH PLAIN {}", auth_plain(USER, password)),
                    Duration::from_secs(30),
                )
                .await,
            );
        }
        let mut c = proxied(
            sub,
            IpAddr::from([0x2001, 0xdb8, 7, 8, 0, 0, 0, 1]),
            "auth-next-64",
        )
        .await;
        c.greeting("220").await;
        c.expect("EHLO v6.test", "250").await;
        auth.push(
            c.cmd(
                &format!("AUTH PLAIN {}", auth_plain(USER, PASSWORD)),
                Duration::from_secs(30),
            )
            .await,
        );
        (held_ok, refused, next, auth)
    });
    let auth = codes(&auth);
    case.note(format!(
        "3 held, then {refused}/{attempts} others of the /64 got 421; the next /64: {:?}",
        next.as_deref().map(str::trim_end)
    ));
    case.note(format!(
        "AUTH from ::1 to ::4 (wrong), ::5 (right), the next /64 (right): {auth:?}"
    ));
    assert_eq!(held_ok, 3);
    assert_eq!(
        refused, attempts as usize,
        "addresses of one /64 must share maxConnectionsPerIp"
    );
    assert!(
        next.as_deref().is_some_and(|r| r.starts_with("220")),
        "the next /64 is another client: {next:?}"
    );
    assert!(auth[..4].iter().all(|c| c.starts_with("535")), "{auth:?}");
    assert!(
        auth[4].starts_with("454 4.7.0"),
        "the 5th address of the /64 is the same client, over its failure budget: {auth:?}"
    );
    assert!(auth[5].starts_with("235"), "{auth:?}");
    case.pass(format!(
        "the /64 counted as one client: {refused} connections refused, AUTH locked for the prefix, the next /64 served"
    ));
}

/// R2-3b (AUTH floods): every AUTH ran an argon2 check (about 19 MiB) on the blocking pool
/// with no cap, and every failure for a made-up user name was written to the shared failure
/// stream, whose stream-wide cap then pushed real users' failures out (ending their lockout
/// early). Now checks run at most `auth.maxConcurrentVerifications` at a time (`454 4.7.0`
/// after `auth.verificationWait`), made-up names are never written, and the stream has only
/// per-subject limits.
#[test]
fn auth_flood_is_queued_and_invented_names_never_reach_the_shared_counter() {
    let flood = scale(12u8, 60);
    let case = Case::begin(
        "R2-3b",
        &format!(
            "{flood} AUTH at once over implicit TLS from 127.0.1.x with maxConcurrentVerifications 1, verificationWait 50ms; then {flood} made-up user names from as many addresses, after alice@example.test was locked (failuresPerUser 3)"
        ),
        "some AUTHs get 454 4.7.0 at once instead of queueing without bound; the failure stream holds one subject (alice's), alice stays locked (454 for the right password), the stream has no stream-wide message cap",
    );
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        c["auth"] = json!({
            "maxConcurrentVerifications": 1,
            "verificationWait": "50ms",
            "failuresPerIpPerMinute": 100,
            "maxFailuresPerSession": 10,
            "failuresPerUser": 3,
            "failuresPerUserWindow": "1h",
            "sharedCounterTimeout": "10s",
        });
    });
    let rt = runtime();
    let addr = node.ports.implicit_tls;
    let failure_stream = format!("{}_AUTH_FAILURES", node.stream);
    let url = nats.url();
    let (burst, locked, subjects, max_msgs) = rt.block_on(async {
        let js =
            async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect to NATS"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while js.get_stream(&failure_stream).await.is_err() {
            assert!(Instant::now() < deadline, "no failure stream");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A burst of simultaneous logins (right and wrong passwords alike).
        let tasks: Vec<_> = (0..flood)
            .map(|i| {
                tokio::spawn(async move {
                    let user = format!("burst{i}@example.test");
                    auth_session_as(
                        addr,
                        IpAddr::from([127, 0, 1, i + 1]),
                        "burst",
                        &user,
                        &["x"],
                    )
                    .await
                })
            })
            .collect();
        let mut burst = Vec::new();
        for t in tasks {
            burst.extend(t.await.expect("task"));
        }
        // Lock alice (3 failures), then flood with made-up names.
        for i in 0..3u8 {
            auth_session(
                addr,
                IpAddr::from([127, 0, 2, i + 1]),
                "lock-alice",
                &["wrong"],
            )
            .await;
        }
        for i in 0..flood {
            let mut c = SmtpTls::connect_tls(IpAddr::from([127, 0, 3, i + 1]), addr, "made-up")
                .await
                .expect("TLS");
            c.verbose = i == 0;
            c.greeting("220").await;
            c.expect("EHLO flood.test", "250").await;
            let user = format!("nobody{i}@example.test");
            let _ = c
                .cmd(
                    &format!("AUTH PLAIN {}", auth_plain(&user, "x")),
                    Duration::from_secs(30),
                )
                .await;
        }
        let locked = auth_session(
            addr,
            IpAddr::from([127, 0, 4, 1]),
            "alice-right",
            &[PASSWORD],
        )
        .await;
        let mut stream = js.get_stream(&failure_stream).await.expect("stream");
        let max_msgs = stream.info().await.expect("info").config.max_messages;
        use futures::TryStreamExt as _;
        let subjects: Vec<(String, usize)> = stream
            .info_with_subjects(">")
            .await
            .expect("subjects")
            .try_collect()
            .await
            .expect("subjects");
        (burst, locked, subjects, max_msgs)
    });
    let burst = codes(&burst);
    let busy = burst.iter().filter(|c| c.starts_with("454 4.7.0")).count();
    let locked = codes(&locked);
    case.note(format!("burst of {flood}: {busy} got 454 4.7.0: {burst:?}"));
    case.note(format!(
        "failure stream after the made-up names: {} subject(s) {:?}, max_msgs {max_msgs}; alice's right password: {locked:?}",
        subjects.len(),
        subjects.iter().map(|(_, n)| *n).collect::<Vec<_>>()
    ));
    assert!(
        busy >= 1,
        "{flood} simultaneous argon2 checks all ran, none refused for want of a slot: {burst:?}"
    );
    assert!(
        node.counter_with("kubemail_smtp_auth_total", "result=\"busy\"") >= 1.0,
        "busy refusals are counted"
    );
    assert_eq!(
        subjects.len(),
        1,
        "made-up user names were written to the shared failure stream: {subjects:?}"
    );
    assert_eq!(
        max_msgs, -1,
        "a stream-wide cap would evict real users' failures"
    );
    assert!(locked[0].starts_with("454 4.7.0"), "{locked:?}");
    case.pass(format!(
        "{busy}/{flood} refused with 454 while the slot was taken; one subject in the failure stream; alice still locked"
    ));
}

/// R2-4 (forged Authentication-Results): only the first token of the first physical line
/// was compared with our authserv-id, so a folded field, one starting with a comment or a
/// quoted id passed through under our name; and submissions to local recipients were not
/// stripped at all. Now every form RFC 8601 allows is removed, in both directions.
#[test]
fn forged_authres_in_every_form_is_stripped_on_mx_and_submission() {
    let case = Case::begin(
        "R2-4",
        "Authentication-Results / ARC-Authentication-Results claiming mx.example.test: comment first, folded, quoted, with a version, upper case, ARC; over MX and over submission to a local recipient",
        "none of them is left in the queued message; a field of another authserv-id stays",
    );
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |_, _| {});
    let rt = runtime();
    let forged = [
        "Authentication-Results: (trusted) mx.example.test; dmarc=pass",
        "Authentication-Results:\r\n mx.example.test;\r\n\tdkim=pass",
        "Authentication-Results: \"mx.example.test\"; spf=pass",
        "Authentication-Results: mx.example.test 1; dmarc=pass",
        "AUTHENTICATION-RESULTS: MX.EXAMPLE.TEST; dmarc=pass",
        "ARC-Authentication-Results: i=1; mx.example.test; dmarc=pass",
    ];
    let message = |subject: &str| {
        format!(
            "{}\r\nAuthentication-Results: other.test; spf=fail\r\nFrom: <alice@example.test>\r\nTo: <bob@example.test>\r\nSubject: {subject}\r\n\r\nforged results\r\n",
            forged.join("\r\n")
        )
    };
    let (mx_reply, sub_reply) = rt.block_on(async {
        let mut c = SmtpTcp::connect(node.ports.mx, "mx")
            .await
            .expect("connect");
        c.greeting("220").await;
        c.expect("EHLO forger.test", "250").await;
        let mx = c
            .send_mail(
                "a@relay.invalid",
                "bob@example.test",
                &message("AUTHRES-MX"),
            )
            .await;
        let sub = submit(
            node.ports.implicit_tls,
            "bob@example.test",
            &message("AUTHRES-SUB"),
            "submission",
        )
        .await;
        (mx, sub)
    });
    let entries = rt.block_on(node.entries(&nats.url()));
    case.note(format!(
        "MX: {:?}, submission: {:?}; {} entries queued",
        mx_reply.as_deref().map(str::trim_end),
        sub_reply.as_deref().map(str::trim_end),
        entries.len()
    ));
    assert!(mx_reply.as_deref().is_some_and(|r| r.starts_with("250")));
    assert!(sub_reply.as_deref().is_some_and(|r| r.starts_with("250")));
    assert_eq!(entries.len(), 2);
    for e in &entries {
        let text = e.text();
        let header = text.split("\r\n\r\n").next().unwrap_or("");
        let unfolded = header.replace("\r\n ", " ").replace("\r\n\t", " ");
        let left: Vec<&str> = unfolded
            .lines()
            .filter(|l| {
                let lower = l.to_ascii_lowercase();
                lower.contains("authentication-results") && lower.contains("mx.example.test")
            })
            .collect();
        case.note(format!(
            "{}: claims of ours left: {left:?}",
            e.headers
                .get("Kubemail-Direction")
                .map_or("", String::as_str)
        ));
        assert!(left.is_empty(), "forged results survived:\n{header}");
        assert!(
            header.contains("Authentication-Results: other.test; spf=fail"),
            "{header}"
        );
    }
    case.pass("every forged form removed on MX and on submission; the other authserv-id kept");
}

/// R2-5 (DKIM for any local `From:`): submitted mail was signed for whatever domain of ours
/// the `From:` named, so a user of one domain got aligned signatures of every other domain
/// the node serves. Now mail is signed for the user's domain only, and a `From:` (or MAIL
/// FROM) the user may not use is refused; `allowedSenders` narrows or widens that per user.
#[test]
fn dkim_from_of_another_local_domain_is_refused_and_never_signed() {
    let case = Case::begin(
        "R2-5",
        "alice@example.test submits with From: ceo@other.test (a second domain of the node, with its own DKIM key), then with her own From:; MAIL FROM:<bob@example.test> with allowedSenders alice: [alice@example.test]",
        "550 5.7.1 for the other domain's From:, nothing queued for it; her own message signed d=example.test only; 553 5.7.1 for bob's address",
    );
    let nats = Nats::single(NatsOptions::default());
    let examples = kubemail_e2e::hostile::process::smtp_node_dir().join("examples");
    let key = |file: &str| examples.join(file).display().to_string();
    let node = Node::start(&nats.url(), |c, _| {
        c["domains"][0]["dkim"] =
            json!({ "keys": [{ "selector": "dev-rsa", "keyFile": key("dev-dkim-rsa.pem") }] });
        c["domains"][0]["allowedSenders"] = json!({ "alice": ["alice@example.test"] });
        c["domains"].as_array_mut().expect("domains").push(json!({
            "name": "other.test",
            "recipients": ["ceo"],
            "dkim": { "keys": [{ "selector": "dev-ed", "keyFile": key("dev-dkim-ed25519.pem") }] },
        }));
    });
    let rt = runtime();
    let msg = |from: &str, subject: &str| {
        format!(
            "From: {from}\r\nTo: <someone@far.test>\r\nSubject: {subject}\r\nDate: Sat, 28 Nov 2026 00:00:00 +0000\r\n\r\nwire the money\r\n"
        )
    };
    let (foreign, own, mail_from) = rt.block_on(async {
        let foreign = submit(
            node.ports.implicit_tls,
            "someone@far.test",
            &msg("CEO <ceo@other.test>", "DKIM-FOREIGN"),
            "foreign-from",
        )
        .await;
        let own = submit(
            node.ports.implicit_tls,
            "someone@far.test",
            &msg("Alice <alice@example.test>", "DKIM-OWN"),
            "own-from",
        )
        .await;
        let mut c = SmtpTls::connect_tls(ip(1), node.ports.implicit_tls, "mail-from")
            .await
            .expect("TLS");
        c.greeting("220").await;
        c.expect("EHLO alice.test", "250").await;
        c.expect(&format!("AUTH PLAIN {}", auth_plain(USER, PASSWORD)), "235")
            .await;
        let mail_from = c
            .cmd("MAIL FROM:<bob@example.test>", Duration::from_secs(10))
            .await;
        (foreign, own, mail_from)
    });
    let entries = rt.block_on(node.entries(&nats.url()));
    let texts: Vec<String> = entries.iter().map(|e| e.text()).collect();
    let signatures: Vec<String> = texts
        .iter()
        .flat_map(|t| {
            t.split("\r\n\r\n")
                .next()
                .unwrap_or("")
                .replace("\r\n\t", " ")
                .replace("\r\n ", " ")
                .lines()
                .filter(|l| l.starts_with("DKIM-Signature:"))
                .map(|l| {
                    let mut tags: Vec<&str> = l
                        .split(';')
                        .map(str::trim)
                        .filter(|t| t.starts_with("d=") || t.starts_with("s="))
                        .collect();
                    tags.sort_unstable();
                    tags.join(" ")
                })
                .collect::<Vec<_>>()
        })
        .collect();
    case.note(format!(
        "From: ceo@other.test -> {:?}; own From: -> {:?}; MAIL FROM:<bob@example.test> -> {:?}",
        foreign.as_deref().map(str::trim_end),
        own.as_deref().map(str::trim_end),
        mail_from.as_deref().map(str::trim_end)
    ));
    case.note(format!("queued signatures: {signatures:?}"));
    assert!(
        foreign
            .as_deref()
            .is_some_and(|r| r.starts_with("550 5.7.1")),
        "a From: of another domain of ours was accepted: {foreign:?}"
    );
    assert!(
        !texts.iter().any(|t| t.contains("DKIM-FOREIGN")),
        "the message with the foreign From: was queued"
    );
    assert!(
        own.as_deref().is_some_and(|r| r.starts_with("250")),
        "{own:?}"
    );
    assert_eq!(
        signatures,
        ["d=example.test s=dev-rsa"],
        "signed for the user's domain only"
    );
    assert!(
        mail_from
            .as_deref()
            .is_some_and(|r| r.starts_with("553 5.7.1")),
        "allowedSenders must limit MAIL FROM: {mail_from:?}"
    );
    case.pass("foreign From: refused, own message signed d=example.test only, allowedSenders enforced at MAIL");
}

/// R2-6 (PROXY from anyone): a PROXY listener believed the header of any peer, so a client
/// that reached it directly could claim any source address (and with it every per-client
/// limit and log). Now `trustedProxies` is required when `proxyProtocol` is on, and a peer
/// outside it is closed before anything is read or written.
#[test]
fn proxy_untrusted_peer_is_closed_without_a_greeting() {
    let case = Case::begin(
        "R2-6",
        "a PROXY header claiming 203.0.113.9 from 127.0.0.1 to a listener that trusts only 127.0.0.2; the same from 127.0.0.2; a config with proxyProtocol and no trustedProxies",
        "the untrusted peer is closed without a byte and counted (reason untrusted_proxy); the trusted one is greeted; check-config refuses the config",
    );
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        c["listeners"][0]["proxyProtocol"] = json!(true);
        c["listeners"][0]["trustedProxies"] = json!(["127.0.0.2/32"]);
    });
    let rt = runtime();
    let mx = node.ports.mx;
    let (untrusted, closed, trusted) = rt.block_on(async {
        let mut c = SmtpTcp::connect_from(ip(1), mx, "untrusted")
            .await
            .expect("connect");
        let _ = c
            .send(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 25\r\n")
            .await;
        let untrusted = c.reply(Duration::from_secs(5)).await;
        let closed = c.closed(Duration::from_secs(5)).await;
        let mut c = SmtpTcp::connect_from(ip(2), mx, "trusted")
            .await
            .expect("connect");
        c.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 25\r\n")
            .await
            .expect("send");
        let trusted = c.reply(Duration::from_secs(10)).await;
        (untrusted, closed, trusted)
    });
    let refusals = node.counter_with(
        "kubemail_smtp_connections_refused_total",
        "reason=\"untrusted_proxy\"",
    );
    // A config that turns PROXY on without saying whom to trust is an error.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "hostname: mx.example.test\nlisteners:\n  - { name: lb, kind: mx, address: \"127.0.0.1:2525\", proxyProtocol: true }\n",
    )
    .expect("write config");
    let check = std::process::Command::new(kubemail_e2e::hostile::process::smtp_node_binary())
        .arg("check-config")
        .arg(&bad)
        .output()
        .expect("run check-config");
    let check_text = String::from_utf8_lossy(&check.stderr).into_owned()
        + &String::from_utf8_lossy(&check.stdout);
    case.note(format!(
        "untrusted: reply {untrusted:?}, closed {closed}; refusals counted: {refusals}; trusted: {:?}",
        trusted.as_deref().map(str::trim_end)
    ));
    case.note(format!(
        "check-config without trustedProxies: exit {:?}: {}",
        check.status.code(),
        check_text
            .lines()
            .find(|l| l.contains("trustedProxies"))
            .unwrap_or("")
    ));
    assert!(
        untrusted.is_none() && closed,
        "an untrusted peer's PROXY header was read and answered: {untrusted:?}"
    );
    assert_eq!(refusals, 1.0, "the refusal is counted");
    assert!(
        trusted.as_deref().is_some_and(|r| r.starts_with("220")),
        "{trusted:?}"
    );
    assert!(!check.status.success(), "{check_text}");
    assert!(check_text.contains("trustedProxies"), "{check_text}");
    case.pass("untrusted peer closed silently and counted; trusted peer greeted; config without trustedProxies refused");
}

/// R2-7 (junk commands): NOOP, RSET, HELP, VRFY, repeated RCPTs and 452s never counted as
/// errors, so one connection could hold its slot for ever. Now they count towards
/// `maxJunkCommands` (default 100, like Postfix's `smtpd_junk_command_limit`) until a
/// message is accepted; past it: `421 4.7.0` and the connection is closed.
#[test]
fn junk_commands_past_the_limit_close_the_session() {
    let sessions = scale(1usize, 20);
    let case = Case::begin(
        "R2-7",
        &format!(
            "{sessions} session(s) each sending NOOP, RSET, HELP and VRFY in a loop after MAIL and RCPT, with the default limit"
        ),
        "100 junk commands are answered, the 101st gets 421 4.7.0 and the connection closes",
    );
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |_, _| {});
    let rt = runtime();
    let mx = node.ports.mx;
    let results = rt.block_on(async {
        let mut results = Vec::new();
        for s in 0..sessions {
            let mut c = SmtpTcp::connect(mx, &format!("junk-{s}"))
                .await
                .expect("connect");
            c.greeting("220").await;
            c.expect("EHLO junk.test", "250").await;
            c.expect("MAIL FROM:<a@relay.invalid>", "250").await;
            c.expect("RCPT TO:<bob@example.test>", "250").await;
            c.verbose = false;
            let verbs = ["NOOP", "RSET", "HELP", "VRFY bob", "NOOP"];
            let mut answered = 0;
            let mut last = None;
            for i in 0..150 {
                let line = verbs[i % verbs.len()];
                let r = c.cmd(line, Duration::from_secs(10)).await;
                match r.as_deref() {
                    Some(r) if r.starts_with('2') => answered += 1,
                    other => {
                        last = other.map(str::to_owned);
                        break;
                    }
                }
            }
            c.verbose = true;
            let closed = c.closed(Duration::from_secs(5)).await;
            results.push((answered, last, closed));
        }
        results
    });
    for (i, (answered, last, closed)) in results.iter().enumerate() {
        if i == 0 || *answered != 100 {
            case.note(format!(
                "session {i}: {answered} junk commands answered, then {:?}, closed {closed}",
                last.as_deref().map(str::trim_end)
            ));
        }
    }
    for (answered, last, closed) in &results {
        assert_eq!(*answered, 100, "{last:?}");
        assert!(
            last.as_deref().is_some_and(|r| r.starts_with("421 4.7.0")),
            "{last:?}"
        );
        assert!(closed);
    }
    case.pass(format!(
        "{sessions} session(s) closed with 421 4.7.0 after 100 junk commands"
    ));
}

/// R2-9 (NUL in DATA): a message with `<CRLF><NUL>.<CRLF>` was accepted and passed on as it
/// was; a downstream that drops NUL bytes reads `<CRLF>.<CRLF>` there and takes the rest of
/// the message for commands. Now NUL is refused (`554 5.6.0`) or, where the listener says
/// `nulBytes: strip`, removed before the message is queued, and the DATA encoder stuffs a
/// dot behind NUL bytes too.
#[test]
fn nul_in_data_is_refused_or_stripped_and_never_ends_a_message_early() {
    let case = Case::begin(
        "R2-9",
        "DATA (and BDAT) with <CRLF><NUL>.<CRLF> followed by an SMTP command, on the default MX listener and on a nulBytes: strip listener whose domain delivers to smtp-sink",
        "554 5.6.0 and nothing queued by default, for DATA and BDAT; with strip, 250, and the sink receives the whole message, text after the dot line included, without NUL",
    );
    let sink_port = free_port_on(&[ip(1)]);
    let sink = Sink::start(ip(1), sink_port, &[]);
    let knot = Knot::start(&[]);
    let nats = Nats::single(NatsOptions::default());
    let strip_port = free_port();
    let node = Node::start(&nats.url(), |c, p| {
        enable_delivery(c, &knot.addr(), sink_port, true);
        c["domains"][0]["inbound"] =
            json!({ "host": "127.0.0.1", "port": sink_port, "protocol": "smtp", "tls": "none" });
        c["listeners"]
            .as_array_mut()
            .expect("listeners")
            .push(json!({
                "name": "mxstrip", "kind": "mx",
                "address": SocketAddr::new(p.mx.ip(), strip_port).to_string(),
                "nulBytes": "strip",
            }));
    });
    let rt = runtime();
    let text = |subject: &str| {
        format!(
            "From: <a@relay.invalid>\r\nTo: <bob@example.test>\r\nSubject: {subject}\r\n\r\nbefore\r\n\0.\r\nMAIL FROM:<smuggled@relay.invalid>\r\nafter-the-nul-dot\r\n"
        )
    };
    let strip_addr = SocketAddr::new(node.ports.mx.ip(), strip_port);
    let (refused, stripped, queued_after_refusal) = rt.block_on(async {
        let mut c = SmtpTcp::connect(node.ports.mx, "default")
            .await
            .expect("connect");
        c.greeting("220").await;
        c.expect("EHLO nul.test", "250").await;
        let refused = c
            .send_mail("a@relay.invalid", "bob@example.test", &text("NUL-REFUSED"))
            .await;
        // BDAT is no way around it.
        let chunk = "Subject: NUL-BDAT\r\n\r\nx\r\n\0.\r\ny\r\n";
        c.expect("MAIL FROM:<a@relay.invalid>", "250").await;
        c.expect("RCPT TO:<bob@example.test>", "250").await;
        c.send(format!("BDAT {} LAST\r\n{chunk}", chunk.len()).as_bytes())
            .await
            .expect("BDAT");
        let bdat = c.reply(Duration::from_secs(30)).await;
        assert!(
            bdat.as_deref().is_some_and(|r| r.starts_with("554 5.6.0")),
            "BDAT with NUL: {bdat:?}"
        );
        let queued = node.entries(&nats.url()).await.len();
        let mut c = SmtpTcp::connect(strip_addr, "strip")
            .await
            .expect("connect");
        c.greeting("220").await;
        c.expect("EHLO nul.test", "250").await;
        let stripped = c
            .send_mail("a@relay.invalid", "bob@example.test", &text("NUL-STRIPPED"))
            .await;
        (refused, stripped, queued)
    });
    case.note(format!(
        "default listener: {:?} ({queued_after_refusal} queued); strip listener: {:?}",
        refused.as_deref().map(str::trim_end),
        stripped.as_deref().map(str::trim_end)
    ));
    assert!(
        refused
            .as_deref()
            .is_some_and(|r| r.starts_with("554 5.6.0")),
        "a message with NUL was accepted: {refused:?}"
    );
    assert_eq!(queued_after_refusal, 0);
    assert!(
        stripped.as_deref().is_some_and(|r| r.starts_with("250")),
        "{stripped:?}"
    );
    let delivered = wait_until(
        Duration::from_secs(60),
        "the stripped message at the sink",
        || {
            sink.transactions()
                .into_iter()
                .find(|t| t.contains("NUL-STRIPPED"))
        },
    );
    case.note(format!(
        "at the sink: {}",
        delivered
            .lines()
            .skip_while(|l| !l.starts_with("before"))
            .take(4)
            .collect::<Vec<_>>()
            .join(" | ")
    ));
    assert!(
        delivered.contains("after-the-nul-dot"),
        "the message ended early downstream:\n{delivered}"
    );
    assert!(!delivered.contains('\0'), "a NUL reached the sink");
    case.pass(
        "refused with 554 5.6.0 by default; stripped and delivered whole with nulBytes: strip",
    );
}

/// R2-10 (SSRF through IPv6 forms of IPv4): the address policy judged the IPv4 address
/// inside `::ffff:a.b.c.d` and `64:ff9b::/96`, but not inside IPv4-compatible `::a.b.c.d`,
/// the local-use NAT64 prefix `64:ff9b:1::/48`, 6to4 `2002::/16` or Teredo `2001::/32`, all
/// of which a translator or tunnel turns into the embedded address.
#[test]
fn ssrf_aaaa_records_embedding_loopback_and_private_ipv4_are_refused() {
    let case = Case::begin(
        "R2-10",
        "MX hosts whose only address is an AAAA record embedding 127.0.0.1 or 10.0.0.1: ::127.0.0.1, 64:ff9b:1::7f00:1, 2002:7f00:1::1, 2001:0:7f00:1::1 (Teredo server), 2001:0:4136:e378:8000:63bf:f5ff:fffe (Teredo client 10.0.0.1)",
        "the policy refuses every one (logged as a blocked range); nothing delivered; the library check agrees",
    );
    let aaaa = [
        "::127.0.0.1",
        "64:ff9b:1::7f00:1",
        "2002:7f00:1::1",
        "2001:0:7f00:1::1",
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    ];
    let zones: Vec<(String, String)> = aaaa
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (
                format!("embed{i}.test"),
                format!("@ IN MX 10 mx\nmx IN AAAA {a}\n"),
            )
        })
        .collect();
    let zone_refs: Vec<(&str, String)> =
        zones.iter().map(|(o, r)| (o.as_str(), r.clone())).collect();
    let knot = Knot::start(&zone_refs);
    let nats = Nats::single(NatsOptions::default());
    let port = free_port();
    let node = Node::start(&nats.url(), |c, _| {
        enable_delivery(c, &knot.addr(), port, false)
    });
    let rt = runtime();
    for (i, _) in aaaa.iter().enumerate() {
        let reply = rt.block_on(submit(
            node.ports.implicit_tls,
            &format!("victim@embed{i}.test"),
            &message(&format!("EMBED-{i}")),
            &format!("submit-embed{i}"),
        ));
        assert!(
            reply.as_deref().is_some_and(|r| r.starts_with("250")),
            "{reply:?}"
        );
    }
    let refused = wait_until(
        Duration::from_secs(60),
        "a policy refusal for every embedded address",
        || {
            let log = node.log();
            let refused: Vec<&str> = aaaa
                .iter()
                .copied()
                .filter(|a| {
                    let shown = a.parse::<IpAddr>().expect("ip").to_string();
                    log.lines()
                        .any(|l| l.contains("blocked range") && l.contains(&shown))
                })
                .collect();
            (refused.len() == aaaa.len()).then_some(refused)
        },
    );
    case.note(format!("refused by the policy: {refused:?}"));
    assert_eq!(node.delivered(), 0.0);
    use kubemail_smtp_node::delivery::address_policy::AddressPolicy;
    let policy = AddressPolicy::new(&[], &[]).expect("policy");
    let allowed: Vec<&str> = aaaa
        .iter()
        .copied()
        .filter(|a| policy.check(a.parse().expect("ip")).is_ok())
        .collect();
    assert!(
        allowed.is_empty(),
        "the policy lets these through: {allowed:?}"
    );
    case.pass(format!(
        "all {} embedded forms refused before any connection",
        aaaa.len()
    ));
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

/// How a client of the memory cases sends its message.
enum Pace {
    /// As fast as the node reads.
    Steady,
    /// The first 20 KiB at about 1 KiB/s (twice the minimum data rate), then steady.
    Trickle,
    /// The first 6 MiB, then a wait (at most 20 s) until the count reaches the total, then
    /// the rest: every client that far before any goes on.
    Together(Arc<AtomicUsize>, usize),
}

/// Sends `message` once at `pace`. Returns the reply to the final dot (`None`: connection
/// lost).
async fn send_big(mx: SocketAddr, label: &str, message: &str, pace: Pace) -> Option<String> {
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
    match pace {
        Pace::Steady => {}
        Pace::Trickle => {
            for _ in 0..20 {
                let (head, tail) = rest.split_at(1024);
                c.send_quiet(head).await.ok()?;
                rest = tail;
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
        }
        Pace::Together(arrived, total) => {
            let (head, tail) = rest.split_at(6 << 20);
            for chunk in head.chunks(64 * 1024) {
                c.send_quiet(chunk).await.ok()?;
            }
            rest = tail;
            arrived.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(20);
            while arrived.load(Ordering::SeqCst) < total && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    for chunk in rest.chunks(64 * 1024) {
        c.send_quiet(chunk).await.ok()?;
    }
    c.send_quiet(b".\r\n").await.ok()?;
    c.reply(Duration::from_secs(60)).await
}

/// A node on its own NATS for the memory cases: `maxMessageSize` 8Mi, a message memory
/// budget of `budget_mib` MiB and a wait of `wait` for room in it.
fn budget_node(budget_mib: u64, wait: &str) -> (Nats, Node) {
    let nats = Nats::single(NatsOptions::default());
    let node = Node::start(&nats.url(), |c, _| {
        c["domains"][0]["limits"] = json!({ "maxMessageSize": "8Mi" });
        c["limits"] =
            json!({ "messageBytesInMemory": format!("{budget_mib}Mi"), "memoryWait": wait });
        c["nats"]["publishTimeout"] = json!("10s");
    });
    (nats, node)
}

/// The results of `tasks`, in order.
async fn joined<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

/// Notes the node's peak RSS and asserts it stayed below the RSS at start plus the budget
/// plus `overhead_mib`.
fn assert_peak_rss(case: &Case, rss_before: u64, hwm: u64, budget_mib: u64, overhead_mib: u64) {
    case.note(format!(
        "node RSS {} MiB at start, peak (VmHWM) {} MiB; limit {} MiB",
        rss_before / 1024,
        hwm / 1024,
        (rss_before / 1024) + budget_mib + overhead_mib
    ));
    assert!(
        hwm <= rss_before + (budget_mib + overhead_mib) * 1024,
        "peak RSS {} MiB exceeds start {} MiB + budget {budget_mib} MiB + {overhead_mib} MiB",
        hwm / 1024,
        rss_before / 1024
    );
}

/// Asserts that each of `messages` (`Subject: MEM-<k>`) was stored once, as our `Received`
/// field followed by the message octet for octet.
fn assert_stored_intact(
    stored: &std::collections::HashMap<String, Vec<Vec<u8>>>,
    messages: &[Arc<String>],
) {
    for (k, message) in messages.iter().enumerate() {
        let copies = stored.get(&format!("MEM-{k}")).cloned().unwrap_or_default();
        assert_eq!(copies.len(), 1, "MEM-{k}: one stored copy");
        let original = message.as_bytes();
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
            .and_then(|r| kubemail_queue::split_body_ref(r))
        {
            use tokio::io::AsyncReadExt as _;
            let store = js.get_object_store(bucket).await.expect("body bucket");
            let mut object = store.get(name).await.expect("body object");
            // The payload (empty, or the header section of a body stored while it arrived),
            // then the object.
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

/// Hostile finding 2, bodies stored while they arrive: eight near-limit messages in flight at
/// once against a budget that holds two of them whole. Each client sends 6 MiB, waits until
/// all eight have, then sends the rest: held whole, six of them would wait and get `452`;
/// with their bodies going to the object store as they arrive, each session holds its header
/// section and a few chunks, and all eight are accepted at the first try.
#[test]
fn near_limit_messages_in_flight_together_are_stored_while_they_arrive() {
    const BUDGET_MIB: u64 = 16;
    const OVERHEAD_MIB: u64 = 64;
    const CLIENTS: usize = 8;
    let case = Case::begin(
        "MEM-03",
        "8 concurrent 7.5 MiB messages (maxMessageSize 8Mi), all 6 MiB into their data at the same moment, against limits.messageBytesInMemory 16Mi (twice the largest message, the least allowed) and memoryWait 1s",
        "every message gets 250 at its first try; peak RSS (VmHWM) stays below the RSS at start + 16 MiB + 64 MiB; every 250 is in the stream octet for octet, its body in the object store",
    );
    let (nats, node) = budget_node(BUDGET_MIB, "1s");
    let rt = runtime();
    let rss_before = node.rss_kib();
    let mx = node.ports.mx;
    let messages: Vec<Arc<String>> = (0..CLIENTS)
        .map(|k| Arc::new(big_message(k, 7_500_000)))
        .collect();
    let arrived = Arc::new(AtomicUsize::new(0));
    let results: Vec<Option<String>> = rt.block_on(async {
        joined(
            messages
                .iter()
                .enumerate()
                .map(|(k, m)| {
                    let m = m.clone();
                    let pace = Pace::Together(arrived.clone(), CLIENTS);
                    tokio::spawn(async move { send_big(mx, &format!("mem3-{k}"), &m, pace).await })
                })
                .collect(),
        )
        .await
    });
    let hwm = vm_hwm_kib(node.pid());
    case.note(format!(
        "{} of {CLIENTS} clients 6 MiB in at once; replies {:?}",
        arrived.load(Ordering::SeqCst),
        results
            .iter()
            .map(|r| r
                .as_deref()
                .map_or("lost".to_owned(), |r| r.chars().take(9).collect()))
            .collect::<Vec<_>>()
    ));
    for (k, reply) in results.iter().enumerate() {
        assert!(
            reply.as_deref().is_some_and(|r| r.starts_with("250")),
            "MEM-{k}: {reply:?}"
        );
    }
    assert_eq!(
        arrived.load(Ordering::SeqCst),
        CLIENTS,
        "all in flight together"
    );
    assert_peak_rss(&case, rss_before, hwm, BUDGET_MIB, OVERHEAD_MIB);
    let stored = rt.block_on(stored_messages(&nats.url(), &node));
    assert_stored_intact(&stored, &messages);
    case.pass(format!(
        "all {CLIENTS} accepted at the first try, in flight together; peak RSS {} MiB (start {} MiB, budget {BUDGET_MIB} MiB)",
        hwm / 1024,
        rss_before / 1024
    ));
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
    let (nats, node) = budget_node(BUDGET_MIB, "3s");
    let rt = runtime();
    let rss_before = node.rss_kib();
    let mx = node.ports.mx;
    let clients = 20usize;
    let messages: Vec<Arc<String>> = (0..clients)
        .map(|k| Arc::new(big_message(k, 7_500_000)))
        .collect();
    let started = Instant::now();
    let results = rt.block_on(async {
        joined(
            messages
                .iter()
                .enumerate()
                .map(|(k, m)| {
                    let m = m.clone();
                    tokio::spawn(async move {
                        let mut replies = Vec::new();
                        let deadline = Instant::now() + Duration::from_secs(180);
                        // A refused client tries again, as real ones do; bounded in time.
                        while Instant::now() < deadline {
                            let pace = if k < 4 && replies.is_empty() {
                                Pace::Trickle
                            } else {
                                Pace::Steady
                            };
                            let reply = send_big(mx, &format!("mem-{k}"), &m, pace)
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
                .collect(),
        )
        .await
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
    assert!(
        refusals
            .iter()
            .all(|r| r.starts_with("452 4.3.1") || r.starts_with("lost")),
        "only 452 4.3.1 while waiting for memory: {refusals:?}"
    );
    assert_peak_rss(&case, rss_before, hwm, BUDGET_MIB, OVERHEAD_MIB);
    for (k, replies) in &results {
        assert!(
            replies.last().is_some_and(|r| r.starts_with("250")),
            "MEM-{k} never accepted: {replies:?}"
        );
    }
    let stored = rt.block_on(stored_messages(&nats.url(), &node));
    assert_stored_intact(&stored, &messages);
    case.pass(format!(
        "peak RSS {} MiB (start {} MiB, budget {BUDGET_MIB} MiB); all {clients} accepted intact after {} refusals",
        hwm / 1024,
        rss_before / 1024,
        refusals.len()
    ));
}
