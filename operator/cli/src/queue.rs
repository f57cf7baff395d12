//! `kubectl kubemail queue ...`: each subcommand on top of `kubemail-queue-admin`, with
//! table, JSON and YAML output written as entries arrive (a page, or with `--limit 0` the
//! whole queue, never held in memory).

use std::io::{IsTerminal as _, Write};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use kubemail_config::{NodeConfig, RetryConfig};
use kubemail_queue::rfc3339;
use kubemail_queue_admin::actions::{Kind, Outcome, Result_, Summary};
use kubemail_queue_admin::stats::DestinationStats;
use kubemail_queue_admin::{Listed, Queue};
use serde::Serialize;

use crate::args::{ActionArgs, ConnectArgs, DeleteArgs, ListArgs, Output, ShowArgs, StatsArgs};

/// Label of the operator's node ConfigMaps (the MailDomain they belong to) and the key of
/// the node config in them (operator `controller::mail_domain::names`).
const DOMAIN_LABEL: &str = "kubemail.io/maildomain";
const NODE_CONFIG_KEY: &str = "node.yaml";
/// Planned attempts `queue show` lists.
const PLANNED: usize = 8;

/// One entry as the user sees it (JSON/YAML field names).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryView {
    pub queue_id: String,
    pub domain: String,
    pub state: &'static str,
    pub sequence: u64,
    pub subject: String,
    pub from: String,
    pub recipients: Vec<String>,
    pub accepted_at: String,
    pub age_seconds: u64,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_reason: Option<String>,
    #[serde(skip_serializing_if = "is_zero")]
    pub suspended_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl EntryView {
    pub fn of(l: &Listed, now: SystemTime) -> Self {
        let e = &l.entry;
        Self {
            queue_id: e.queue_id.to_string(),
            domain: e.domain.clone(),
            state: l.state(now).as_str(),
            sequence: l.sequence,
            subject: l.subject.clone(),
            from: format!("<{}>", e.mail_from),
            recipients: e.recipients.clone(),
            accepted_at: rfc3339(e.accepted_at),
            age_seconds: now
                .duration_since(e.accepted_at)
                .unwrap_or_default()
                .as_secs(),
            attempts: e.attempts,
            next_attempt: e.not_before.filter(|t| *t > now).map(rfc3339),
            last_error: e.last_error.clone(),
            paused_by: e.admin.paused_by.clone(),
            held_at: e.admin.held_at.map(rfc3339),
            hold_reason: e.admin.hold_reason.clone(),
            suspended_seconds: e.admin.suspended.as_secs(),
            message_id: e.message_id.clone(),
            trace_id: e
                .traceparent
                .as_deref()
                .and_then(|t| t.split('-').nth(1))
                .map(str::to_owned),
            size: e.body_size,
        }
    }
}

/// `queue list`.
pub async fn list(queue: &Queue, args: &ListArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let mut entries = queue.scan(args.after, args.filter.to_filter(&[])).await?;
    let mut printer = ListPrinter::start(args.output, out)?;
    let mut shown = 0usize;
    let mut last = None;
    while let Some(l) = entries.try_next().await? {
        if args.limit > 0 && shown == args.limit {
            // One more exists: the page has a successor.
            printer.finish(last)?;
            return Ok(());
        }
        printer.item(&EntryView::of(&l, now))?;
        last = Some(l.sequence);
        shown += 1;
    }
    printer.finish(None)
}

/// Writes entries as they come: a table row, or an element of the JSON/YAML `items`.
struct ListPrinter<'a, W: Write> {
    output: Output,
    out: &'a mut W,
    count: usize,
}

impl<'a, W: Write> ListPrinter<'a, W> {
    fn start(output: Output, out: &'a mut W) -> anyhow::Result<Self> {
        match output {
            Output::Table => writeln!(
                out,
                "{:<32}  {:<20}  {:<9}  {:<28}  {:<32}  {:>6}  {:>4}  {:>6}  LAST ERROR",
                "QUEUE ID", "DOMAIN", "STATE", "FROM", "TO", "AGE", "TRY", "NEXT"
            )?,
            Output::Wide => writeln!(
                out,
                "{:>8}  {:<32}  {:<20}  {:<9}  {:<28}  {:<40}  {:>6}  {:>4}  {:>6}  {:<20}  LAST ERROR",
                "SEQ",
                "QUEUE ID",
                "DOMAIN",
                "STATE",
                "FROM",
                "TO",
                "AGE",
                "TRY",
                "NEXT",
                "PAUSED/HELD"
            )?,
            Output::Json => write!(
                out,
                "{{\"apiVersion\":\"kubemail.io/v1alpha1\",\"kind\":\"QueueEntryList\",\"items\":["
            )?,
            Output::Yaml => writeln!(
                out,
                "apiVersion: kubemail.io/v1alpha1\nkind: QueueEntryList\nitems:"
            )?,
        }
        Ok(Self {
            output,
            out,
            count: 0,
        })
    }

