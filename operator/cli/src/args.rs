//! Command-line flags; the `///` docs are the `--help` text. Every connection flag has an
//! environment variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// kubectl kubemail: look at and steer kubemail's mail queue, cluster-wide.
///
/// NATS is found the way kubectl finds the cluster (kubeconfig, --context): the operator's
/// Deployment says where NATS is; when that address cannot be reached from here, a port
/// forward through the API server is opened. --nats-url (with --creds/--ca) skips the cluster.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-kubemail",
    bin_name = "kubectl kubemail",
    version,
    about
)]
pub struct Args {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the queue is.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// NATS URL. Unset: the operator's `NATS_URL`, found through the cluster.
    #[arg(long, env = "KUBEMAIL_NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// NATS credentials file (JWT and NKey).
    #[arg(long, env = "KUBEMAIL_NATS_CREDS", global = true, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// CA certificate (PEM) of the NATS server; requires TLS.
    #[arg(long, env = "KUBEMAIL_NATS_CA", global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The queue stream. Unset: the operator's, else `KUBEMAIL`.
    #[arg(long, env = "KUBEMAIL_NATS_STREAM", global = true)]
    pub stream: Option<String>,
    /// The queue subject prefix. Unset: the operator's, else `kubemail.queue`.
    #[arg(long, env = "KUBEMAIL_NATS_SUBJECT_PREFIX", global = true)]
    pub subject_prefix: Option<String>,
    /// Kubeconfig file (default: `$KUBECONFIG`, then `~/.kube/config`).
    #[arg(long, env = "KUBECONFIG", global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace of the kubemail operator.
    #[arg(
        long,
        env = "KUBEMAIL_NAMESPACE",
        global = true,
        default_value = "kubemail-system"
    )]
    pub operator_namespace: String,
    /// Reach NATS through a port forward: `auto` when it cannot be reached directly.
    #[arg(long, value_enum, global = true, default_value = "auto")]
    pub port_forward: PortForward,
    /// A node config file whose retry schedule `queue show` uses (in a cluster: the
    /// domain's rendered node config).
    #[arg(long, env = "KUBEMAIL_NODE_CONFIG", global = true, value_name = "FILE")]
    pub node_config: Option<PathBuf>,
    /// Trace link template for `queue show`, `{trace_id}` replaced (e.g.
    /// `http://jaeger:16686/trace/{trace_id}`).
    #[arg(long, env = "KUBEMAIL_TRACE_URL", global = true)]
    pub trace_url: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortForward {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The mail queue.
    #[command(subcommand)]
    Queue(QueueCommand),
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// List queue entries, a page at a time (streamed: memory does not grow with the queue).
    List(ListArgs),
    /// Everything about one message: envelope, state, attempts and their replies, the
    /// schedule of the next attempts, its trace.
    Show(ShowArgs),
    /// Deliver deferred (or paused) entries now.
    Retry(ActionArgs),
    /// Keep entries from delivery on every replica until released.
    Hold(HoldArgs),
    /// Deliver held entries now.
    Release(ActionArgs),
    /// Remove entries, returning them to the sender (--dsn) or silently (--silent).
    Delete(DeleteArgs),
    /// Per destination (recipient domain): messages, recipients, states, oldest, last error.
    Stats(StatsArgs),
}

/// Which entries (every criterion given must hold).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// The MailDomain whose queue holds the entry.
    #[arg(long)]
    pub domain: Option<String>,
    /// A recipient's domain (`*.example.com` for its subdomains).
    #[arg(long = "to-domain", value_name = "DOMAIN")]
    pub to_domain: Option<String>,
    /// The sender (`<>` for bounces, `@domain` for any sender of a domain).
    #[arg(long = "from", value_name = "ADDRESS")]
    pub from: Option<String>,
    /// Accepted at least this long ago (`30m`, `2h`).
    #[arg(long, value_parser = duration, value_name = "AGE")]
    pub older_than: Option<Duration>,
    /// Accepted at most this long ago.
    #[arg(long, value_parser = duration, value_name = "AGE")]
    pub newer_than: Option<Duration>,
    /// ready, deferred, paused, held or cancelled.
    #[arg(long, value_parser = state)]
    pub state: Option<kubemail_queue_admin::State>,
    /// Text the last error contains (case-insensitive).
    #[arg(long = "error", value_name = "TEXT")]
    pub last_error: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Entries per page; 0: all (streamed).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Continue after this stream sequence (the `next` of the previous page).
    #[arg(long, default_value_t = 0, value_name = "SEQUENCE")]
    pub after: u64,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The queue id.
    pub id: String,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct ActionArgs {
    /// Queue ids; without any, the filter selects.
    pub ids: Vec<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Act on every entry when neither ids nor a filter are given.
    #[arg(long)]
    pub all: bool,
    /// Show what would change and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    #[command(flatten)]
    pub action: ActionArgs,
    /// Why (kept with the entry, shown by list and show).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("notice").required(true).args(["dsn", "silent"])))]
pub struct DeleteArgs {
    #[command(flatten)]
    pub action: ActionArgs,
    /// Return each message to its sender with a delivery status notification.
    #[arg(long)]
    pub dsn: bool,
    /// Delete without telling the sender.
    #[arg(long)]
    pub silent: bool,
    /// Do not ask before deleting entries selected by a filter.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

fn state(text: &str) -> Result<kubemail_queue_admin::State, String> {
    kubemail_queue_admin::State::parse(text).ok_or_else(|| {
        format!("unknown state {text:?}: ready, deferred, paused, held or cancelled")
    })
}

impl FilterArgs {
    /// The library filter, with `ids` as queue ids.
    pub fn to_filter(&self, ids: &[String]) -> kubemail_queue_admin::Filter {
        kubemail_queue_admin::Filter {
            domain: self.domain.clone(),
            recipient_domain: self.to_domain.clone(),
            sender: self.from.clone(),
            older_than: self.older_than,
            newer_than: self.newer_than,
            state: self.state,
            last_error: self.last_error.clone(),
            queue_ids: ids.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn flags_parse() {
        Args::command().debug_assert();
        let a = Args::parse_from([
            "kubectl-kubemail",
            "queue",
            "delete",
            "--to-domain",
            "gmail.com",
            "--older-than",
            "2h",
            "--state",
            "deferred",
            "--dsn",
            "--dry-run",
            "--nats-url",
            "nats://127.0.0.1:4222",
        ]);
        let Command::Queue(QueueCommand::Delete(d)) = a.command else {
            panic!("not a delete")
        };
        assert!(d.dsn && d.action.dry_run && !d.silent);
        let f = d.action.filter.to_filter(&[]);
        assert_eq!(f.recipient_domain.as_deref(), Some("gmail.com"));
        assert_eq!(f.older_than, Some(Duration::from_secs(7200)));
        assert_eq!(f.state, Some(kubemail_queue_admin::State::Deferred));
        assert_eq!(a.connect.nats_url.as_deref(), Some("nats://127.0.0.1:4222"));
        // A delete must say whether the senders are told.
        assert!(Args::try_parse_from(["kubectl-kubemail", "queue", "delete", "q1"]).is_err());
    }
}
