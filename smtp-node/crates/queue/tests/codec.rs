//! The queue entry codec: what this version writes is what it and every later version
//! reads (the compatibility fixtures below are the wire format, checked in), and every entry
//! survives a trip through the headers.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use kubemail_queue::{
    Action, AdminState, Direction, EntryError, Notice, QueueEntry, QueueId, SenderAuth, headers,
};
use proptest::prelude::*;

/// Headers as a sorted list, so a failing comparison shows what differs.
fn listing(h: &HeaderMap) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = h
        .iter()
        .map(|(name, values)| {
            (
                name.to_string(),
                values.iter().map(|v| v.as_str().to_owned()).collect(),
            )
        })
        .collect();
    out.sort();
    out
}

fn header_map(fixture: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in fixture {
        h.append(*name, *value);
    }
    h
}

fn at(secs: u64, nanos: u32) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
}

// ---- compatibility: the wire format of this version, literally ----------------------------

/// A submitted message as the SMTP session queues it.
const ACCEPTED: &[(&str, &str)] = &[
    (
        "Nats-Msg-Id",
        "0197c1d2a3b47c5d8e9f0a1b2c3d4e5f.example.com",
    ),
    ("Kubemail-Queue-Id", "0197c1d2a3b47c5d8e9f0a1b2c3d4e5f"),
    ("Kubemail-Mail-From", "<alice@example.com>"),
    (
        "Kubemail-Rcpt-To",
        r#"["carol@remote.example","\"dave smith\"@remote.example","用户@例子.广告"]"#,
    ),
    ("Kubemail-Direction", "outbound"),
    ("Kubemail-Domain", "example.com"),
    ("Kubemail-Accepted-At", "2026-11-27T23:59:01.25Z"),
    ("Kubemail-Message-Id", "<m1@example.com>"),
    (
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ),
    ("Kubemail-Auth-User", "alice@example.com"),
    ("Kubemail-Client-Ip", "2001:db8::7"),
    ("Kubemail-Helo", "laptop.example.com"),
    ("Kubemail-Body-Type", "8BITMIME"),
    ("Kubemail-Smtputf8", "true"),
    ("Kubemail-Dsn-Envid", "ENV+2B1"),
    ("Kubemail-Dsn-Ret", "HDRS"),
    ("Kubemail-Body-Size", "1834"),
];