    fn item(&mut self, v: &EntryView) -> anyhow::Result<()> {
        let now = SystemTime::now();
        let to = match v.recipients.as_slice() {
            [] => String::new(),
            [one] => one.clone(),
            [first, rest @ ..] => format!("{first} +{}", rest.len()),
        };
        let next = v
            .next_attempt
            .as_deref()
            .and_then(kubemail_queue::parse_rfc3339)
            .map(|t| short(t.duration_since(now).unwrap_or_default()))
            .unwrap_or_else(|| "-".to_owned());
        let age = short(Duration::from_secs(v.age_seconds));
        let error = v.last_error.as_deref().unwrap_or("");
        match self.output {
            Output::Table => writeln!(
                self.out,
                "{:<32}  {:<20}  {:<9}  {:<28}  {:<32}  {:>6}  {:>4}  {:>6}  {}",
                v.queue_id,
                cut(&v.domain, 20),
                v.state,
                cut(&v.from, 28),
                cut(&to, 32),
                age,
                v.attempts,
                next,
                cut(error, 60)
            )?,
            Output::Wide => writeln!(
                self.out,
                "{:>8}  {:<32}  {:<20}  {:<9}  {:<28}  {:<40}  {:>6}  {:>4}  {:>6}  {:<20}  {}",
                v.sequence,
                v.queue_id,
                cut(&v.domain, 20),
                v.state,
                cut(&v.from, 28),
                cut(&to, 40),
                age,
                v.attempts,
                next,
                cut(
                    v.paused_by
                        .as_deref()
                        .or(v.hold_reason.as_deref())
                        .unwrap_or("-"),
                    20
                ),
                error
            )?,
            Output::Json => {
                if self.count > 0 {
                    write!(self.out, ",")?;
                }
                serde_json::to_writer(&mut *self.out, v)?;
            }
            Output::Yaml => {
                let text = serde_yaml::to_string(v)?;
                for (i, line) in text.lines().enumerate() {
                    let lead = if i == 0 { "- " } else { "  " };
                    writeln!(self.out, "{lead}{line}")?;
                }
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Ends the list; `next` is the sequence to continue after when there is a next page.
    fn finish(self, next: Option<u64>) -> anyhow::Result<()> {
        match self.output {
            Output::Table | Output::Wide => {
                if self.count == 0 {
                    writeln!(self.out, "(no entries)")?;
                }
                if let Some(n) = next {
                    writeln!(self.out, "more entries: --after {n}")?;
                }
            }
            Output::Json => {
                write!(self.out, "]")?;
                if let Some(n) = next {
                    write!(self.out, ",\"next\":{n}")?;
                }
                writeln!(self.out, "}}")?;
            }
            Output::Yaml => {
                if self.count == 0 {
                    writeln!(self.out, "  []")?;
                }
                if let Some(n) = next {
                    writeln!(self.out, "next: {n}")?;
                }
            }
        }
        self.out.flush()?;
        Ok(())
    }
}

/// What `queue show` prints about one entry.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ShowView {
    #[serde(flatten)]
    entry: EntryView,
    attempt_log: Vec<AttemptView>,
    /// The next attempts as planned (without jitter), up to the end of the lifetime.
    #[serde(skip_serializing_if = "Option::is_none")]
    planned_attempts: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_url: Option<String>,
}

#[derive(Debug, Serialize)]
struct AttemptView {
    at: String,
    reply: String,
}

/// `queue show`.
pub async fn show(
    queue: &Queue,
    args: &ShowArgs,
    connect: &ConnectArgs,
    kube: Option<&kube::Client>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let found = queue.find(&args.id).await?;
    if found.is_empty() {
        bail!("no queue entry with id {}", args.id);
    }
    let now = SystemTime::now();
    let mut views = Vec::new();
    for l in &found {
        let retry = retry_config(connect, kube, &l.entry.domain).await;
        let entry = EntryView::of(l, now);
        let lifetime = retry.as_ref().map(|r| {
            if l.entry.is_null_sender() {
                r.bounce_lifetime.0
            } else {
                r.lifetime.0
            }
        });
        let planned = retry.as_ref().map(|r| {
            let next = l.entry.not_before.filter(|t| *t > now).unwrap_or(now);
            r.planned(
                l.entry.accepted_at,
                l.entry.admin.suspended,
                l.entry.attempts,
                next,
                l.entry.is_null_sender(),
                PLANNED,
            )
            .into_iter()
            .map(rfc3339)
            .collect()
        });
        let trace_url = match (&connect.trace_url, &entry.trace_id) {
            (Some(template), Some(id)) => Some(template.replace("{trace_id}", id)),
            _ => None,
        };
        views.push(ShowView {
            attempt_log: l
                .entry
                .admin
                .attempt_log
                .iter()
                .map(|a| AttemptView {
                    at: rfc3339(a.at),
                    reply: a.reply.clone(),
                })
                .collect(),
            planned_attempts: planned,
            expires_at: lifetime.map(|life| rfc3339(l.entry.expires_at(life))),
            trace_url,
            entry,
        });
    }
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&views)?)?,
        Output::Yaml => write!(out, "{}", serde_yaml::to_string(&views)?)?,
        Output::Table | Output::Wide => {
            for v in &views {
                describe(v, out)?;
            }
        }
    }
    Ok(())
}

