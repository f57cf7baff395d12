//! Test access to the local real cluster and its node agent: a client from `KUBECONFIG` (else
//! `<workspace>/.kubemail-local/admin.kubeconfig`), a check that a node agent is running, a
//! namespace per test that is deleted at the end (even when the test panics), and bounded waits.

#![allow(dead_code)] // each test binary uses its own subset

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use kubemail_e2e::agent::node::{IMAGE_STORE_ANNOTATION, STATE_DIR_ANNOTATION};
use kubemail_e2e::local_env::workspace_root;

/// Default bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(60);
/// A node heartbeat older than this means no agent is running (it beats every 10 s).
const HEARTBEAT_MAX_AGE: Duration = Duration::from_secs(45);

/// The cluster and the node agent serving it.
pub struct TestCluster {
    pub client: Client,
    pub kubeconfig: PathBuf,
    pub node_name: String,
    /// The agent's state directory, from its Node's annotation.
    pub agent_state_dir: PathBuf,
    /// The agent's image store (`make images` output), when it runs with one.
    pub image_store: Option<PathBuf>,
}

impl TestCluster {
    /// Connects and checks that a node agent is alive; panics with what to do otherwise.
    pub async fn connect() -> Self {
        let kubeconfig = std::env::var_os("KUBECONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(".kubemail-local/admin.kubeconfig"));
        assert!(
            kubeconfig.is_file(),
            "the local cluster is not up: kubeconfig {} is missing; run `e2e/local-cluster up` (or `make test`)",
            kubeconfig.display()
        );
        let client = client_for(&kubeconfig).await;
        let version =
            tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await;
        match version {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!(
                "the API server in {} does not answer ({e}); run `e2e/local-cluster up` (or `make test`)",
                kubeconfig.display()
            ),
            Err(_) => panic!(
                "the API server in {} did not answer within 10 s",
                kubeconfig.display()
            ),
        }
        let (node_name, agent_state_dir, image_store) =
            live_agent_node(&client).await.unwrap_or_else(|why| {
                panic!(
                    "no node agent is running against {}: {why}; run `e2e/local-cluster up`",
                    kubeconfig.display()
                )
            });
        TestCluster {
            client,
            kubeconfig,
            node_name,
            agent_state_dir,
            image_store,
        }
    }

    /// A fresh namespace named `<prefix>-<unique>`.
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        let name = unique_name(prefix);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        // Pods need the namespace's default ServiceAccount (kcm creates it) and the
        // kube-root-ca.crt ConfigMap the agent mounts for it.
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &name);
        wait_for("the namespace's default ServiceAccount", WAIT, || async {
            sa.get_opt("default")
                .await
                .ok()
                .flatten()
                .ok_or_else(|| "not created yet".to_string())
        })
        .await;
        TestNamespace {
            name,
            client: self.client.clone(),
            kubeconfig: self.kubeconfig.clone(),
            deleted: false,
        }
    }

    /// Where the agent writes the logs of pod `namespace/name`.
    pub fn pod_log(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        kubemail_e2e::agent::log_dir(&self.agent_state_dir, namespace, pod)
            .join(format!("{container}.log"))
    }

    /// Where the agent materialised volume `volume` of the pod with `uid`.
    pub fn pod_volume(&self, uid: &str, volume: &str) -> PathBuf {
        self.agent_state_dir
            .join("pods")
            .join(uid)
            .join("volumes")
            .join(volume)
    }
}

/// A namespace that is deleted when the test ends.
pub struct TestNamespace {
    pub name: String,
    client: Client,
    kubeconfig: PathBuf,
    deleted: bool,
}

impl TestNamespace {
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace and waits until it is gone (which needs the agent to finalise
    /// every pod in it).
    pub async fn delete(mut self) {
        self.deleted = true;
        let api = Api::<Namespace>::all(self.client.clone());
        if let Err(e) = api.delete(&self.name, &DeleteParams::default()).await {
            panic!("delete namespace {}: {e}", self.name);
        }
        let name = self.name.clone();
        wait_for(&format!("namespace {name} to be deleted"), WAIT, || async {
            match api.get_opt(&name).await {
                Ok(None) => Ok(()),
                Ok(Some(ns)) => Err(format!("phase {:?}", ns.status.and_then(|s| s.phase))),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // A failed test still removes its namespace. The test's runtime is blocked here, so
        // the delete runs on its own thread with its own runtime and client.
        let (name, kubeconfig) = (self.name.clone(), self.kubeconfig.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let client = client_for(&kubeconfig).await;
                let _ = Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            });
        })
        .join();
    }
}

/// Polls `check` every 250 ms until it returns `Ok`, or panics after `timeout` with the last
/// `Err` (what was seen instead).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            panic!(
                "timed out after {}s waiting for {what}; last seen: {last}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Pods of `namespace` matching `selector` (e.g. `app=web`), including terminating ones.
pub async fn list_pods(pods: &Api<Pod>, selector: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

pub fn is_ready(pod: &Pod) -> bool {
    condition(pod, "Ready") == Some("True")
}

pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

pub fn condition<'a>(pod: &'a Pod, type_: &str) -> Option<&'a str> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

/// The pid of a container's process from its `proc://<pid>` container ID.
pub fn container_pid(pod: &Pod, container: &str) -> Option<u32> {
    let status = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == container)?;
    status.state.as_ref()?.running.as_ref()?;
    status
        .container_id
        .as_deref()?
        .strip_prefix("proc://")?
        .parse()
        .ok()
}

/// The command line of process `pid` (NUL-separated args joined by spaces), if it exists.
pub fn process_cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(args.join(" "))
}

/// Name for a test object: `<prefix>-<pid><time>`, lower-case and DNS-safe.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("read {}: {e}", kubeconfig.display()));
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("load {}: {e}", kubeconfig.display()));
    Client::try_from(config).unwrap_or_else(|e| panic!("client for {}: {e}", kubeconfig.display()))
}

/// The node of a live agent: Ready, with a recent heartbeat and the state-dir annotation.
async fn live_agent_node(client: &Client) -> Result<(String, PathBuf, Option<PathBuf>), String> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut seen = Vec::new();
    for node in nodes.items {
        let name = node.metadata.name.clone().unwrap_or_default();
        let Some(dir) = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(STATE_DIR_ANNOTATION))
            .cloned()
        else {
            seen.push(format!("{name}: not an agent node"));
            continue;
        };
        let ready = node
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .find(|c| c.type_ == "Ready");
        let fresh = ready.is_some_and(|c| {
            c.status == "True"
                && c.last_heartbeat_time.as_ref().is_some_and(|t| {
                    now.duration_since(t.0).as_secs() < HEARTBEAT_MAX_AGE.as_secs() as i64
                })
        });
        if fresh {
            let store = node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(IMAGE_STORE_ANNOTATION))
                .map(PathBuf::from);
            return Ok((name, PathBuf::from(dir), store));
        }
        seen.push(format!(
            "{name}: not Ready or heartbeat older than {}s",
            HEARTBEAT_MAX_AGE.as_secs()
        ));
    }
    Err(if seen.is_empty() {
        "the cluster has no nodes".into()
    } else {
        seen.join("; ")
    })
}
