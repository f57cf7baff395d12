//! Finding and reaching the queue: flags, or the cluster the way kubectl sees it.
//!
//! Without `--nats-url` the operator's Deployment (in `--operator-namespace`, the container
//! with `NATS_URL`) names the NATS URL, the stream and the subject prefix. When that address
//! cannot be reached from here (a cluster-internal name), a local port is forwarded to a
//! ready pod behind the NATS Service through the API server (`pods/portforward`), one
//! forward per NATS connection.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::net::TcpListener;

use crate::args::{ConnectArgs, PortForward};

/// How long a direct connection attempt may take before a port forward is tried.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the queue is and how it was reached.
pub struct Target {
    pub url: String,
    pub stream: String,
    pub prefix: String,
    /// The cluster, when one was used.
    pub kube: Option<kube::Client>,
    /// Who acts, for the audit log.
    pub actor: String,
}

/// Resolves `args` to a NATS URL (port-forwarded when needed) and the queue's names.
pub async fn resolve(args: &ConnectArgs) -> anyhow::Result<Target> {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
    if let Some(url) = &args.nats_url {
        return Ok(Target {
            url: url.clone(),
            stream: args.stream.clone().unwrap_or_else(|| "KUBEMAIL".to_owned()),
            prefix: args
                .subject_prefix
                .clone()
                .unwrap_or_else(|| "kubemail.queue".to_owned()),
            kube: None,
            actor: user,
        });
    }
    let (client, context) = kube_client(args).await?;
    let operator = operator_env(&client, &args.operator_namespace).await?;
    let env = |name: &str| {
        operator
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let url = env("NATS_URL").ok_or_else(|| {
        anyhow!(
            "the kubemail operator in namespace {} has no NATS_URL; give --nats-url",
            args.operator_namespace
        )
    })?;
    let stream = args
        .stream
        .clone()
        .or_else(|| env("KUBEMAIL_NATS_STREAM"))
        .unwrap_or_else(|| "KUBEMAIL".to_owned());
    let prefix = args
        .subject_prefix
        .clone()
        .or_else(|| env("KUBEMAIL_NATS_SUBJECT_PREFIX"))
        .unwrap_or_else(|| "kubemail.queue".to_owned());
    let first = url.split(',').next().unwrap_or(&url).trim().to_owned();
    let (host, port) = host_port(&first)?;
    let direct = args.port_forward != PortForward::Always
        && tokio::time::timeout(
            DIRECT_TIMEOUT,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
    let url = if direct {
        first
    } else if args.port_forward == PortForward::Never {
        bail!("NATS at {first} cannot be reached from here and --port-forward never was given");
    } else {
        let local = forward(&client, &args.operator_namespace, &host, port).await?;
        tracing::info!(nats = %first, local = %local, "reaching NATS through a port forward");
        format!("nats://{local}")
    };
    Ok(Target {
        url,
        stream,
        prefix,
        kube: Some(client),
        actor: format!("{user}@{context}"),
    })
}

/// Connects to NATS with the credentials and CA given.
pub async fn nats(target: &Target, args: &ConnectArgs) -> anyhow::Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new().name("kubectl-kubemail");
    if let Some(creds) = &args.creds {
        options = options
            .credentials_file(creds)
            .await
            .with_context(|| format!("cannot read NATS credentials {}", creds.display()))?;
    }
    if let Some(ca) = &args.ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    options
        .connect(target.url.as_str())
        .await
        .with_context(|| format!("cannot connect to NATS at {}", target.url))
}

async fn kube_client(args: &ConnectArgs) -> anyhow::Result<(kube::Client, String)> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None => kube::Config::from_kubeconfig(&options)
            .await
            .or_else(|_| kube::Config::incluster())
            .context("no kubeconfig and not in a cluster; give --nats-url")?,
    };
    let context = args
        .context
        .clone()
        .or_else(|| current_context(args.kubeconfig.as_deref()))
        .unwrap_or_else(|| "in-cluster".to_owned());
    Ok((kube::Client::try_from(config)?, context))
}

fn current_context(path: Option<&Path>) -> Option<String> {
    let config = match path {
        Some(p) => Kubeconfig::read_from(p).ok()?,
        None => Kubeconfig::read().ok()?,
    };
    config.current_context
}

/// The environment of the operator's container (literal values only).
async fn operator_env(
    client: &kube::Client,
    namespace: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let list = deployments
        .list(&ListParams::default())
        .await
        .with_context(|| format!("cannot list Deployments in {namespace}"))?;
    for d in list {
        let containers = d
            .spec
            .and_then(|s| s.template.spec)
            .map(|s| s.containers)
            .unwrap_or_default();
        for c in containers {
            let env: Vec<(String, String)> = c
                .env
                .unwrap_or_default()
                .into_iter()
                .filter_map(|e| e.value.map(|v| (e.name, v)))
                .collect();
            if env.iter().any(|(k, _)| k == "NATS_URL") {
                return Ok(env);
            }
        }
    }
    bail!(
        "no kubemail operator (a Deployment with NATS_URL) in namespace {namespace}; give --operator-namespace or --nats-url"
    )
}

/// Host and port of a `nats://host:port` URL.
pub fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .trim_end_matches('/');
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Ok((
            h.trim_matches(|c| c == '[' || c == ']').to_owned(),
            p.parse()
                .with_context(|| format!("invalid port in {url}"))?,
        )),
        _ => Ok((rest.to_owned(), 4222)),
    }
}

/// Forwards a local port to `port` of a ready pod behind the Service named by `host`
/// (`svc`, `svc.ns`, `svc.ns.svc...`); returns the local address.
async fn forward(
    client: &kube::Client,
    default_namespace: &str,
    host: &str,
    port: u16,
) -> anyhow::Result<std::net::SocketAddr> {
    let mut parts = host.split('.');
    let name = parts.next().unwrap_or(host).to_owned();
    let namespace = parts
        .next()
        .filter(|n| *n != "svc")
        .unwrap_or(default_namespace)
        .to_owned();
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let service = services
        .get(&name)
        .await
        .with_context(|| format!("no Service {namespace}/{name} to forward NATS through"))?;
    let spec = service.spec.unwrap_or_default();
    let selector = spec
        .selector
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let target_port = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.port == i32::from(port))
        .and_then(|p| match p.target_port {
            Some(IntOrString::Int(n)) => u16::try_from(n).ok(),
            _ => None,
        })
        .unwrap_or(port);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let ready = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .into_iter()
        .find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .and_then(|p| p.metadata.name)
        .ok_or_else(|| anyhow!("no ready pod behind Service {namespace}/{name}"))?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let pods = pods.clone();
            let pod = ready.clone();
            tokio::spawn(async move {
                let mut forwarder = match pods.portforward(&pod, &[target_port]).await {
                    Ok(f) => f,
                    Err(error) => {
                        tracing::warn!(%error, %pod, "port forward failed");
                        return;
                    }
                };
                let Some(mut upstream) = forwarder.take_stream(target_port) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream).await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            host_port("nats://nats.mail.svc:4222").unwrap_or_default(),
            ("nats.mail.svc".to_owned(), 4222)
        );
        assert_eq!(
            host_port("nats://user:pw@127.0.0.1:14222").unwrap_or_default(),
            ("127.0.0.1".to_owned(), 14222)
        );
        assert_eq!(
            host_port("tls://nats").unwrap_or_default(),
            ("nats".to_owned(), 4222)
        );
    }
}