fn describe(v: &ShowView, out: &mut impl Write) -> anyhow::Result<()> {
    let e = &v.entry;
    writeln!(out, "Queue ID:      {}", e.queue_id)?;
    writeln!(out, "MailDomain:    {}", e.domain)?;
    writeln!(out, "State:         {}", e.state)?;
    writeln!(
        out,
        "Stream:        {} (sequence {})",
        e.subject, e.sequence
    )?;
    writeln!(out, "From:          {}", e.from)?;
    writeln!(out, "To:            {}", e.recipients.join(", "))?;
    if let Some(m) = &e.message_id {
        writeln!(out, "Message-ID:    {m}")?;
    }
    writeln!(
        out,
        "Accepted:      {} ({} ago)",
        e.accepted_at,
        short(Duration::from_secs(e.age_seconds))
    )?;
    if let Some(size) = e.size {
        writeln!(out, "Size:          {size} bytes")?;
    }
    writeln!(out, "Attempts:      {}", e.attempts)?;
    writeln!(
        out,
        "Next attempt:  {}",
        e.next_attempt.as_deref().unwrap_or("now")
    )?;
    if let Some(p) = &e.paused_by {
        writeln!(out, "Paused by:     {p}")?;
    }
    if let Some(h) = &e.held_at {
        writeln!(
            out,
            "Held since:    {h} ({})",
            e.hold_reason.as_deref().unwrap_or("no reason given")
        )?;
    }
    if e.suspended_seconds > 0 {
        writeln!(
            out,
            "Held/paused:   {} (not counted towards the lifetime)",
            short(Duration::from_secs(e.suspended_seconds))
        )?;
    }
    if let Some(x) = &v.expires_at {
        writeln!(out, "Expires:       {x}")?;
    }
    if let Some(t) = &e.trace_id {
        writeln!(
            out,
            "Trace:         {}",
            v.trace_url.as_deref().unwrap_or(t)
        )?;
    }
    writeln!(out, "Attempt log:")?;
    if v.attempt_log.is_empty() {
        writeln!(out, "  (none yet)")?;
    }
    for a in &v.attempt_log {
        writeln!(out, "  {}  {}", a.at, a.reply)?;
    }
    match &v.planned_attempts {
        Some(list) => {
            writeln!(out, "Planned attempts:")?;
            for p in list {
                writeln!(out, "  {p}")?;
            }
        }
        None => writeln!(
            out,
            "Planned attempts: unknown (give --node-config, or run against the cluster)"
        )?,
    }
    writeln!(out)?;
    Ok(())
}

/// The retry schedule of `domain`: from `--node-config`, else from the domain's node config
/// in the cluster.
async fn retry_config(
    connect: &ConnectArgs,
    kube: Option<&kube::Client>,
    domain: &str,
) -> Option<RetryConfig> {
    let from_config = |config: &NodeConfig| {
        let intervals = config
            .domains
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(domain))
            .map(|d| d.retry_intervals.clone())
            .unwrap_or_default();
        config.delivery.retry.for_domain(&intervals)
    };
    if let Some(path) = &connect.node_config {
        let text = std::fs::read_to_string(path).ok()?;
        let config: NodeConfig = serde_yaml::from_str(&text).ok()?;
        return Some(from_config(&config));
    }
    let maps: Api<ConfigMap> = Api::all(kube?.clone());
    let list = maps
        .list(&ListParams::default().labels(DOMAIN_LABEL))
        .await
        .ok()?;
    list.into_iter()
        .filter_map(|cm| cm.data?.get(NODE_CONFIG_KEY).cloned())
        .filter_map(|text| serde_yaml::from_str::<NodeConfig>(&text).ok())
        .find(|c| {
            c.domains
                .iter()
                .any(|d| d.name.eq_ignore_ascii_case(domain))
        })
        .map(|c| from_config(&c))
}

