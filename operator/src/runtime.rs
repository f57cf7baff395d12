//! Wiring of the operator process: the Kubernetes client, the admin endpoint, leader election
//! and the controllers, and graceful shutdown.
//!
//! ```text
//!            SIGTERM/SIGINT ─► shutdown ─┬─► controllers stop (in-flight reconciles finish)
//!                                        ├─► Lease released (a follower takes over at once)
//!                                        └─► admin endpoint stops
//! Lease held ─► controllers run ; Lease lost ─► controllers stop, campaign again
//! ```

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminServer;
use crate::args::Args;
use crate::controller::mail_domain::build::BuildConfig;
use crate::controller::{self, Context};
use crate::diagnose::Hints;
use crate::leader::{LeaderElector, LeaseConfig};
use crate::metrics::Metrics;

/// How often to look for the CRDs while they are not installed.
const CRD_POLL: Duration = Duration::from_secs(5);
/// Deadline of NATS calls in the finalizer.
const NATS_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a status patch (linkerd's policy controller uses the same order of magnitude).
const STATUS_PATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the operator could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot read kubeconfig {0}")]
    ReadKubeconfig(String, #[source] kube::config::KubeconfigError),
    #[error("cannot load the client configuration")]
    LoadConfig(#[source] kube::config::KubeconfigError),
    #[error("cannot infer the client configuration")]
    InferConfig(#[source] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client")]
    CreateClient(#[source] kube::Error),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error("cannot listen for signals")]
    Signals(#[source] std::io::Error),
    #[error("cannot read the NATS CA file {0}")]
    ReadNatsCa(String, #[source] std::io::Error),
    #[error("--network-policy-metrics-from is not a JSON list of NetworkPolicy peers")]
    MetricsFrom(#[source] serde_json::Error),
    #[error("--node-pod-defaults is not a JSON object of spec.pod fields")]
    PodDefaults(#[source] serde_json::Error),
    #[error("cannot look up the CustomResourceDefinition {name}")]
    ReadCrd {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot load the node config overlay {0}")]
    LoadNodeOverlay(
        String,
        #[source] crate::controller::mail_domain::build::OverlayError,
    ),
}

/// Runs the operator until SIGTERM or SIGINT.
pub async fn run(args: Args) -> Result<(), RunError> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    run_until(args, shutdown).await
}

/// The name servers the DNS check asks: `--dns-check-nameservers`, else the nodes' own
/// (`dns.nameservers` of the site overlay), so the check sees DNS as the nodes do; empty means
/// the system's.
fn dns_check_nameservers(
    flag: &[std::net::SocketAddr],
    overlay: Option<&kubemail_config::NodeConfigOverlay>,
) -> Vec<std::net::SocketAddr> {
    if !flag.is_empty() {
        return flag.to_vec();
    }
    overlay
        .and_then(|o| o.dns.as_ref())
        .and_then(|d| d.nameservers.clone())
        .unwrap_or_default()
}

/// Runs the operator until `shutdown` fires.
pub async fn run_until(args: Args, shutdown: CancellationToken) -> Result<(), RunError> {
    let node_overlay = match &args.node_config_overlay {
        Some(path) => Some(
            crate::controller::mail_domain::build::load_node_overlay(path)
                .map_err(|e| RunError::LoadNodeOverlay(path.display().to_string(), e))?,
        ),
        None => None,
    };
    let pod_defaults =
        serde_json::from_str(&args.node_pod_defaults).map_err(RunError::PodDefaults)?;
    let dns_check_nameservers =
        dns_check_nameservers(&args.dns_check_nameservers, node_overlay.as_ref());
    let nats = nats_settings(&args)?;
    let client = client(args.kubeconfig.as_deref()).await?;
    let metrics = Arc::new(Metrics::new());
    let admin = AdminServer::bind(args.admin_address, metrics.clone()).await?;
    if let Some(addr) = admin.local_addr() {
        tracing::info!(address = %addr, "admin endpoint listening");
    }
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin.serve(admin_stop.clone()));

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let ctx = Arc::new(Context::new(
        client.clone(),
        controller::Config {
            watch_namespaces: args.watch_namespaces.clone(),
            reconcile_concurrency: args.reconcile_concurrency,
            operator_namespace: args.namespace.clone(),
            ca_secret_name: args.ca_secret.clone(),
            certificate_validity: args.certificate_validity,
            resync: args.resync,
            nats_timeout: NATS_TIMEOUT,
            status_patch_timeout: STATUS_PATCH_TIMEOUT,
            probe_timeout: args.probe_timeout,
            probe_ehlo_name: identity.clone(),
            build: BuildConfig {
                node_image: args.node_image.clone(),
                listen_host: args.node_listen_host.clone(),
                bind_pod_ip: args.node_bind_pod_ip,
                node_overlay,
                pod_defaults,
                otlp_endpoint: args.node_otlp_endpoint.clone(),
                nats_url: args.nats_url.clone(),
                nats_stream: args.nats_stream.clone(),
                nats_subject_prefix: args.nats_subject_prefix.clone(),
                nats_replicas: args.nats_replicas,
                nats_auth: nats.authenticated(),
                nats_tls: nats.tls(),
                network_policy: nats.network_policy.clone(),
            },
            nats,
            dns_check: controller::dns_check::DnsCheckConfig {
                interval: args.dns_check_interval,
                resolver: crate::dns_check::resolve::ResolverSettings {
                    nameservers: dns_check_nameservers,
                    timeout: args.dns_check_timeout,
                },
            },
        },
        metrics.clone(),
        identity.clone(),
    ));

    let hints = Hints::from_config(&ctx.config);
    if wait_for_crds(&client, &shutdown, &hints).await {
        let (leading_tx, mut leading) = watch::channel(false);
        let lease_stop = CancellationToken::new();
        let elector = LeaderElector::new(
            client,
            LeaseConfig {
                namespace: args.namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                lease_duration: args.lease_duration,
                renew_deadline: args.lease_renew_deadline,
                retry_period: args.lease_retry_period,
            },
        );
        let elector_task = tokio::spawn(elector.run(leading_tx, lease_stop.clone()));
        tracing::info!(%identity, lease = %args.lease_name, namespace = %args.namespace, "campaigning for the leader lease");

        'campaign: loop {
            // Wait for the Lease.
            while !*leading.borrow_and_update() {
                tokio::select! {
                    () = shutdown.cancelled() => break 'campaign,
                    changed = leading.changed() => if changed.is_err() { break 'campaign },
                }
            }
            metrics.set_leader(true);
            tracing::info!("leading: starting the controllers");
            let stop = CancellationToken::new();
            let controllers = tokio::spawn(controller::run(ctx.clone(), stop.clone()));
            let stopping = tokio::select! {
                () = shutdown.cancelled() => true,
                () = lost(&mut leading) => false,
            };
            stop.cancel();
            let _ = controllers.await;
            metrics.set_leader(false);
            if stopping {
                break;
            }
            tracing::warn!("lost the leader lease: controllers stopped, campaigning again");
        }
        // The controllers have stopped: now the Lease may go to the next replica.
        lease_stop.cancel();
        let _ = elector_task.await;
    }

    admin_stop.cancel();
    match admin_task.await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("the admin endpoint task panicked"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// The NATS settings of the flags.
fn nats_settings(args: &Args) -> Result<crate::nats::NatsSettings, RunError> {
    let ca_pem = match &args.nats_ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| RunError::ReadNatsCa(path.display().to_string(), e))?,
        ),
        None => None,
    };
    let network_policy = if args.network_policy {
        let labels = args
            .network_policy_nats_labels
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Some(crate::nats::NetworkPolicySettings {
            nats_pods: args
                .network_policy_nats_namespace
                .clone()
                .map(|ns| (ns, labels)),
            nats_port: nats_port(&args.nats_url),
            metrics_from: serde_json::from_str(&args.network_policy_metrics_from)
                .map_err(RunError::MetricsFrom)?,
        })
    } else {
        None
    };
    Ok(crate::nats::NatsSettings {
        url: args.nats_url.clone(),
        ca_pem,
        account_secret: args.nats_account_secret.clone(),
        account_dir: args.nats_account_dir.clone(),
        bootstrap: args.nats_bootstrap.then(|| crate::nats::Bootstrap {
            tls_secret: args.nats_tls_secret.clone(),
            server_names: args.nats_server_names.clone(),
            certificate_validity: args.certificate_validity,
        }),
        credentials_validity: args.nats_credentials_validity,
        replicas: args.nats_replicas,
        network_policy,
    })
}

/// The port of the first NATS URL (4222 when it names none).
fn nats_port(url: &str) -> u16 {
    url.split(',')
        .next()
        .and_then(|u| u.trim().rsplit_once(':'))
        .and_then(|(_, port)| port.trim_end_matches('/').parse().ok())
        .unwrap_or(4222)
}

async fn lost(leading: &mut watch::Receiver<bool>) {
    loop {
        if !*leading.borrow_and_update() {
            return;
        }
        if leading.changed().await.is_err() {
            return;
        }
    }
}

/// Waits until the operator's CRDs are established; `false` on shutdown. A failing lookup
/// (API server unreachable, RBAC) is reported as such, with its fix, not as missing CRDs; each
/// distinct message is logged once.
async fn wait_for_crds(client: &Client, shutdown: &CancellationToken, hints: &Hints) -> bool {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut last_logged = String::new();
    loop {
        let mut missing = Vec::new();
        let mut failure = None;
        for (_, crd) in crate::crd::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let established = match api.get_opt(&name).await {
                Ok(crd) => crd
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    }),
                Err(source) => {
                    failure = Some(crate::diagnose::explain(
                        &RunError::ReadCrd { name, source },
                        hints,
                    ));
                    break;
                }
            };
            if !established {
                missing.push(name);
            }
        }
        let message = match failure {
            Some(failure) => failure,
            None if missing.is_empty() => return true,
            None => format!(
                "waiting for the CRDs {}; install them with: kubectl apply --server-side -f crds/",
                missing.join(", ")
            ),
        };
        if message != last_logged {
            tracing::warn!("{message}");
            last_logged = message;
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(CRD_POLL) => {}
        }
    }
}

async fn client(kubeconfig: Option<&str>) -> Result<Client, RunError> {
    let config = match kubeconfig {
        // A single file; a `:`-separated list is KUBECONFIG's own syntax, left to `infer`.
        Some(path) if !path.is_empty() && !path.contains(':') => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| RunError::ReadKubeconfig(path.to_owned(), e))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(RunError::LoadConfig)?
        }
        _ => Config::infer().await.map_err(RunError::InferConfig)?,
    };
    Client::try_from(config).map_err(RunError::CreateClient)
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kubemail-operator".to_owned());
    // Two processes on one host (tests, a restart overlapping the old one) stay distinct.
    format!("{host}-{:08x}", rand::random::<u32>())
}

fn spawn_signal_handler(shutdown: CancellationToken) -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_dns_check_asks_the_flag_then_the_nodes_resolvers_then_the_system() {
        let overlay = kubemail_config::NodeConfigOverlay::from_yaml(
            "dns: {nameservers: [\"127.0.0.1:15353\"]}\n",
        )
        .unwrap();
        let flag = ["192.0.2.53:53".parse().unwrap()];
        assert_eq!(super::dns_check_nameservers(&flag, Some(&overlay)), flag);
        assert_eq!(
            super::dns_check_nameservers(&[], Some(&overlay)),
            ["127.0.0.1:15353".parse().unwrap()]
        );
        assert!(super::dns_check_nameservers(&[], None).is_empty());
        let without_dns =
            kubemail_config::NodeConfigOverlay::from_yaml("maxConnections: 5\n").unwrap();
        assert!(super::dns_check_nameservers(&[], Some(&without_dns)).is_empty());
    }
}
