//! Recipient verification at RCPT time for catch-all domains (`recipientVerification`): the
//! domain takes every local part, so only its inbound target knows who exists. Each new
//! recipient is probed there — connect, LHLO/EHLO (STARTTLS as the target is configured),
//! `MAIL FROM:<>`, `RCPT TO:<recipient>`, `RSET`, `QUIT`, no data — and the answer decides
//! the RCPT: accepted, refused (`550 5.1.1`), or, when the target cannot say now, `451
//! 4.4.3` so that the sender retries. Mail is never accepted only to be bounced later
//! (backscatter to forged senders), which is what Postfix's `reject_unverified_recipient` and
//! Exim's callout verification do.
//!
//! Answers are cached per address, positive for `positiveTtl` and negative for `negativeTtl`;
//! temporary failures are not cached. The cache holds at most `cacheSize` answers and forgets
//! the oldest first; at most `maxConcurrent` probes run at once, and a RCPT that waits longer
//! than `timeout` for one is answered `451`. A flood of made-up recipients therefore costs
//! the target at most `maxConcurrent` connections at a time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Semaphore;

use crate::config::{
    ClientTimeouts, ForwardProtocol, HumanDuration, InboundTarget, InboundTls,
    RecipientVerificationConfig,
};
use crate::delivery::client::{ConnectOptions, Protocol, SmtpClient, TlsPolicy};
use crate::delivery::policy::Check;
use crate::delivery::relay::resolve_configured;
use crate::delivery::tls::ClientTls;
use crate::metrics::ResultLabels;

/// What the inbound target said about a recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It takes mail for the recipient.
    Exists,
    /// It refused the recipient permanently.
    Unknown,
    /// It could not say now (temporary reply, timeout, unreachable, too many probes).
    TryLater(String),
}

/// The verifier every session of the node shares.
pub struct RecipientCheck {
    config: RecipientVerificationConfig,
    hostname: String,
    tls: ClientTls,
    slots: Semaphore,
    cache: Mutex<Cache>,
    /// Checks by result (`recipient_checks`).
    results: Family<ResultLabels, Counter>,
}

impl RecipientCheck {
    /// A verifier with `config`; `hostname` is what the probes say in LHLO/EHLO; checks are
    /// counted in `results`.
    pub fn new(
        config: RecipientVerificationConfig,
        hostname: &str,
        tls: ClientTls,
        results: Family<ResultLabels, Counter>,
    ) -> Self {
        let capacity = config.cache_size.max(1) as usize;
        Self {
            slots: Semaphore::new(config.max_concurrent.max(1) as usize),
            config,
            hostname: hostname.to_owned(),
            tls,
            cache: Mutex::new(Cache::new(capacity)),
            results,
        }
    }

    fn count(&self, result: &'static str) {
        self.results.get_or_create(&ResultLabels { result }).inc();
    }

    /// Whether the recipients of a catch-all domain are probed.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Asks `target` (or the cache) about `recipient`, a full address.
    pub async fn verify(&self, target: &InboundTarget, recipient: &str) -> Verdict {
        let key = recipient.to_ascii_lowercase();
        if let Some(exists) = self.cached(&key) {
            self.count(if exists {
                "cached_exists"
            } else {
                "cached_unknown"
            });
            return if exists {
                Verdict::Exists
            } else {
                Verdict::Unknown
            };
        }
        let limit = self.config.timeout.0;
        let verdict = match tokio::time::timeout(limit, self.slots.acquire()).await {
            Ok(Ok(_slot)) => {
                match tokio::time::timeout(limit, probe(self, target, recipient)).await {
                    Ok(v) => v,
                    Err(_) => Verdict::TryLater(format!("no answer within {limit:?}")),
                }
            }
            _ => Verdict::TryLater("too many recipient checks in progress".to_owned()),
        };
        match &verdict {
            Verdict::Exists => {
                self.count("exists");
                self.remember(key, true, self.config.positive_ttl.0);
            }
            Verdict::Unknown => {
                self.count("unknown");
                self.remember(key, false, self.config.negative_ttl.0);
            }
            Verdict::TryLater(why) => {
                self.count("try_later");
                tracing::info!(host = %target.host, reason = %why, "recipient check failed temporarily");
            }
        }
        verdict
    }