fn accepted() -> QueueEntry {
    QueueEntry {
        queue_id: QueueId::from("0197c1d2a3b47c5d8e9f0a1b2c3d4e5f".to_owned()),
        mail_from: "alice@example.com".into(),
        recipients: vec![
            "carol@remote.example".into(),
            "\"dave smith\"@remote.example".into(),
            "用户@例子.广告".into(),
        ],
        direction: Direction::Outbound,
        domain: "example.com".into(),
        accepted_at: at(1_795_823_941, 250_000_000),
        message_id: Some("<m1@example.com>".into()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        auth_user: Some("alice@example.com".into()),
        client_ip: Some("2001:db8::7".parse().unwrap()),
        helo: Some("laptop.example.com".into()),
        sender_auth: None,
        eight_bit: true,
        smtputf8: true,
        dsn_envid: Some("ENV+2B1".into()),
        dsn_ret: Some("HDRS".into()),
        body_ref: None,
        body_size: Some(1834),
        require_tls: false,
        tls_optional: false,
        attempts: 0,
        not_before: None,
        last_error: None,
        delay_warned: false,
        admin: Default::default(),
    }
}

/// An inbound message with a stored body after its second failed attempt.
const RETRY: &[(&str, &str)] = &[
    ("Nats-Msg-Id", "q42.example.com.a2"),
    ("Kubemail-Queue-Id", "q42"),
    ("Kubemail-Mail-From", "<>"),
    ("Kubemail-Rcpt-To", r#"["postmaster@example.com"]"#),
    ("Kubemail-Direction", "inbound"),
    ("Kubemail-Domain", "example.com"),
    ("Kubemail-Accepted-At", "2026-11-27T23:59:01Z"),
    ("Kubemail-Client-Ip", "192.0.2.1"),
    ("Kubemail-Helo", "mx.remote.example"),
    ("Kubemail-Body-Ref", "KUBEMAIL_BODIES/q42.example.com"),
    ("Kubemail-Body-Size", "20971520"),
    ("Kubemail-Require-Tls", "true"),
    ("Kubemail-Attempts", "2"),
    ("Kubemail-Not-Before", "2026-11-28T00:09:01Z"),
    (
        "Kubemail-Last-Error",
        "mx.example.net: 451 4.7.1 greylisted, try again later",
    ),
    ("Kubemail-Delay-Warned", "true"),
];

fn retry() -> QueueEntry {
    QueueEntry {
        queue_id: QueueId::from("q42".to_owned()),
        mail_from: String::new(),
        recipients: vec!["postmaster@example.com".into()],
        direction: Direction::Inbound,
        domain: "example.com".into(),
        accepted_at: at(1_795_823_941, 0),
        message_id: None,
        traceparent: None,
        auth_user: None,
        client_ip: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
        helo: Some("mx.remote.example".into()),
        sender_auth: None,
        eight_bit: false,
        smtputf8: false,
        dsn_envid: None,
        dsn_ret: None,
        body_ref: Some(kubemail_queue::body_ref(
            kubemail_queue::DEFAULT_BODY_BUCKET,
            "q42.example.com",
        )),
        body_size: Some(20 << 20),
        require_tls: true,
        tls_optional: false,
        attempts: 2,
        not_before: Some(at(1_795_824_541, 0)),
        last_error: Some("mx.example.net: 451 4.7.1 greylisted, try again later".into()),
        delay_warned: true,
        admin: Default::default(),
    }
}

#[test]
fn an_accepted_entry_reads_and_writes_exactly_as_checked_in() {
    let fixture = header_map(ACCEPTED);
    let entry = QueueEntry::from_headers(&fixture).unwrap();
    assert_eq!(entry, accepted());
    assert_eq!(entry.msg_id(), ACCEPTED[0].1);
    assert_eq!(entry.body_object_name(), ACCEPTED[0].1);
    assert_eq!(
        listing(&entry.to_headers(&entry.msg_id())),
        listing(&fixture)
    );
}

#[test]
fn a_retry_reads_and_writes_exactly_as_checked_in() {
    let fixture = header_map(RETRY);
    let entry = QueueEntry::from_headers(&fixture).unwrap();
    assert_eq!(entry, retry());
    assert_eq!(entry.msg_id(), "q42.example.com.a2");
    assert_eq!(
        kubemail_queue::split_body_ref(entry.body_ref.as_deref().unwrap()),
        Some(("KUBEMAIL_BODIES", "q42.example.com"))
    );
    assert_eq!(
        listing(&entry.to_headers(&entry.msg_id())),
        listing(&fixture)
    );
}

#[test]
fn message_ids_of_retries_and_notices() {
    let mut e = retry();
    assert_eq!(e.notice_msg_id(Notice::Bounce), "q42.example.com.bounce2");
    assert_eq!(e.notice_msg_id(Notice::Delay), "q42.example.com.delay2");
    e.attempts = 0;
    assert_eq!(e.msg_id(), "q42.example.com");
    e.attempts = 3;
    e.domain = "Example.COM".into();
    assert_eq!(
        e.msg_id(),
        "q42.example.com.a3",
        "the domain is lower-cased"
    );
}

#[test]
fn operators_actions_and_their_state_travel_in_the_entry() {
    let mut e = retry();
    assert_eq!(
        e.action_msg_id(Action::Retry, 77),
        "q42.example.com.a2.retry77"
    );
    assert_eq!(
        e.action_msg_id(Action::Hold, 77),
        "q42.example.com.a2.hold77"
    );
    assert_eq!(e.notice_msg_id(Notice::Cancel), "q42.example.com.cancel2");
    e.admin = AdminState {
        attempt_log: Vec::new(),
        suspended: Duration::from_secs(3600),
        paused_by: Some("mail.remote-421".into()),
        held_at: Some(at(1_795_830_000, 0)),
        hold_reason: Some("customer asked".into()),
        cancelled: true,
    };
    let h = e.to_headers(&e.msg_id());
    assert_eq!(h.get(headers::SUSPENDED).unwrap().as_str(), "3600");
    assert_eq!(
        h.get(headers::PAUSED_BY).unwrap().as_str(),
        "mail.remote-421"
    );
    assert_eq!(
        h.get(headers::HELD_AT).unwrap().as_str(),
        "2026-11-28T01:40:00Z"
    );
    assert_eq!(h.get(headers::CANCEL).unwrap().as_str(), "bounce");
    assert_eq!(QueueEntry::from_headers(&h).unwrap(), e);
    // The attempt log keeps the newest ten, one line each.
    for i in 0..12u64 {
        e.admin.log_attempt(
            at(1_795_830_000 + i, 0),
            &format!("451 4.7.1 try {i}\r\nlater"),
        );
    }
    assert_eq!(e.admin.attempt_log.len(), 10);
    assert_eq!(e.admin.attempt_log[0].reply, "451 4.7.1 try 2??later");
    let h = e.to_headers(&e.msg_id());
    assert!(
        h.get(headers::ATTEMPT_LOG)
            .unwrap()
            .as_str()
            .starts_with(r#"[{"at":"2026-11-28T01:40:02Z","reply":"451 4.7.1 try 2??later"}"#)
    );
    assert_eq!(QueueEntry::from_headers(&h).unwrap(), e);
    // Held and paused time extends the lifetime.
    let lifetime = Duration::from_secs(5 * 86400);
    assert_eq!(
        e.expires_at(lifetime),
        e.accepted_at + lifetime + Duration::from_secs(3600)
    );
}

#[test]
fn absent_and_empty_optional_headers_read_as_none_and_are_not_written() {
    let mut h = header_map(RETRY);
    h.insert(headers::HELO, "");
    h.insert(headers::LAST_ERROR, "   ");
    let e = QueueEntry::from_headers(&h).unwrap();
    assert_eq!(e.helo, None);
    assert_eq!(e.last_error, None);

    let mut e = retry();
    e.helo = Some(String::new());
    e.last_error = Some(" \t ".into());
    e.body_size = None;
    let written = e.to_headers(&e.msg_id());
    assert!(written.get(headers::HELO).is_none());
    assert!(written.get(headers::LAST_ERROR).is_none());
    assert!(written.get(headers::BODY_SIZE).is_none());
}

#[test]
fn the_sender_authentication_verdict_travels_and_unknown_methods_never_pass() {
    // Entries written before the header existed have no verdict: not authenticated.
    assert_eq!(retry().sender_auth, None);
    for (value, spf, dkim) in [
        ("spf", true, false),
        ("dkim", false, true),
        ("spf,dkim", true, true),
        ("none", false, false),
        ("arc, DKIM", false, true),
        ("bimi", false, false),
    ] {
        let mut h = header_map(RETRY);
        h.insert(headers::SENDER_AUTH, value);
        let e = QueueEntry::from_headers(&h).unwrap();
        assert_eq!(e.sender_auth, Some(SenderAuth { spf, dkim }), "{value}");
        assert_eq!(e.sender_auth.is_some_and(SenderAuth::verified), spf || dkim);
        let written = e.to_headers(&e.msg_id());
        let back = QueueEntry::from_headers(&written).unwrap();
        assert_eq!(back.sender_auth, e.sender_auth, "{value}");
    }
    let mut e = retry();
    e.sender_auth = Some(SenderAuth {
        spf: false,
        dkim: true,
    });
    assert_eq!(
        e.to_headers(&e.msg_id())
            .get(headers::SENDER_AUTH)
            .map(|v| v.as_str().to_owned()),
        Some("dkim".to_owned())
    );
}

#[test]
fn control_characters_never_reach_the_wire() {
    let mut e = accepted();
    // U+0085 is a C1 control; U+00A2 starts with the same byte (0xC2) and is not one.
    e.helo = Some("client\r\nInjected: x\u{85}\u{a2}".into());
    e.last_error = Some("451 4.3.0 try\r\nlater".into());
    e.recipients = vec!["a\u{7f}b@x.example".into(), "c\nd@x.example".into()];
    e.mail_from = "evil\r\n@x.example".into();
    e.domain = "Example.COM".into();
    let h = e.to_headers("id\r\n");
    for (name, values) in listing(&h) {
        for v in values {
            assert!(!v.chars().any(char::is_control), "{name}: {v:?}");
        }
    }
    let back = QueueEntry::from_headers(&h).unwrap();
    assert_eq!(back.helo.as_deref(), Some("client??Injected: x?\u{a2}"));
    assert_eq!(back.last_error.as_deref(), Some("451 4.3.0 try??later"));
    assert_eq!(back.recipients, ["a?b@x.example", "c?d@x.example"]);
    assert_eq!(back.mail_from, "evil??@x.example");
    assert_eq!(back.domain, "example.com");
}

#[test]
fn refuses_incomplete_entries() {
    let mut h = HeaderMap::new();
    assert_eq!(
        QueueEntry::from_headers(&h).unwrap_err(),
        EntryError::Missing(headers::QUEUE_ID)
    );
    h.insert(headers::QUEUE_ID, "q");
    h.insert(headers::MAIL_FROM, "<>");
    assert_eq!(
        QueueEntry::from_headers(&h).unwrap_err(),
        EntryError::Missing(headers::RCPT_TO)
    );
    h.insert(headers::RCPT_TO, "[\"b@x.test\", \"\\\"a b\\\"@x.test\"]");
    h.insert(headers::DIRECTION, "sideways");
    assert!(matches!(
        QueueEntry::from_headers(&h).unwrap_err(),
        EntryError::Invalid { .. }
    ));
    h.insert(headers::DIRECTION, "inbound");
    h.insert(headers::DOMAIN, "x.test");
    h.insert(headers::ACCEPTED_AT, "yesterday");
    assert!(QueueEntry::from_headers(&h).is_err());
    h.insert(headers::ACCEPTED_AT, "2026-11-27T23:59:01Z");
    let e = QueueEntry::from_headers(&h).unwrap();
    assert!(e.is_null_sender());
    assert_eq!(e.recipients, ["b@x.test", "\"a b\"@x.test"]);
    h.insert(headers::ATTEMPTS, "many");
    assert!(matches!(
        QueueEntry::from_headers(&h).unwrap_err(),
        EntryError::Invalid {
            name: headers::ATTEMPTS,
            ..
        }
    ));
    h.insert(headers::ATTEMPTS, "1");
    h.insert(headers::NOT_BEFORE, "soon");
    assert!(matches!(
        QueueEntry::from_headers(&h).unwrap_err(),
        EntryError::Invalid {
            name: headers::NOT_BEFORE,
            ..
        }
    ));
    h.insert(headers::NOT_BEFORE, "2026-11-28T00:00:00Z");
    // Entries written by hand may list recipients as repeated `<addr>` values.
    h.insert(headers::RCPT_TO, "<legacy@x.test>");
    h.append(headers::RCPT_TO, "<second@x.test>");
    assert_eq!(
        QueueEntry::from_headers(&h).unwrap().recipients,
        ["legacy@x.test", "second@x.test"]
    );
    h.insert(headers::RCPT_TO, "[not json");
    assert!(QueueEntry::from_headers(&h).is_err());
}

// ---- round trip over arbitrary entries ----------------------------------------------------

/// Text as it can travel in a header: no control characters, no surrounding white space,
/// not empty; any other Unicode.
fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        any::<char>().prop_filter("no control", |c| !c.is_control()),
        1..40,
    )
    .prop_map(String::from_iter)
    .prop_filter("trimmed, not empty", |s| !s.is_empty() && s.trim() == s)
}

/// A lower-case LDH domain name.
fn domain() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..5)
        .prop_map(|labels| labels.join("."))
}

