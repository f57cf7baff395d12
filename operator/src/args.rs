//! Command-line flags of `kubemail-operator`. Every flag has an environment variable of the
//! same meaning; the `///` docs are the `--help` text.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::telemetry::LogFormat;

/// kubemail operator: reconciles MailDomain and Relay resources into SMTP node Deployments,
/// TLS certificates, DKIM keys and DNS records.
#[derive(Parser, Debug, Clone)]
#[command(name = "kubemail-operator", version, about)]
pub struct Args {
    /// Kubeconfig file. Unset: the in-cluster service account, else the usual
    /// `$KUBECONFIG` / `~/.kube/config` lookup.
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<String>,

    /// Watch only these namespaces, comma separated (default: every namespace). With a list
    /// the operator needs Roles in those namespaces only, no cluster-wide access to Secrets.
    #[arg(
        long = "watch-namespaces",
        visible_alias = "watch-namespace",
        env = "KUBEMAIL_WATCH_NAMESPACES",
        value_name = "NAMESPACE,...",
        value_delimiter = ','
    )]
    pub watch_namespaces: Vec<String>,

    /// Reconciles that may run at once over all controllers (each costs API calls and, for a
    /// new domain, an RSA key generation); a new leader starts at most this many at a time.
    #[arg(long, env = "KUBEMAIL_RECONCILE_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub reconcile_concurrency: u16,

    /// The operator's own namespace: its leader Lease and CA Secret live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubemail-system")]
    pub namespace: String,

    /// This replica's identity in the leader Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(long, env = "KUBEMAIL_LEASE_NAME", default_value = "kubemail-operator")]
    pub lease_name: String,

    /// How long a leader's Lease is valid without renewal.
    #[arg(long, env = "KUBEMAIL_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    pub lease_duration: Duration,

    /// A leader that cannot renew within this time stops leading (less than the duration).
    #[arg(long, env = "KUBEMAIL_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = duration)]
    pub lease_renew_deadline: Duration,

    /// How often candidates try to acquire, and the leader to renew, the Lease.
    #[arg(long, env = "KUBEMAIL_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = duration)]
    pub lease_retry_period: Duration,

    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); port 0 picks one.
    #[arg(long, env = "KUBEMAIL_ADMIN_ADDRESS", default_value = "0.0.0.0:8080")]
    pub admin_address: SocketAddr,

    /// SMTP node image of the Deployments.
    #[arg(long, env = "KUBEMAIL_NODE_IMAGE", default_value = concat!("kubemail/smtp-node:", env!("CARGO_PKG_VERSION")))]
    pub node_image: String,

    /// Address the SMTP nodes bind (0.0.0.0: every address of the pod).
    #[arg(long, env = "KUBEMAIL_NODE_LISTEN_HOST", default_value = "0.0.0.0")]
    pub node_listen_host: String,

    /// Start the SMTP nodes with `--listen-ip $(POD_IP)`, for clusters whose pods share one
    /// network namespace (kubemail's local test cluster). Not needed in real clusters.
    #[arg(long, env = "KUBEMAIL_NODE_BIND_POD_IP")]
    pub node_bind_pod_ip: bool,

    /// YAML file merged into every rendered SMTP node config (site-wide node settings such as
    /// `dns`, `delivery`, `timeouts`); it may not set `domains`, which come from each MailDomain.
    #[arg(long, env = "KUBEMAIL_NODE_CONFIG_OVERLAY", value_name = "FILE")]
    pub node_config_overlay: Option<std::path::PathBuf>,

    /// OTLP (gRPC) endpoint the SMTP nodes export their traces to; absent: nodes export nothing.
    #[arg(long, env = "KUBEMAIL_NODE_OTLP_ENDPOINT", value_name = "URL")]
    pub node_otlp_endpoint: Option<String>,

    /// NATS URL, used by the nodes and by the operator's finalizer.
    #[arg(long, env = "NATS_URL", default_value = "nats://nats:4222")]
    pub nats_url: String,

    /// JetStream stream of the mail queue.
    #[arg(long, env = "KUBEMAIL_NATS_STREAM", default_value = "KUBEMAIL")]
    pub nats_stream: String,

    /// Queue subjects are `<prefix>.<domain>`.
    #[arg(
        long,
        env = "KUBEMAIL_NATS_SUBJECT_PREFIX",
        default_value = "kubemail.queue"
    )]
    pub nats_subject_prefix: String,

    /// Name of the Secret (in --namespace) holding the operator's CA; created on first use.
    #[arg(long, env = "KUBEMAIL_CA_SECRET", default_value = "kubemail-ca")]
    pub ca_secret: String,

    /// Lifetime of certificates the operator's CA issues (renewed at two thirds).
    #[arg(long, env = "KUBEMAIL_CERTIFICATE_VALIDITY", default_value = "90d", value_parser = duration)]
    pub certificate_validity: Duration,

    /// Reconcile every resource at least this often.
    #[arg(long, env = "KUBEMAIL_RESYNC", default_value = "10m", value_parser = duration)]
    pub resync: Duration,

    /// Deadline of a Relay probe.
    #[arg(long, env = "KUBEMAIL_PROBE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub probe_timeout: Duration,

    /// Log format.
    #[arg(long, env = "KUBEMAIL_LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: LogFormat,
}

fn duration(text: &str) -> Result<Duration, String> {
    crate::timestamps::parse_duration(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_flags_override() {
        let a = Args::try_parse_from([
            "kubemail-operator",
            "--lease-duration",
            "30s",
            "--admin-address",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(a.lease_duration, Duration::from_secs(30));
        assert_eq!(a.certificate_validity, Duration::from_secs(90 * 86400));
        assert!(a.node_image.starts_with("kubemail/smtp-node:"));
        assert!(a.watch_namespaces.is_empty(), "every namespace by default");
        assert_eq!(a.reconcile_concurrency, 8);
    }

    #[test]
    fn watch_namespaces_take_a_list_and_the_old_singular_flag() {
        let a = Args::try_parse_from(["kubemail-operator", "--watch-namespaces", "team-a,team-b"])
            .unwrap();
        assert_eq!(a.watch_namespaces, ["team-a", "team-b"]);
        let a = Args::try_parse_from(["kubemail-operator", "--watch-namespace", "mail"]).unwrap();
        assert_eq!(a.watch_namespaces, ["mail"]);
        assert!(
            Args::try_parse_from(["kubemail-operator", "--reconcile-concurrency", "0"]).is_err(),
            "at least one reconcile must be able to run"
        );
    }
}