    fn cached(&self, key: &str) -> Option<bool> {
        self.lock().get(key, Instant::now())
    }

    fn remember(&self, key: String, exists: bool, ttl: Duration) {
        self.lock().insert(key, exists, Instant::now() + ttl);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One probe, from connect to QUIT.
async fn probe(check: &RecipientCheck, target: &InboundTarget, recipient: &str) -> Verdict {
    let targets = match resolve_configured(&target.host, target.port).await {
        Ok(t) if !t.is_empty() => t,
        Ok(_) => return Verdict::TryLater(format!("{} has no address", target.host)),
        Err(e) => return Verdict::TryLater(format!("cannot resolve {}: {e}", target.host)),
    };
    let (tls, verify_certificate) = match target.tls {
        InboundTls::Opportunistic => (TlsPolicy::Opportunistic, false),
        InboundTls::Required => (TlsPolicy::Required, true),
        InboundTls::None => (TlsPolicy::None, false),
    };
    let protocol = match target.protocol {
        ForwardProtocol::Lmtp => Protocol::Lmtp,
        ForwardProtocol::Smtp => Protocol::Smtp,
    };
    let timeouts = probe_timeouts(check.config.timeout.0);
    let mut last = String::new();
    for t in &targets {
        let options = ConnectOptions {
            target: t,
            helo: &check.hostname,
            protocol,
            tls,
            verify_certificate,
            credentials: None,
            timeouts: &timeouts,
            tls_config: &check.tls,
            // A configured target: no MTA-STS or DANE policy applies.
            check: &Check::None,
            enforce: false,
            next_hop: &target.host,
        };
        let mut client = match SmtpClient::connect(&options).await {
            Ok(c) => c,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let reply = client.probe_recipient(recipient).await;
        client.quit().await;
        match reply {
            Ok(r) if (200..300).contains(&r.code) => return Verdict::Exists,
            Ok(r) if r.is_permanent() => return Verdict::Unknown,
            Ok(r) => return Verdict::TryLater(format!("{}: {}", t.host, r.text())),
            Err(e) => last = e.to_string(),
        }
    }
    Verdict::TryLater(last)
}

/// Every phase of a probe gets the whole probe's time (the caller bounds the total).
fn probe_timeouts(limit: Duration) -> ClientTimeouts {
    let t = HumanDuration(limit);
    ClientTimeouts {
        connect: t,
        greeting: t,
        command: t,
        mail: t,
        rcpt: t,
        data_init: t,
        data_block: t,
        data_termination: t,
    }
}

/// Remembered answers, oldest forgotten first beyond `capacity`.
struct Cache {
    capacity: usize,
    answers: HashMap<String, (bool, Instant)>,
    order: VecDeque<String>,
}

impl Cache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            answers: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&mut self, key: &str, now: Instant) -> Option<bool> {
        match self.answers.get(key) {
            Some((exists, until)) if *until > now => Some(*exists),
            Some(_) => {
                self.answers.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: String, exists: bool, until: Instant) {
        if self.answers.insert(key.clone(), (exists, until)).is_none() {
            self.order.push_back(key);
        }
        while self.answers.len() > self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.answers.remove(&oldest);
        }
        // Keys dropped on expiry (and the old place of one answered again) stay in `order`
        // until they come up; when it gets long, keep only the newest place of live keys.
        if self.order.len() > 2 * self.capacity {
            let mut seen = HashSet::new();
            let mut kept = VecDeque::with_capacity(self.answers.len());
            for key in self.order.drain(..).rev() {
                if self.answers.contains_key(&key) && seen.insert(key.clone()) {
                    kept.push_front(key);
                }
            }
            self.order = kept;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    /// A scripted LMTP server on loopback: `bob` exists, `busy` gets 451, anyone else 550.
    /// Counts connections.
    async fn backend() -> (InboundTarget, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    write.write_all(b"220 backend LMTP\r\n").await.unwrap();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let upper = line.to_ascii_uppercase();
                        let reply: &[u8] = if upper.starts_with("LHLO") {
                            b"250-backend\r\n250 PIPELINING\r\n"
                        } else if upper.starts_with("RCPT TO:<BOB@") {
                            b"250 2.1.5 ok\r\n"
                        } else if upper.starts_with("RCPT TO:<BUSY@") {
                            b"451 4.3.0 try later\r\n"
                        } else if upper.starts_with("RCPT") {
                            b"550 5.1.1 no such user\r\n"
                        } else if upper.starts_with("QUIT") {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        } else {
                            b"250 ok\r\n"
                        };
                        if write.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let target = InboundTarget {
            host: "127.0.0.1".into(),
            port,
            protocol: ForwardProtocol::Lmtp,
            tls: InboundTls::None,
        };
        (target, connections)
    }

    fn check() -> RecipientCheck {
        RecipientCheck::new(
            RecipientVerificationConfig {
                timeout: HumanDuration::from_secs(5),
                ..RecipientVerificationConfig::default()
            },
            "mx.example.test",
            ClientTls::new(None).unwrap(),
            Family::default(),
        )
    }

    #[tokio::test]
    async fn the_target_decides_and_its_answers_are_cached() {
        let (target, connections) = backend().await;
        let check = check();
        assert_eq!(
            check.verify(&target, "bob@catch.test").await,
            Verdict::Exists
        );
        assert_eq!(
            check.verify(&target, "Nobody@catch.test").await,
            Verdict::Unknown
        );
        assert!(matches!(
            check.verify(&target, "busy@catch.test").await,
            Verdict::TryLater(_)
        ));
        assert_eq!(connections.load(Ordering::Relaxed), 3);
        // Remembered, in any case: no new connection.
        assert_eq!(
            check.verify(&target, "BOB@catch.test").await,
            Verdict::Exists
        );
        assert_eq!(
            check.verify(&target, "nobody@catch.test").await,
            Verdict::Unknown
        );
        assert_eq!(connections.load(Ordering::Relaxed), 3);
        // A temporary failure is not remembered.
        let _ = check.verify(&target, "busy@catch.test").await;
        assert_eq!(connections.load(Ordering::Relaxed), 4);
        let counted = |result| check.results.get_or_create(&ResultLabels { result }).get();
        assert_eq!(
            [
                "exists",
                "unknown",
                "try_later",
                "cached_exists",
                "cached_unknown"
            ]
            .map(counted),
            [1, 1, 2, 1, 1]
        );
    }

    #[tokio::test]
    async fn an_unreachable_target_is_a_temporary_failure() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let target = InboundTarget {
            host: "127.0.0.1".into(),
            port,
            protocol: ForwardProtocol::Smtp,
            tls: InboundTls::Opportunistic,
        };
        assert!(matches!(
            check().verify(&target, "bob@catch.test").await,
            Verdict::TryLater(_)
        ));
    }

    #[test]
    fn cache_expires_answers_and_forgets_the_oldest_beyond_capacity() {
        let mut c = Cache::new(2);
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        c.insert("a@x.test".into(), true, later);
        c.insert("b@x.test".into(), false, later);
        assert_eq!(c.get("a@x.test", t0), Some(true));
        assert_eq!(c.get("b@x.test", t0), Some(false));
        c.insert("c@x.test".into(), true, later);
        assert_eq!(c.get("a@x.test", t0), None, "the oldest went first");
        assert_eq!(c.get("c@x.test", t0), Some(true));
        assert_eq!(c.get("c@x.test", later), None, "expired");
        for i in 0..1000 {
            c.insert(format!("{i}@x.test"), true, later);
            assert!(c.answers.len() <= 2 && c.order.len() <= 4);
        }
        // One address that expires and is answered again, over and over, stays one entry.
        let mut t = later;
        for _ in 0..100 {
            c.insert("again@x.test".into(), true, t + Duration::from_secs(1));
            t += Duration::from_secs(2);
            assert_eq!(c.get("again@x.test", t), None);
            assert!(c.order.len() <= 4, "{}", c.order.len());
        }
    }
}
