//! Harness for the operator's cluster tests: the real `kubemail-operator` binary as a child
//! process against the local cluster (`e2e/local-cluster up`; `. .kubemail-local/env` sets
//! `KUBECONFIG` and `NATS_URL`), one namespace per test, bounded waits with clear messages.

#![allow(dead_code)]

pub mod maildomain;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};

/// Field manager of what the tests apply (not the operator's).
pub const TEST_MANAGER: &str = "kubemail-operator-tests";

/// A client for the local cluster; fails with instructions when it is not configured.
pub async fn client() -> Client {
    let path = std::env::var("KUBECONFIG").unwrap_or_else(|_| {
        panic!(
            "KUBECONFIG is not set: start the local cluster (e2e/local-cluster up) and source its \
             env (. .kubemail-local/env) before running the operator's cluster tests"
        )
    });
    let kc = Kubeconfig::read_from(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    let client = Client::try_from(config).expect("client");
    let version = tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await;
    match version {
        Ok(Ok(_)) => client,
        other => panic!(
            "the local cluster's API server does not answer ({other:?}); run e2e/local-cluster up"
        ),
    }
}

/// The NATS URL of the local cluster.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Installs the CRDs from `crds/` by server-side apply and waits until they are established.
pub async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (file, _) in kubemail_operator::crd::crds() {
        let text = std::fs::read_to_string(dir.join(file)).expect("read CRD");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("parse CRD");
        let name = crd.metadata.name.clone().expect("CRD name");
        api.patch(
            &name,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        wait_for(
            &format!("CRD {name} established"),
            Duration::from_secs(30),
            || async {
                let c = api.get(&name).await.ok()?;
                c.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            },
        )
        .await;
    }
}

/// A namespace of one test, deleted when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let name = format!("kmop-{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("kubemail.io/test".to_owned(), "operator".to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        Self { name }
    }

    /// A stream and subject prefix unique to this namespace (no overlap with other tests).
    pub fn nats_stream(&self) -> String {
        format!("KMOP_{}", self.name.replace('-', "_").to_uppercase())
    }

    pub fn subject_prefix(&self) -> String {
        format!("kmop.{}", self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("KUBEMAIL_TEST_KEEP").is_some() {
            eprintln!("keeping namespace {}", self.name);
            return;
        }
        let name = self.name.clone();
        // Drop cannot await, and the test's client is tied to the test's runtime (blocked
        // here): a fresh runtime on its own thread with its own client does the delete.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Runtime::new() else {
                return;
            };
            rt.block_on(async {
                let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(10), client_quiet()).await
                else {
                    return;
                };
                // The test's operator is gone by now: release the MailDomains it finalizes, or the
                // namespace would never finish terminating.
                let domains: Api<kubemail_operator::crd::MailDomain> =
                    Api::namespaced(client.clone(), &name);
                if let Ok(Ok(list)) =
                    tokio::time::timeout(Duration::from_secs(10), domains.list(&Default::default()))
                        .await
                {
                    for md in list {
                        let _ = domains
                            .patch(
                                &md.name_any(),
                                &PatchParams::default(),
                                &Patch::Merge(
                                    serde_json::json!({"metadata": {"finalizers": null}}),
                                ),
                            )
                            .await;
                    }
                }
                let api: Api<Namespace> = Api::all(client);
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    api.delete(&name, &DeleteParams::default()),
                )
                .await;
            });
        })
        .join();
    }
}

async fn client_quiet() -> Result<Client, String> {
    let path = std::env::var("KUBECONFIG").map_err(|e| e.to_string())?;
    let kc = Kubeconfig::read_from(&path).map_err(|e| e.to_string())?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Client::try_from(config).map_err(|e| e.to_string())
}

/// Polls `probe` every 250 ms until it yields a value or `timeout` passes (then panics with
/// `what`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The operator binary as a child process.
pub struct Operator {
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    pub admin: SocketAddr,
    pub identity: String,
}

/// Settings of one operator process.
#[derive(Clone)]
pub struct OperatorOptions {
    pub namespace: String,
    pub identity: String,
    pub nats_stream: String,
    pub subject_prefix: String,
    pub extra_args: Vec<String>,
    /// Kubeconfig of the operator; `None`: the test's own (`$KUBECONFIG`, cluster admin).
    pub kubeconfig: Option<String>,
}

impl OperatorOptions {
    pub fn for_namespace(ns: &TestNamespace, identity: &str) -> Self {
        Self {
            namespace: ns.name.clone(),
            identity: identity.to_owned(),
            nats_stream: ns.nats_stream(),
            subject_prefix: ns.subject_prefix(),
            extra_args: Vec::new(),
            kubeconfig: None,
        }
    }
}

