//! Startup, readiness and liveness probes against the pod's address. httpGet speaks a minimal
//! HTTP/1.1 GET (success: status 200–399, as the kubelet); tcpSocket connects; exec runs the
//! command inside the container's mount namespace through `nsenter` (inside its root and as its
//! user when it runs from an image). HTTPS and gRPC probes are checked as plain TCP connects
//! (the agent carries no TLS/gRPC client). The threshold logic
//! (initial state, success/failure thresholds) lives in [`ProbeTracker`], free of I/O.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::process::ContainerTag;

/// Kubernetes probe defaults (core/v1 Probe field docs).
const DEFAULT_PERIOD_SECONDS: i32 = 10;
const DEFAULT_TIMEOUT_SECONDS: i32 = 1;
const DEFAULT_THRESHOLD_SUCCESS: i32 = 1;
const DEFAULT_THRESHOLD_FAILURE: i32 = 3;
/// Enough of an HTTP response to read its status line.
const MAX_RESPONSE_HEAD: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

/// A probe's state changed: the container is now healthy (`true`) or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    pub tag: ContainerTag,
    pub kind: ProbeKind,
    pub healthy: bool,
    pub message: String,
}

/// Where and how to probe one container.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub ip: IpAddr,
    pub named_ports: HashMap<String, u16>,
    /// The container's main process, for exec probes.
    pub pid: u32,
    pub env: Vec<(String, String)>,
    pub nsenter: PathBuf,
    /// uid and gid of a container that runs from an image: exec probes then run inside its
    /// root, in its working directory, as that user.
    pub run_as: Option<(u32, u32)>,
}

/// Counts consecutive results against a probe's thresholds and says when the verdict flips.
#[derive(Debug, Clone)]
pub struct ProbeTracker {
    healthy: bool,
    successes: i32,
    failures: i32,
    success_threshold: i32,
    failure_threshold: i32,
}

impl ProbeTracker {
    pub fn new(kind: ProbeKind, probe: &Probe) -> Self {
        ProbeTracker {
            // Liveness starts out healthy; readiness and startup have to be earned.
            healthy: kind == ProbeKind::Liveness,
            successes: 0,
            failures: 0,
            success_threshold: probe
                .success_threshold
                .unwrap_or(DEFAULT_THRESHOLD_SUCCESS)
                .max(1),
            failure_threshold: probe
                .failure_threshold
                .unwrap_or(DEFAULT_THRESHOLD_FAILURE)
                .max(1),
        }
    }

    /// Records one result; returns the new verdict when it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.successes += 1;
            self.failures = 0;
            if !self.healthy && self.successes >= self.success_threshold {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.healthy && self.failures >= self.failure_threshold {
                self.healthy = false;
                return Some(false);
            }
            // Startup (and the first readiness verdict) fails once the threshold is reached
            // even though it never was healthy.
            if !self.healthy && self.failures == self.failure_threshold {
                return Some(false);
            }
        }
        None
    }
}

/// The probes of `container`, in the order they matter.
pub fn container_probes(container: &Container) -> Vec<(ProbeKind, Probe)> {
    [
        (ProbeKind::Startup, &container.startup_probe),
        (ProbeKind::Readiness, &container.readiness_probe),
        (ProbeKind::Liveness, &container.liveness_probe),
    ]
    .into_iter()
    .filter_map(|(k, p)| p.clone().map(|p| (k, p)))
    .collect()
}

/// Named container ports → numbers, for `port: http` in probes.
pub fn named_ports(container: &Container) -> HashMap<String, u16> {
    container
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let name = p.name.clone()?;
            Some((name, u16::try_from(p.container_port).ok()?))
        })
        .collect()
}

/// Runs `probe` periodically until `cancel` fires, reporting each verdict change. A startup
/// probe stops after its first verdict.
pub fn spawn_probe_loop(
    kind: ProbeKind,
    probe: Probe,
    target: ProbeTarget,
    tag: ContainerTag,
    reports: mpsc::UnboundedSender<ProbeReport>,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        let secs = |v: Option<i32>, default: i32| {
            Duration::from_secs(u64::try_from(v.unwrap_or(default)).unwrap_or(0))
        };
        let initial_delay = secs(probe.initial_delay_seconds, 0);
        let period = secs(probe.period_seconds, DEFAULT_PERIOD_SECONDS).max(Duration::from_secs(1));
        let timeout =
            secs(probe.timeout_seconds, DEFAULT_TIMEOUT_SECONDS).max(Duration::from_secs(1));
        let mut tracker = ProbeTracker::new(kind, &probe);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(initial_delay) => {}
        }
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                r = probe_once(&probe, &target, timeout) => r,
            };
            let message = outcome.as_ref().err().cloned().unwrap_or_default();
            if let Some(healthy) = tracker.record(outcome.is_ok()) {
                tracing::debug!(?kind, ?tag, healthy, %message, "probe verdict changed");
                if reports
                    .send(ProbeReport {
                        tag,
                        kind,
                        healthy,
                        message,
                    })
                    .is_err()
                {
                    return;
                }
                if kind == ProbeKind::Startup {
                    return;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    });
}

/// One probe attempt; `Err` carries the failure text.
pub async fn probe_once(
    probe: &Probe,
    target: &ProbeTarget,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        if let Some(http) = &probe.http_get {
            let port = resolve_port(&http.port, &target.named_ports)?;
            let host = http
                .host
                .clone()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| target.ip.to_string());
            if http
                .scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
            {
                return tcp_connect(&host, port).await;
            }
            http_get(&host, port, http).await
        } else if let Some(tcp) = &probe.tcp_socket {
            let port = resolve_port(&tcp.port, &target.named_ports)?;
            let host = tcp
                .host
                .clone()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| target.ip.to_string());
            tcp_connect(&host, port).await
        } else if let Some(grpc) = &probe.grpc {
            let port =
                u16::try_from(grpc.port).map_err(|_| format!("invalid port {}", grpc.port))?;
            tcp_connect(&target.ip.to_string(), port).await
        } else if let Some(exec) = &probe.exec {
            exec_in_container(exec.command.as_deref().unwrap_or_default(), target).await
        } else {
            Err("probe has no handler".to_string())
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {}s", timeout.as_secs())),
    }
}

