//! SMTP TLS reporting (RFC 8460): every policy outcome of an outbound session is recorded,
//! and once a day one node sends each recipient domain that asks for it (`_smtp._tls` TXT,
//! `rua=mailto:`) the aggregate report of the previous UTC day.
//!
//! * **Results** go to the JetStream stream [`kubemail_queue::TLSRPT_STREAM`], one message per
//!   session outcome on `kubemail.tlsrpt.<sending domain>.<day>.<recipient domain>`
//!   ([`kubemail_queue::tlsrpt_subject`]), so every node's sessions add up and a sending
//!   domain's results are reachable only under its own subjects. They are kept three days.
//! * **Reports**: every `reports.checkInterval` each node looks at the previous day; the first
//!   to create the claim `<sending domain>.<day>` in [`kubemail_queue::TLSRPT_CLAIMS_BUCKET`]
//!   aggregates the day's results per recipient domain and policy and queues one report mail
//!   per `mailto:` address: a `multipart/report; report-type="tlsrpt"` message with the gzip'd
//!   JSON (RFC 8460 4.4, 5.3), from the sending domain with the null sender, DKIM-signed like
//!   a DSN, through the ordinary queue. The clock is a [`Clock`], so tests (and drills, with
//!   `smtp-node --clock-start`) can move to the next day.
//! * **Metrics**: `kubemail_smtp_tls_policy_results_total{policy, result}` and
//!   `kubemail_smtp_tls_reports_total{result}`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, kv, stream};
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{PolicyType, ReportPolicy, ResultType};
use crate::clock::Clock;
use crate::config::TlsRptConfig;
use crate::dkim::DkimSigner;
use crate::dns::Resolver;
use crate::queue::{Direction, QueueEntry, QueueId};

/// Most results read for one day's report of one sending domain.
const MAX_RESULTS_PER_DAY: u64 = 1_000_000;

/// One recorded session outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionResult {
    pub policy: ReportPolicy,
    pub result: ResultType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sending_mta_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving_mx_hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason_code: Option<String>,
}