/// An address: any local part (UTF-8, quoted, with spaces) at a domain.
fn address() -> impl Strategy<Value = String> {
    let local = prop_oneof![
        "[a-z0-9._+-]{1,20}",
        "\"[a-z ]{1,10}\"",
        proptest::collection::vec(
            any::<char>().prop_filter("no control", |c| !c.is_control()),
            1..20
        )
        .prop_map(String::from_iter),
    ];
    (local, domain()).prop_map(|(l, d)| format!("{l}@{d}"))
}

/// Any time RFC 3339 can express from 1970 on, to the nanosecond.
fn time() -> impl Strategy<Value = SystemTime> {
    (0u64..253_402_300_800, 0u32..1_000_000_000).prop_map(|(s, n)| at(s, n))
}

fn entry() -> impl Strategy<Value = QueueEntry> {
    let envelope = (
        prop_oneof!["[0-9a-f]{32}", text()],
        prop_oneof![Just(String::new()), address()],
        proptest::collection::vec(address(), 1..150),
        prop_oneof![Just(Direction::Inbound), Just(Direction::Outbound)],
        domain(),
        time(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(any::<IpAddr>()),
        proptest::option::of(text()),
    );
    let rest = (
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(any::<u64>()),
        (any::<bool>(), any::<bool>()),
        any::<u32>(),
        proptest::option::of(time()),
        proptest::option::of(text()),
        any::<bool>(),
        proptest::option::of((any::<bool>(), any::<bool>())),
    );
    let admin = (
        0u64..10_000_000,
        proptest::option::of(text()),
        proptest::option::of(time()),
        proptest::option::of(text()),
        any::<bool>(),
    )
        .prop_map(
            |(suspended, paused_by, held_at, hold_reason, cancelled)| AdminState {
                attempt_log: Vec::new(),
                suspended: Duration::from_secs(suspended),
                paused_by,
                held_at,
                hold_reason,
                cancelled,
            },
        );
    (envelope, rest, admin).prop_map(
        |(
            (
                queue_id,
                mail_from,
                recipients,
                direction,
                domain,
                accepted_at,
                message_id,
                traceparent,
                auth_user,
                client_ip,
                helo,
            ),
            (
                eight_bit,
                smtputf8,
                dsn_envid,
                dsn_ret,
                body_ref,
                body_size,
                (require_tls, tls_optional),
                attempts,
                not_before,
                last_error,
                delay_warned,
                sender_auth,
            ),
            admin,
        )| QueueEntry {
            queue_id: QueueId::from(queue_id),
            mail_from,
            recipients,
            direction,
            domain,
            accepted_at,
            message_id,
            traceparent,
            auth_user,
            client_ip,
            helo,
            sender_auth: sender_auth.map(|(spf, dkim)| SenderAuth { spf, dkim }),
            eight_bit,
            smtputf8,
            dsn_envid,
            dsn_ret,
            body_ref,
            body_size,
            require_tls,
            tls_optional,
            attempts,
            not_before,
            last_error,
            delay_warned,
            admin,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn every_entry_survives_its_headers(e in entry()) {
        let h = e.to_headers(&e.msg_id());
        prop_assert_eq!(QueueEntry::from_headers(&h).unwrap(), e.clone());
        prop_assert_eq!(h.get(headers::NATS_MSG_ID).unwrap().as_str(), e.msg_id());
    }

    /// Whatever an entry holds (control characters, white space, upper case), one trip
    /// through the headers gives an entry that then travels unchanged.
    #[test]
    fn one_trip_is_enough_for_any_entry(
        e in entry(),
        junk in proptest::collection::vec(any::<String>(), 5),
    ) {
        let mut e = e;
        e.helo = Some(junk[0].clone());
        e.last_error = Some(junk[1].clone());
        e.message_id = Some(format!(" {} ", junk[2]));
        e.recipients.push(format!("{}@x.example", junk[3]));
        e.mail_from = junk[4].clone();
        e.domain = e.domain.to_ascii_uppercase();
        let h = e.to_headers(&e.msg_id());
        let once = QueueEntry::from_headers(&h).unwrap();
        prop_assert_eq!(listing(&once.to_headers(&once.msg_id())), listing(&h));
        prop_assert_eq!(QueueEntry::from_headers(&once.to_headers(&once.msg_id())).unwrap(), once);
    }
}