/// `queue retry/hold/release/delete`.
pub async fn act(
    queue: &Queue,
    kind: Kind,
    args: &ActionArgs,
    confirm: bool,
    out: &mut impl Write,
) -> anyhow::Result<Summary> {
    let filter = args.filter.to_filter(&args.ids);
    if filter.is_empty() && !args.all {
        bail!("name queue ids or a filter (--domain, --to-domain, --state, ...), or give --all");
    }
    if confirm && !args.dry_run && args.ids.is_empty() {
        // Deleting by filter: count first, then ask.
        let count = queue.act(&kind, filter.clone(), true, |_| {}).await?;
        if count.would_change == 0 {
            writeln!(out, "no entry matches")?;
            return Ok(count);
        }
        if !std::io::stdin().is_terminal() {
            bail!(
                "{} entries would be deleted; run again with --yes (or --dry-run to list them)",
                count.would_change
            );
        }
        eprint!("delete {} entries? [y/N] ", count.would_change);
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !answer.trim().eq_ignore_ascii_case("y") {
            bail!("nothing deleted");
        }
    }
    let mut outcomes: Vec<Outcome> = Vec::new();
    let output = args.output;
    let mut failure = None;
    let summary = queue
        .act(&kind, filter, args.dry_run, |o| {
            if matches!(output, Output::Table | Output::Wide) {
                if let Err(e) = print_outcome(kind.name(), o, out) {
                    failure = Some(e);
                }
            } else {
                outcomes.push(o.clone());
            }
        })
        .await
        .context("the action stopped")?;
    if let Some(e) = failure {
        return Err(e);
    }
    #[derive(Serialize)]
    struct Report<'a> {
        action: &'a str,
        dry_run: bool,
        summary: Summary,
        outcomes: Vec<Outcome>,
    }
    let report = Report {
        action: kind.name(),
        dry_run: args.dry_run,
        summary,
        outcomes,
    };
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        Output::Yaml => write!(out, "{}", serde_yaml::to_string(&report)?)?,
        Output::Table | Output::Wide => writeln!(
            out,
            "{}: {} matched, {} {}, {} skipped, {} taken by a worker meanwhile",
            kind.name(),
            summary.matched,
            if args.dry_run {
                summary.would_change
            } else {
                summary.changed
            },
            if args.dry_run {
                "would change"
            } else {
                "changed"
            },
            summary.skipped,
            summary.gone
        )?,
    }
    Ok(summary)
}

fn print_outcome(action: &str, o: &Outcome, out: &mut impl Write) -> anyhow::Result<()> {
    let what = match &o.result {
        Result_::Changed => match o.new_sequence {
            Some(n) => format!("done (now sequence {n})"),
            None => "done".to_owned(),
        },
        Result_::WouldChange => "would change (dry run)".to_owned(),
        Result_::Skipped(why) => format!("skipped: {why}"),
        Result_::Gone => "taken by a worker meanwhile; nothing changed".to_owned(),
    };
    writeln!(
        out,
        "{action} {} ({}, sequence {}): {what}",
        o.queue_id, o.domain, o.sequence
    )?;
    Ok(())
}

/// `queue delete` (asks before deleting by filter).
pub async fn delete(
    queue: &Queue,
    args: &DeleteArgs,
    out: &mut impl Write,
) -> anyhow::Result<Summary> {
    let kind = Kind::Delete { notify: args.dsn };
    act(queue, kind, &args.action, !args.yes, out).await
}

/// `queue stats`.
pub async fn stats(queue: &Queue, args: &StatsArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let stats = queue.stats(args.filter.to_filter(&[])).await?;
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?,
        Output::Yaml => write!(out, "{}", serde_yaml::to_string(&stats)?)?,
        Output::Table | Output::Wide => stats_table(&stats, out)?,
    }
    Ok(())
}

fn stats_table(stats: &[DestinationStats], out: &mut impl Write) -> anyhow::Result<()> {
    let now = SystemTime::now();
    writeln!(
        out,
        "{:<32}  {:>8}  {:>10}  {:>8}  {:>6}  {:>5}  {:>7}  LAST ERROR",
        "DESTINATION", "MESSAGES", "RECIPIENTS", "DEFERRED", "PAUSED", "HELD", "OLDEST"
    )?;
    for s in stats {
        writeln!(
            out,
            "{:<32}  {:>8}  {:>10}  {:>8}  {:>6}  {:>5}  {:>7}  {}",
            cut(&s.destination, 32),
            s.messages,
            s.recipients,
            s.deferred,
            s.paused,
            s.held,
            short(now.duration_since(s.oldest).unwrap_or_default()),
            cut(s.last_error.as_deref().unwrap_or(""), 80)
        )?;
    }
    if stats.is_empty() {
        writeln!(out, "(the queue is empty)")?;
    }
    Ok(())
}

/// `3d`, `5h`, `12m`, `40s`.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations_and_cut_text() {
        assert_eq!(short(Duration::from_secs(42)), "42s");
        assert_eq!(short(Duration::from_secs(3 * 3600 + 5)), "3h");
        assert_eq!(short(Duration::from_secs(2 * 86400)), "2d");
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
    }
}