/// The UTC day of `t` as `YYYYMMDD`.
pub fn day_of(t: SystemTime) -> String {
    let d = OffsetDateTime::from(t).date();
    format!("{:04}{:02}{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Records results and sends reports.
pub struct TlsRpt {
    config: TlsRptConfig,
    js: jetstream::Context,
    clock: Arc<dyn Clock>,
    stream: OnceCell<Option<stream::Stream>>,
    claims: OnceCell<Option<kv::Store>>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// What a report needs besides the results.
pub struct ReportContext<'a> {
    /// Our host name: the report's submitter.
    pub hostname: &'a str,
    pub subject_prefix: &'a str,
    pub resolver: &'a dyn Resolver,
    pub signer: Option<&'a DkimSigner>,
}

impl TlsRpt {
    pub fn new(
        config: TlsRptConfig,
        js: jetstream::Context,
        clock: Arc<dyn Clock>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            config,
            js,
            clock,
            stream: OnceCell::new(),
            claims: OnceCell::new(),
            metrics,
        }
    }

    /// Counts and records one session outcome of `sending_domain` (never fails the delivery).
    pub async fn record(&self, sending_domain: &str, result: SessionResult) {
        self.metrics.delivery.count_tls_result(
            match result.policy.policy_type {
                PolicyType::Sts => "sts",
                PolicyType::Tlsa => "tlsa",
                PolicyType::NoPolicyFound => "no-policy-found",
            },
            result.result.as_str(),
        );
        if !self.config.enabled || self.stream().await.is_none() {
            return;
        }
        let subject = kubemail_queue::tlsrpt_subject(
            sending_domain,
            &day_of(self.clock.now()),
            &result.policy.policy_domain,
        );
        let Ok(json) = serde_json::to_vec(&result) else {
            return;
        };
        match self.js.publish(subject, Bytes::from(json)).await {
            Ok(ack) => {
                if let Err(error) = ack.await {
                    tracing::warn!(%error, "cannot record a TLS-RPT result");
                }
            }
            Err(error) => tracing::warn!(%error, "cannot record a TLS-RPT result"),
        }
    }

    /// Every `checkInterval`, sends the previous day's reports of the node's current
    /// `domains` (once per cluster), until `stop`.
    pub async fn run(
        self: Arc<Self>,
        ctx: impl Fn() -> ReportContextOwned + Send + Sync + 'static,
        domains: impl Fn() -> Vec<String> + Send + Sync + 'static,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if !self.config.enabled {
            return;
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.config.check_interval.0) => {}
            }
            let owned = ctx();
            let day = day_of(self.clock.now() - Duration::from_secs(86_400));
            for domain in &domains() {
                match self.send_day(&owned.borrow(), domain, &day).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(%domain, %day, reports = n, "queued TLS-RPT reports"),
                    Err(error) => {
                        tracing::warn!(%domain, %day, %error, "cannot send TLS-RPT reports")
                    }
                }
            }
        }
    }

    /// Sends `sending_domain`'s reports of `day` (`YYYYMMDD`) unless another node claimed
    /// them; returns how many report mails were queued.
    pub async fn send_day(
        &self,
        ctx: &ReportContext<'_>,
        sending_domain: &str,
        day: &str,
    ) -> Result<usize, ReportError> {
        let claims = self.claims().await.ok_or(ReportError::Unavailable)?;
        let key = kubemail_queue::tlsrpt_claim_key(sending_domain, day);
        if claims
            .create(&key, Bytes::from_static(b"claimed"))
            .await
            .is_err()
        {
            // Another node has it (or had it): reports are sent once.
            return Ok(0);
        }
        match self.build_and_queue(ctx, sending_domain, day).await {
            Ok(n) => {
                let _ = claims.put(&key, Bytes::from(format!("sent {n}"))).await;
                Ok(n)
            }
            Err(e) => {
                // Let the next pass (on any node) try again.
                let _ = claims.delete(&key).await;
                self.metrics.delivery.count_tls_report("failed");
                Err(e)
            }
        }
    }

    async fn build_and_queue(
        &self,
        ctx: &ReportContext<'_>,
        sending_domain: &str,
        day: &str,
    ) -> Result<usize, ReportError> {
        let results = self.results(sending_domain, day).await?;
        let mut by_domain: BTreeMap<String, Vec<SessionResult>> = BTreeMap::new();
        for r in results {
            by_domain
                .entry(r.policy.policy_domain.clone())
                .or_default()
                .push(r);
        }
        let mut queued = 0;
        for (policy_domain, results) in by_domain {
            let rua = match ctx
                .resolver
                .txt(&format!("_smtp._tls.{policy_domain}"))
                .await
            {
                Ok(records) => rua_mailto(&records),
                Err(_) => Vec::new(),
            };
            if rua.is_empty() {
                continue;
            }
            let report_id = format!("{day}.{}@{}", QueueId::new(), ctx.hostname);
            let json = report_json(
                &ReportMeta {
                    organization: self
                        .config
                        .organization_name
                        .clone()
                        .unwrap_or_else(|| sending_domain.to_owned()),
                    contact: self
                        .config
                        .contact_info
                        .clone()
                        .unwrap_or_else(|| format!("postmaster@{sending_domain}")),
                    report_id: report_id.clone(),
                    day: day.to_owned(),
                },
                &results,
            )?;
            for to in &rua {
                let mail = report_mail(
                    ctx,
                    sending_domain,
                    &policy_domain,
                    day,
                    &report_id,
                    to,
                    &json,
                    self.clock.now(),
                )?;
                queue_report(&self.js, ctx, sending_domain, to, mail, &report_id).await?;
                self.metrics.delivery.count_tls_report("sent");
                queued += 1;
            }
        }
        Ok(queued)
    }

    /// Every result of `sending_domain` on `day`.
    pub async fn results(
        &self,
        sending_domain: &str,
        day: &str,
    ) -> Result<Vec<SessionResult>, ReportError> {
        let stream = self.stream().await.ok_or(ReportError::Unavailable)?;
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: kubemail_queue::tlsrpt_day_filter(sending_domain, day),
                ..Default::default()
            })
            .await
            .map_err(|e| ReportError::Read(e.to_string()))?;
        let pending = consumer
            .info()
            .await
            .map_err(|e| ReportError::Read(e.to_string()))?
            .num_pending
            .min(MAX_RESULTS_PER_DAY);
        let mut out = Vec::new();
        if pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| ReportError::Read(e.to_string()))?;
        while (out.len() as u64) < pending {
            let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .map_err(|_| ReportError::Read("timed out reading results".to_owned()))?;
            let Some(message) = next else { break };
            let message = message.map_err(|e| ReportError::Read(e.to_string()))?;
            match serde_json::from_slice::<SessionResult>(&message.payload) {
                Ok(r) => out.push(r),
                Err(error) => tracing::warn!(%error, "skipping an unreadable TLS-RPT result"),
            }
        }
        Ok(out)
    }

    async fn stream(&self) -> Option<&stream::Stream> {
        self.stream
            .get_or_init(|| async {
                let config = kubemail_queue::streams::tlsrpt_stream_config(1);
                match self.js.get_or_create_stream(config).await {
                    Ok(s) => Some(s),
                    Err(error) => {
                        tracing::warn!(%error, "no TLS-RPT results stream; results are only counted");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    async fn claims(&self) -> Option<&kv::Store> {
        self.claims
            .get_or_init(|| async {
                let bucket = kubemail_queue::TLSRPT_CLAIMS_BUCKET;
                match self.js.get_key_value(bucket).await {
                    Ok(s) => Some(s),
                    Err(_) => self
                        .js
                        .create_key_value(kubemail_queue::streams::tlsrpt_claims_config(1))
                        .await
                        .inspect_err(|error| tracing::warn!(%error, "no TLS-RPT claims bucket"))
                        .ok(),
                }
            })
            .await
            .as_ref()
    }
}

/// A [`ReportContext`] with owned parts, for the background task.
pub struct ReportContextOwned {
    pub hostname: String,
    pub subject_prefix: String,
    pub resolver: Arc<dyn Resolver>,
    pub signer: Option<Arc<DkimSigner>>,
}

impl ReportContextOwned {
    pub fn borrow(&self) -> ReportContext<'_> {
        ReportContext {
            hostname: &self.hostname,
            subject_prefix: &self.subject_prefix,
            resolver: self.resolver.as_ref(),
            signer: self.signer.as_deref(),
        }
    }
}

/// Why reports could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the TLS-RPT stream or claims bucket is not available")]
    Unavailable,
    #[error("cannot read the TLS-RPT results: {0}")]
    Read(String),
    #[error("cannot build the report: {0}")]
    Build(String),
    #[error("cannot queue the report: {0}")]
    Queue(String),
}

/// The report's identification.
pub struct ReportMeta {
    pub organization: String,
    pub contact: String,
    pub report_id: String,
    /// `YYYYMMDD`.
    pub day: String,
}

/// The RFC 8460 4.4 JSON report of `results` (one recipient domain), policies in a stable
/// order, failure details grouped by what they have in common.
pub fn report_json(meta: &ReportMeta, results: &[SessionResult]) -> Result<Vec<u8>, ReportError> {
    let d = &meta.day;
    let date = format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..8]);
    #[derive(Default)]
    struct Agg {
        success: u64,
        failure: u64,
        details: BTreeMap<(String, String, String, String, String), u64>,
    }
    let mut policies: Vec<(ReportPolicy, Agg)> = Vec::new();
    for r in results {
        let idx = match policies.iter().position(|(p, _)| *p == r.policy) {
            Some(i) => i,
            None => {
                policies.push((r.policy.clone(), Agg::default()));
                policies.len() - 1
            }
        };
        let agg = &mut policies[idx].1;
        if r.result == ResultType::Success {
            agg.success += 1;
        } else {
            agg.failure += 1;
            let key = (
                r.result.as_str().to_owned(),
                r.sending_mta_ip.clone().unwrap_or_default(),
                r.receiving_mx_hostname.clone().unwrap_or_default(),
                r.receiving_ip.clone().unwrap_or_default(),
                r.failure_reason_code.clone().unwrap_or_default(),
            );
            *agg.details.entry(key).or_default() += 1;
        }
    }
    let policies: Vec<serde_json::Value> = policies
        .into_iter()
        .map(|(p, agg)| {
            let mut policy = json!({
                "policy-type": p.policy_type,
                "policy-domain": p.policy_domain,
            });
            if !p.policy_string.is_empty() {
                policy["policy-string"] = json!(p.policy_string);
            }
            if !p.mx_host.is_empty() {
                policy["mx-host"] = json!(p.mx_host);
            }
            let details: Vec<serde_json::Value> = agg
                .details
                .into_iter()
                .map(|((result, sending, host, ip, reason), count)| {
                    let mut d = json!({ "result-type": result, "failed-session-count": count });
                    for (key, value) in [
                        ("sending-mta-ip", sending),
                        ("receiving-mx-hostname", host),
                        ("receiving-ip", ip),
                        ("failure-reason-code", reason),
                    ] {
                        if !value.is_empty() {
                            d[key] = json!(value);
                        }
                    }
                    d
                })
                .collect();
            let mut entry = json!({
                "policy": policy,
                "summary": {
                    "total-successful-session-count": agg.success,
                    "total-failure-session-count": agg.failure,
                },
            });
            if !details.is_empty() {
                entry["failure-details"] = json!(details);
            }
            entry
        })
        .collect();
    serde_json::to_vec_pretty(&json!({
        "organization-name": meta.organization,
        "date-range": {
            "start-datetime": format!("{date}T00:00:00Z"),
            "end-datetime": format!("{date}T23:59:59Z"),
        },
        "contact-info": meta.contact,
        "report-id": meta.report_id,
        "policies": policies,
    }))
    .map_err(|e| ReportError::Build(e.to_string()))
}