fn resolve_port(port: &IntOrString, named: &HashMap<String, u16>) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(s) => match s.parse::<u16>() {
            Ok(n) => Ok(n),
            Err(_) => named
                .get(s)
                .copied()
                .ok_or_else(|| format!("no container port named {s:?}")),
        },
    }
}

async fn tcp_connect(host: &str, port: u16) -> Result<(), String> {
    connect(host, port).await.map(drop)
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addr = match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    };
    TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("dial tcp {addr}: {e}"))
}

async fn http_get(host: &str, port: u16, action: &HTTPGetAction) -> Result<(), String> {
    let mut stream = connect(host, port).await?;
    let path = action
        .path
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    let headers = action.http_headers.iter().flatten();
    let host_header = headers
        .clone()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value.clone())
        .unwrap_or_else(|| match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            _ => format!("{host}:{port}"),
        });
    let mut request =
        format!("GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: kube-probe/1.36\r\n");
    for h in headers.filter(|h| !h.name.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("{}: {}\r\n", h.name, h.value));
    }
    request.push_str("Accept: */*\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write request: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < MAX_RESPONSE_HEAD {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read response: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let status = parse_status_code(&head).ok_or_else(|| "malformed HTTP response".to_string())?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {status}"))
    }
}

/// The status code of an HTTP/1.x status line.
pub fn parse_status_code(head: &[u8]) -> Option<u16> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

async fn exec_in_container(command: &[String], target: &ProbeTarget) -> Result<(), String> {
    if command.is_empty() {
        return Err("exec probe has no command".into());
    }
    let mut nsenter = tokio::process::Command::new(&target.nsenter);
    nsenter
        .arg(format!("--target={}", target.pid))
        .args(["--mount", "--uts"]);
    if let Some((uid, gid)) = target.run_as {
        nsenter
            .args(["--root", "--wd"])
            .arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={gid}"));
    }
    let output = nsenter
        .arg("--")
        .args(command)
        .env_clear()
        .envs(target.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("run exec probe: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Err(format!(
            "exec probe failed ({}): {}",
            output.status,
            text.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::json;
    use tokio::net::TcpListener;

    use super::*;

    fn probe(v: serde_json::Value) -> Probe {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn readiness_needs_successes_and_falls_after_failures() {
        let mut t = ProbeTracker::new(
            ProbeKind::Readiness,
            &probe(json!({"successThreshold": 2, "failureThreshold": 2})),
        );
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a success resets the failure count");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(false), None);
    }

    #[test]
    fn liveness_starts_healthy_and_startup_fails_at_threshold() {
        let mut t = ProbeTracker::new(ProbeKind::Liveness, &probe(json!({})));
        assert_eq!(
            (t.record(false), t.record(false), t.record(false)),
            (None, None, Some(false))
        );
        let mut t = ProbeTracker::new(ProbeKind::Startup, &probe(json!({"failureThreshold": 2})));
        assert_eq!((t.record(false), t.record(false)), (None, Some(false)));
        let mut t = ProbeTracker::new(ProbeKind::Startup, &probe(json!({})));
        assert_eq!(t.record(true), Some(true));
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(
            parse_status_code(b"HTTP/1.0 503 Service Unavailable\r\nX: y"),
            Some(503)
        );
        assert_eq!(parse_status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_code(b""), None);
    }

    fn target(ip: IpAddr) -> ProbeTarget {
        ProbeTarget {
            ip,
            named_ports: HashMap::new(),
            pid: std::process::id(),
            env: vec![],
            nsenter: "/usr/bin/nsenter".into(),
            run_as: None,
        }
    }

    async fn serve_once(listener: &TcpListener, response: &'static str) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            std::str::from_utf8(&buf[..n])
                .unwrap()
                .starts_with("GET /healthz HTTP/1.1\r\n")
        );
        s.write_all(response.as_bytes()).await.unwrap();
    }

    #[tokio::test]
    async fn http_and_tcp_probes_against_a_real_socket() {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut t = target(ip);
        t.named_ports.insert("http".into(), port);
        let http = probe(json!({"httpGet": {"path": "/healthz", "port": "http"}}));
        let timeout = Duration::from_secs(2);
        let ((), result) = tokio::join!(
            serve_once(&listener, "HTTP/1.1 503 Unavailable\r\n\r\n"),
            probe_once(&http, &t, timeout)
        );
        assert_eq!(result, Err("HTTP probe failed with statuscode: 503".into()));
        let (_, result) = tokio::join!(
            serve_once(&listener, "HTTP/1.1 200 OK\r\n\r\n"),
            probe_once(&http, &t, timeout)
        );
        assert_eq!(result, Ok(()));
        let tcp = probe(json!({"tcpSocket": {"port": port}}));
        assert_eq!(probe_once(&tcp, &t, timeout).await, Ok(()));
        // A port nothing ever listened on. (Not this listener's port after dropping it: a
        // process another test forks at that moment holds a copy of the listening socket
        // until its exec, and the kernel still completes connections to it.)
        let closed =
            probe(json!({"tcpSocket": {"port": kubemail_test_support::ports::free_port()}}));
        assert!(probe_once(&closed, &t, timeout).await.is_err());
        drop(listener);
    }
}