impl Operator {
    /// Starts `kubemail-operator` watching only the test namespace (which also holds its Lease
    /// and CA) and waits for its admin endpoint.
    pub fn start(opts: &OperatorOptions) -> Self {
        let kubeconfig = opts
            .kubeconfig
            .clone()
            .unwrap_or_else(|| std::env::var("KUBECONFIG").expect("KUBECONFIG"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubemail-operator"));
        cmd.args([
            "--kubeconfig",
            &kubeconfig,
            "--watch-namespace",
            &opts.namespace,
            "--namespace",
            &opts.namespace,
            "--identity",
            &opts.identity,
            "--admin-address",
            "127.0.0.1:0",
            "--node-image",
            "kubemail/smtp-node:test",
            "--nats-url",
            &nats_url(),
            "--nats-stream",
            &opts.nats_stream,
            "--nats-subject-prefix",
            &opts.subject_prefix,
            // Short lease timings keep the leader tests quick; a leader still survives two
            // lease updates in a row that time out on a loaded machine.
            "--lease-duration",
            "6s",
            "--lease-renew-deadline",
            "4500ms",
            "--lease-retry-period",
            "1s",
            "--probe-timeout",
            "5s",
            // The local cluster's pods share one network namespace: each node binds its pod IP.
            "--node-bind-pod-ip",
        ])
        // A test that sets its own NATS security flags (the bundled-NATS bootstrap) gets
        // none of the local cluster's.
        .args(
            if opts.extra_args.iter().any(|a| a.starts_with("--nats-")) {
                Vec::new()
            } else {
                nats_security_args()
            },
        )
        // The DNS check writes a condition of its own at times of its choosing: off, unless
        // a test asks for it (the tests of restarts compare statuses).
        .args(
            if opts
                .extra_args
                .iter()
                .any(|a| a.starts_with("--dns-check-interval"))
            {
                Vec::new()
            } else {
                vec!["--dns-check-interval".to_owned(), "0s".to_owned()]
            },
        )
        .args(&opts.extra_args)
        .env("RUST_LOG", "info,kube_runtime=warn,kube_client=warn")
        .env("KUBEMAIL_LOG_FORMAT", "text")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start kubemail-operator");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(addr) = line
                        .contains("admin endpoint listening")
                        .then(|| line.split("address=").nth(1))
                        .flatten()
                        .and_then(|a| a.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                    {
                        let _ = tx.send(addr);
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let admin = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the operator did not report its admin address within 30 s; logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Self {
            child: Some(child),
            logs,
            admin,
            identity: opts.identity.clone(),
        }
    }

    /// Everything the operator logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").unwrap_or_default()
    }

    /// A metric's value (first sample whose name and labels start with `prefix`).
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn maildomain_reconciles(&self) -> f64 {
        self.metric("kubemail_operator_reconciles_total{controller=\"maildomain\"}")
    }

    pub fn is_leader(&self) -> bool {
        self.metric("kubemail_operator_leader ") >= 1.0
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit (SIGKILL after that).
    pub fn stop(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGKILL: a crash, no lease release.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.1 GET on loopback.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, rest) = body.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| rest.to_owned())
}

/// The operator flags for the local cluster's authenticated, TLS-only NATS (the account keys
/// and CA that `e2e/local-cluster` made, named in its env file); none for a bare NATS.
pub fn nats_security_args() -> Vec<String> {
    let mut args = Vec::new();
    if let Ok(dir) = std::env::var("NATS_ACCOUNT_DIR") {
        args.extend(["--nats-account-dir".to_owned(), dir]);
    }
    if let Ok(ca) = std::env::var("NATS_CA") {
        args.extend(["--nats-ca-file".to_owned(), ca]);
    }
    args
}

/// Whether the local cluster's NATS requires credentials (the operator then mints a
/// credentials Secret per MailDomain).
pub fn nats_authenticated() -> bool {
    std::env::var_os("NATS_ACCOUNT_DIR").is_some()
}

/// A client of the local cluster's NATS with the test user's credentials (`NATS_CREDS`) and
/// its CA (`NATS_CA`) when the env names them.
pub async fn nats_connect() -> Option<async_nats::Client> {
    let mut options = match std::env::var("NATS_CREDS") {
        Ok(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .ok()?,
        Err(_) => async_nats::ConnectOptions::new(),
    };
    if let Ok(ca) = std::env::var("NATS_CA") {
        options = options.add_root_certificates(ca.into()).require_tls(true);
    }
    options
        .connection_timeout(Duration::from_secs(5))
        .connect(nats_url().split(',').map(str::to_owned).collect::<Vec<_>>())
        .await
        .ok()
}

/// Deletes a JetStream stream if it exists (test clean-up).
pub async fn delete_stream(name: &str) {
    if let Some(client) = nats_connect().await {
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(name).await;
    }
}