/// The `mailto:` addresses of a `_smtp._tls` record set (RFC 8460 3): exactly one record
/// starting with `v=TLSRPTv1`.
pub fn rua_mailto(records: &[String]) -> Vec<String> {
    let rpt: Vec<&String> = records
        .iter()
        .filter(|r| r.starts_with("v=TLSRPTv1"))
        .collect();
    let [record] = rpt.as_slice() else {
        return Vec::new();
    };
    record
        .split(';')
        .map(str::trim)
        .filter_map(|f| f.strip_prefix("rua="))
        .flat_map(|v| v.split(','))
        .filter_map(|u| u.trim().strip_prefix("mailto:"))
        .map(|a| a.split('?').next().unwrap_or(a).to_owned())
        .filter(|a| a.contains('@') && !a.contains(['<', '>', '\r', '\n', ' ']))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn report_mail(
    ctx: &ReportContext<'_>,
    sending_domain: &str,
    policy_domain: &str,
    day: &str,
    report_id: &str,
    to: &str,
    json: &[u8],
    now: SystemTime,
) -> Result<Vec<u8>, ReportError> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(json)
        .map_err(|e| ReportError::Build(e.to_string()))?;
    let gz = gz.finish().map_err(|e| ReportError::Build(e.to_string()))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(gz);
    let wrapped: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    let submitter = ctx.hostname;
    let start = unix_day_start(day);
    let filename = format!(
        "{submitter}!{policy_domain}!{start}!{}!{}.json.gz",
        start + 86_399,
        QueueId::new()
    );
    let boundary = format!("tlsrpt-{}", QueueId::new());
    let mut m = String::new();
    m.push_str(&format!(
        "From: TLS reports <tlsrpt-noreply@{sending_domain}>\r\n"
    ));
    m.push_str(&format!("To: <{to}>\r\n"));
    m.push_str(&format!(
        "Subject: Report Domain: {policy_domain} Submitter: {submitter} Report-ID: <{report_id}>\r\n"
    ));
    m.push_str(&format!("Date: {}\r\n", crate::message::rfc5322_date(now)));
    m.push_str(&format!(
        "Message-ID: {}\r\n",
        crate::message::new_message_id(submitter)
    ));
    m.push_str(&format!("TLS-Report-Domain: {policy_domain}\r\n"));
    m.push_str(&format!("TLS-Report-Submitter: {submitter}\r\n"));
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThis is an aggregate TLS report (RFC 8460) from {submitter} about mail from {sending_domain} to {policy_domain}.\r\n\r\n"
    ));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: application/tlsrpt+gzip\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"{filename}\"\r\n\r\n{}\r\n--{boundary}--\r\n",
        wrapped.join("\r\n")
    ));
    let mut message = m.into_bytes();
    if let Some(signer) = ctx.signer {
        match signer.sign_for(&message, sending_domain) {
            Ok(Some(headers)) => {
                let mut signed = headers.into_bytes();
                signed.extend_from_slice(&message);
                message = signed;
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot DKIM-sign the TLS report; sending it unsigned")
            }
        }
    }
    Ok(message)
}

