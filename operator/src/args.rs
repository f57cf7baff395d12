//! Command-line flags of `kubemail-operator`. Every flag has an environment variable of the
//! same meaning; the `///` docs are the `--help` text.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

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

    /// Site-wide defaults of every MailDomain's and MailPool's `spec.pod`, as JSON (e.g.
    /// `{"priorityClassName":"mail","tolerations":[...]}`); a field the resource sets wins.
    #[arg(
        long,
        env = "KUBEMAIL_NODE_POD_DEFAULTS",
        value_name = "JSON",
        default_value = "{}"
    )]
    pub node_pod_defaults: String,

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

    /// CA certificate(s) (PEM file) that sign the NATS server certificate: the operator and
    /// the nodes then require TLS and verify the server. Unset with --nats-bootstrap: the
    /// operator's own CA.
    #[arg(long, env = "KUBEMAIL_NATS_CA_FILE", value_name = "FILE")]
    pub nats_ca_file: Option<std::path::PathBuf>,

    /// Secret (in --namespace) with the NATS account's public key (`account.pub`) and the
    /// seed of its signing key (`signing-key.nk`). Set: NATS is authenticated, the operator
    /// creates the JetStream objects and mints each MailDomain's node credentials.
    #[arg(long, env = "KUBEMAIL_NATS_ACCOUNT_SECRET", value_name = "NAME")]
    pub nats_account_secret: Option<String>,

    /// Directory holding the account keys as files (`account.pub`, `signing-key.nk`), e.g. a
    /// mounted Secret; instead of --nats-account-secret. Read at every use.
    #[arg(
        long,
        env = "KUBEMAIL_NATS_ACCOUNT_DIR",
        value_name = "DIR",
        conflicts_with = "nats_account_secret"
    )]
    pub nats_account_dir: Option<std::path::PathBuf>,

    /// The chart's bundled NATS: create the trust chain in --nats-account-secret (when set)
    /// if it is missing, and issue the NATS server certificate into --nats-tls-secret from
    /// the operator's CA (when --nats-server-names are given).
    #[arg(long, env = "KUBEMAIL_NATS_BOOTSTRAP")]
    pub nats_bootstrap: bool,

    /// Secret (in --namespace) of the bundled NATS' server certificate.
    #[arg(
        long,
        env = "KUBEMAIL_NATS_TLS_SECRET",
        default_value = "kubemail-nats-tls"
    )]
    pub nats_tls_secret: String,

    /// Names in the bundled NATS' server certificate, comma separated.
    #[arg(long, env = "KUBEMAIL_NATS_SERVER_NAMES", value_delimiter = ',')]
    pub nats_server_names: Vec<String>,

    /// Replicas of the queue stream, the body buckets and the AUTH-failure stream (1-5).
    #[arg(long, env = "KUBEMAIL_NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=5))]
    pub nats_replicas: u32,

    /// Lifetime of the nodes' NATS credentials (renewed at half).
    #[arg(long, env = "KUBEMAIL_NATS_CREDENTIALS_VALIDITY", default_value = "7d", value_parser = duration)]
    pub nats_credentials_validity: Duration,

    /// Make a NetworkPolicy per MailDomain for its pods.
    #[arg(long, env = "KUBEMAIL_NETWORK_POLICY")]
    pub network_policy: bool,

    /// Namespace of the NATS pods (NetworkPolicy egress). Unset: NATS outside the cluster,
    /// any address on the NATS port.
    #[arg(
        long,
        env = "KUBEMAIL_NETWORK_POLICY_NATS_NAMESPACE",
        value_name = "NAMESPACE"
    )]
    pub network_policy_nats_namespace: Option<String>,

    /// Labels of the NATS pods, `k=v,k=v` (with --network-policy-nats-namespace).
    #[arg(
        long,
        env = "KUBEMAIL_NETWORK_POLICY_NATS_LABELS",
        value_delimiter = ','
    )]
    pub network_policy_nats_labels: Vec<String>,

    /// Peers that may reach the nodes' admin port (metrics), a JSON list of NetworkPolicy
    /// peers, e.g. `[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]`.
    #[arg(
        long,
        env = "KUBEMAIL_NETWORK_POLICY_METRICS_FROM",
        default_value = "[]"
    )]
    pub network_policy_metrics_from: String,

    /// How often to look up every MailDomain's DNS records and report whether they are
    /// published as computed (condition `DnsPublished`); a domain whose records changed is
    /// looked up at once. `0s` turns the check off.
    #[arg(long, env = "KUBEMAIL_DNS_CHECK_INTERVAL", default_value = "10m", value_parser = duration)]
    pub dns_check_interval: Duration,

    /// Name servers the DNS check asks, `ip` or `ip:port`, comma separated (default: the
    /// nodes' `dns.nameservers` from --node-config-overlay, else the system's, from
    /// /etc/resolv.conf).
    #[arg(
        long,
        env = "KUBEMAIL_DNS_CHECK_NAMESERVERS",
        value_name = "IP[:PORT],...",
        value_delimiter = ',',
        value_parser = nameserver
    )]
    pub dns_check_nameservers: Vec<SocketAddr>,

    /// Deadline of one DNS query attempt of the check.
    #[arg(long, env = "KUBEMAIL_DNS_CHECK_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub dns_check_timeout: Duration,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Tools besides running the operator.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Plays the NATS administrator for a NATS outside the chart (the local test cluster):
    /// writes a new trust chain into DIR: `resolver.conf` (include it in nats-server's
    /// config), `account.pub` and `signing-key.nk` (the operator's account Secret), and
    /// `admin.creds` (a user of the account with every permission, for tests and inspection).
    NatsTrust {
        /// Directory to write to (created; existing files are replaced).
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// Lifetime of `admin.creds`.
        #[arg(long, default_value = "30d", value_parser = duration)]
        admin_validity: Duration,
    },
    /// Sends one test message to an SMTP server (the chart's `helm test`) and exits 0 only when
    /// the server answers 250 after the data, i.e. a kubemail node queued it.
    SmokeSend {
        /// The server, host:port (e.g. the MailDomain's Service: example-com.mail.svc:25).
        #[arg(long, env = "KUBEMAIL_SMOKE_SERVER", value_name = "HOST:PORT")]
        server: String,
        /// Envelope sender and From: address.
        #[arg(long, env = "KUBEMAIL_SMOKE_FROM", value_name = "ADDRESS")]
        from: String,
        /// Envelope recipient and To: address: a recipient the domain accepts without AUTH.
        #[arg(long, env = "KUBEMAIL_SMOKE_TO", value_name = "ADDRESS")]
        to: String,
        /// The name given in EHLO.
        #[arg(
            long,
            env = "KUBEMAIL_SMOKE_EHLO",
            default_value = "kubemail-smoke-test.invalid"
        )]
        ehlo: String,
        /// The message's Subject:.
        #[arg(
            long,
            env = "KUBEMAIL_SMOKE_SUBJECT",
            default_value = "kubemail smoke test"
        )]
        subject: String,
        /// Deadline for the whole transaction.
        #[arg(long, env = "KUBEMAIL_SMOKE_TIMEOUT", default_value = "60s", value_parser = duration)]
        timeout: Duration,
    },
}

fn duration(text: &str) -> Result<Duration, String> {
    crate::timestamps::parse_duration(text)
}

/// `ip:port`, or `ip` for port 53.
fn nameserver(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    text.parse::<SocketAddr>()
        .or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{text:?} is not an IP address or IP:port"))
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
        assert_eq!(a.dns_check_interval, Duration::from_secs(600));
        assert!(a.dns_check_nameservers.is_empty(), "the system resolver");
    }

    #[test]
    fn dns_check_nameservers_take_addresses_with_or_without_port() {
        let a = Args::try_parse_from([
            "kubemail-operator",
            "--dns-check-nameservers",
            "127.0.0.1:5353,192.0.2.53",
            "--dns-check-interval",
            "0s",
        ])
        .unwrap();
        assert_eq!(
            a.dns_check_nameservers,
            [
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "192.0.2.53:53".parse().unwrap()
            ]
        );
        assert!(a.dns_check_interval.is_zero());
        let e = Args::try_parse_from(["kubemail-operator", "--dns-check-nameservers", "ns1"])
            .unwrap_err();
        assert!(e.to_string().contains("not an IP address"), "{e}");
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