/// Unix seconds of the start of `day` (`YYYYMMDD`), UTC.
fn unix_day_start(day: &str) -> i64 {
    let parse =
        |r: std::ops::Range<usize>| day.get(r).and_then(|s| s.parse::<i32>().ok()).unwrap_or(1);
    let month = time::Month::try_from(u8::try_from(parse(4..6)).unwrap_or(1))
        .unwrap_or(time::Month::January);
    time::Date::from_calendar_date(parse(0..4), month, u8::try_from(parse(6..8)).unwrap_or(1))
        .map(|d| d.midnight().assume_utc().unix_timestamp())
        .unwrap_or(0)
}

/// Queues a report like a DSN: an outbound entry with the null sender on the sending domain's
/// subject; its `Nats-Msg-Id` derives from the report id, so a repeated publish is a no-op.
async fn queue_report(
    js: &jetstream::Context,
    ctx: &ReportContext<'_>,
    sending_domain: &str,
    to: &str,
    message: Vec<u8>,
    report_id: &str,
) -> Result<(), ReportError> {
    let entry = QueueEntry {
        body_size: Some(message.len() as u64),
        ..QueueEntry::new(
            QueueId::new(),
            String::new(),
            vec![to.to_owned()],
            Direction::Outbound,
            sending_domain.to_owned(),
            SystemTime::now(),
        )
    };
    let msg_id = format!("tlsrpt.{report_id}.{to}");
    let subject = kubemail_queue::subject(ctx.subject_prefix, sending_domain);
    js.publish_with_headers(subject, entry.to_headers(&msg_id), Bytes::from(message))
        .await
        .map_err(|e| ReportError::Queue(e.to_string()))?
        .await
        .map_err(|e| ReportError::Queue(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn result(kind: PolicyType, result: ResultType, host: &str) -> SessionResult {
        SessionResult {
            policy: ReportPolicy {
                policy_type: kind,
                policy_string: vec!["version: STSv1".into(), "mode: testing".into()],
                policy_domain: "remote.test".into(),
                mx_host: vec!["mx.remote.test".into()],
            },
            result,
            sending_mta_ip: None,
            receiving_mx_hostname: Some(host.into()),
            receiving_ip: Some("192.0.2.1".into()),
            failure_reason_code: None,
        }
    }

    #[test]
    fn the_report_counts_sessions_per_policy_and_groups_failures() {
        let results = vec![
            result(PolicyType::Sts, ResultType::Success, "mx.remote.test"),
            result(PolicyType::Sts, ResultType::Success, "mx.remote.test"),
            result(
                PolicyType::Sts,
                ResultType::CertificateHostMismatch,
                "mx.remote.test",
            ),
            result(
                PolicyType::Sts,
                ResultType::CertificateHostMismatch,
                "mx.remote.test",
            ),
            result(
                PolicyType::Sts,
                ResultType::StarttlsNotSupported,
                "mx2.remote.test",
            ),
        ];
        let meta = ReportMeta {
            organization: "example.test".into(),
            contact: "postmaster@example.test".into(),
            report_id: "r1".into(),
            day: "20261127".into(),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&report_json(&meta, &results).unwrap()).unwrap();
        assert_eq!(v["date-range"]["start-datetime"], "2026-11-27T00:00:00Z");
        assert_eq!(v["date-range"]["end-datetime"], "2026-11-27T23:59:59Z");
        let p = &v["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert_eq!(p["summary"]["total-successful-session-count"], 2);
        assert_eq!(p["summary"]["total-failure-session-count"], 3);
        let details = p["failure-details"].as_array().unwrap();
        assert_eq!(details.len(), 2);
        assert_eq!(details[0]["result-type"], "certificate-host-mismatch");
        assert_eq!(details[0]["failed-session-count"], 2);
    }

    #[test]
    fn rua_takes_mailto_of_the_one_tlsrpt_record() {
        let r = |v: &[&str]| rua_mailto(&v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            r(&["v=TLSRPTv1; rua=mailto:tls@remote.test,https://r.test/x"]),
            ["tls@remote.test"]
        );
        assert!(
            r(&[
                "v=TLSRPTv1; rua=mailto:a@x.test",
                "v=TLSRPTv1; rua=mailto:b@x.test"
            ])
            .is_empty()
        );
        assert!(r(&["v=spf1 -all"]).is_empty());
        assert_eq!(
            day_of(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_823_941)),
            "20261127"
        );
        assert_eq!(unix_day_start("20261127"), 1_795_737_600);
    }
}
