//! The node agent against the real control plane: Deployments start and stop real processes,
//! pods see ConfigMap/Secret keys as env and files, readiness probes gate Ready, crashed
//! containers restart, and a pod's service account reaches the API from inside the pod.
//! Needs the local cluster with its node agent (`e2e/local-cluster up`, or `make test`).

#[path = "common/cluster.rs"]
mod cluster;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster::{
    TestCluster, WAIT, container_pid, is_ready, list_pods, phase, process_cmdline, wait_for,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kubemail_test_support::ports::free_port;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SLEEP_CMDLINE: &str = "sleep 3600";

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{"name": "sleep", "image": "busybox:1.36", "command": ["sleep", "3600"]}]
                }
            }
        }
    }))
    .expect("deployment manifest")
}

/// Waits until exactly `n` pods with `selector` exist, all Running and Ready, and returns the
/// pids of their `sleep` processes (checked in /proc) and their pod IPs.
async fn ready_sleepers(
    pods: &kube::Api<Pod>,
    selector: &str,
    n: usize,
) -> (BTreeSet<u32>, BTreeSet<IpAddr>) {
    wait_for(
        &format!("{n} Running+Ready pods with real sleep processes"),
        WAIT,
        || async {
            let list = list_pods(pods, selector).await;
            let summary = || {
                list.iter()
                    .map(|p| {
                        format!(
                            "{}:{}:ready={}:deleting={}",
                            p.metadata.name.as_deref().unwrap_or("?"),
                            phase(p),
                            is_ready(p),
                            p.metadata.deletion_timestamp.is_some()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if list.len() != n || !list.iter().all(|p| phase(p) == "Running" && is_ready(p)) {
                return Err(format!("{} pods: [{}]", list.len(), summary()));
            }
            let mut pids = BTreeSet::new();
            let mut ips = BTreeSet::new();
            for p in &list {
                let pid = container_pid(p, "sleep")
                    .ok_or_else(|| format!("no proc:// container id: [{}]", summary()))?;
                let cmdline = process_cmdline(pid).unwrap_or_default();
                if cmdline != SLEEP_CMDLINE {
                    return Err(format!("pid {pid} runs {cmdline:?}, not {SLEEP_CMDLINE:?}"));
                }
                pids.insert(pid);
                let ip = p
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_deref())
                    .unwrap_or_default();
                ips.insert(ip.parse::<IpAddr>().map_err(|_| format!("pod IP {ip:?}"))?);
            }
            Ok((pids, ips))
        },
    )
    .await
}

async fn processes_gone(pids: &BTreeSet<u32>) {
    wait_for(&format!("processes {pids:?} to exit"), WAIT, || async {
        let alive: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| process_cmdline(*p).as_deref() == Some(SLEEP_CMDLINE))
            .collect();
        if alive.is_empty() {
            Ok(())
        } else {
            Err(format!("still running: {alive:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn deployment_scaling_starts_and_stops_real_processes() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("agent-deploy").await;
    let deployments = ns.api::<Deployment>();
    let pods = ns.pods();
    deployments
        .create(&PostParams::default(), &deployment("sleepers", 2))
        .await
        .expect("create deployment");

    let (two, ips) = ready_sleepers(&pods, "app=sleepers", 2).await;
    assert_eq!(two.len(), 2, "two distinct processes");
    assert_eq!(ips.len(), 2, "each pod has its own address: {ips:?}");
    for ip in &ips {
        assert!(
            ip.is_loopback() && *ip != IpAddr::V4(Ipv4Addr::LOCALHOST),
            "pod IP {ip} must be a loopback address of its own"
        );
    }

    let scale = |n: i32| json!({"spec": {"replicas": n}});
    deployments
        .patch(
            "sleepers",
            &PatchParams::default(),
            &Patch::Merge(&scale(3)),
        )
        .await
        .expect("scale to 3");
    let (three, _) = ready_sleepers(&pods, "app=sleepers", 3).await;
    assert_eq!(three.len(), 3);
    assert!(
        two.is_subset(&three),
        "scaling up keeps the running processes: {two:?} ⊄ {three:?}"
    );

    deployments
        .patch(
            "sleepers",
            &PatchParams::default(),
            &Patch::Merge(&scale(1)),
        )
        .await
        .expect("scale to 1");
    let (one, _) = ready_sleepers(&pods, "app=sleepers", 1).await;
    let stopped: BTreeSet<u32> = three.difference(&one).copied().collect();
    assert_eq!(stopped.len(), 2);
    processes_gone(&stopped).await;

    deployments
        .delete("sleepers", &DeleteParams::background())
        .await
        .expect("delete deployment");
    wait_for("every pod of the deployment to be gone", WAIT, || async {
        let left = list_pods(&pods, "app=sleepers").await;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{} pods left", left.len()))
        }
    })
    .await;
    processes_gone(&one).await;
    ns.delete().await;
}

#[tokio::test]
async fn pod_sees_config_map_and_secret_as_env_and_files() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("agent-config").await;
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"key": "cm-value"}}))
            .unwrap();
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "sec"}, "stringData": {"key": "secret-value"}}),
    )
    .unwrap();
    ns.api::<ConfigMap>()
        .create(&PostParams::default(), &cm)
        .await
        .expect("create configmap");
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let script = r#"
        echo "env: $A $B"
        echo "files: $(cat /opt/kubemail-e2e/cfg/key) $(cat /opt/kubemail-e2e/sec/key)"
        if touch /opt/kubemail-e2e/cfg/x 2>/dev/null; then echo "cfg: writable"; else echo "cfg: read-only"; fi
        echo "$A $B $POD_IP" > /opt/kubemail-e2e/out/result
        exec sleep 3600
    "#;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "reader"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "reader", "image": "busybox", "command": ["sh", "-c", script],
                "env": [
                    {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "key"}}},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "key"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
                ],
                "volumeMounts": [
                    {"name": "cfg", "mountPath": "/opt/kubemail-e2e/cfg", "readOnly": true},
                    {"name": "sec", "mountPath": "/opt/kubemail-e2e/sec"},
                    {"name": "out", "mountPath": "/opt/kubemail-e2e/out"}
                ]
            }],
            "volumes": [
                {"name": "cfg", "configMap": {"name": "cfg"}},
                {"name": "sec", "secret": {"secretName": "sec"}},
                {"name": "out", "emptyDir": {}}
            ]
        }
    }))
    .unwrap();
    let pods = ns.pods();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let running = wait_for("pod reader to run", WAIT, || async {
        let p = pods.get("reader").await.map_err(|e| e.to_string())?;
        if phase(&p) == "Running" && container_pid(&p, "reader").is_some() {
            Ok(p)
        } else {
            Err(format!("phase {:?}", phase(&p)))
        }
    })
    .await;
    let uid = running.metadata.uid.clone().expect("uid");
    let pod_ip = running
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");

    let log_path = cluster.pod_log(&ns.name, "reader", "reader");
    let log = wait_for(
        &format!("the container's output in {}", log_path.display()),
        WAIT,
        || async {
            let log = std::fs::read_to_string(&log_path).map_err(|e| e.to_string())?;
            if log.contains("cfg: ") {
                Ok(log)
            } else {
                Err(format!("{log:?}"))
            }
        },
    )
    .await;
    assert!(
        log.contains("env: cm-value secret-value\n"),
        "env vars from ConfigMap and Secret: {log:?}"
    );
    assert!(
        log.contains("files: cm-value secret-value\n"),
        "files at the mountPaths: {log:?}"
    );
    assert!(
        log.contains("cfg: read-only\n"),
        "readOnly volumeMount: {log:?}"
    );

    let result_path = cluster.pod_volume(&uid, "out").join("result");
    let result = wait_for("the emptyDir file", WAIT, || async {
        std::fs::read_to_string(&result_path).map_err(|e| format!("{}: {e}", result_path.display()))
    })
    .await;
    assert_eq!(result, format!("cm-value secret-value {pod_ip}\n"));
    ns.delete().await;
}

/// Serves HTTP on `listener`: 200 while `healthy`, else 503.
fn serve_health(listener: TcpListener, healthy: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let healthy = healthy.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let reply = if healthy.load(Ordering::SeqCst) {
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                } else {
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                };
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    })
}

fn container_ready(pod: &Pod, name: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == name))
        .is_some_and(|c| c.ready)
}

#[tokio::test]
async fn readiness_probes_gate_ready_until_the_ports_answer() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("agent-probe").await;
    let (http_port, tcp_port) = (free_port(), free_port());
    let probe = |handler: serde_json::Value| {
        let mut p = json!({"periodSeconds": 1, "failureThreshold": 1, "successThreshold": 1});
        p.as_object_mut()
            .unwrap()
            .extend(handler.as_object().unwrap().clone());
        p
    };
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probed"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {"name": "http", "image": "busybox", "command": ["sleep", "3600"],
                 "ports": [{"name": "health", "containerPort": http_port}],
                 "readinessProbe": probe(json!({"httpGet": {"path": "/healthz", "port": "health"}}))},
                {"name": "tcp", "image": "busybox", "command": ["sleep", "3600"],
                 "readinessProbe": probe(json!({"tcpSocket": {"port": tcp_port}}))}
            ]
        }
    }))
    .unwrap();
    let pods = ns.pods();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let get = || async { pods.get("probed").await.map_err(|e| e.to_string()) };
    let running = wait_for("pod probed to run", WAIT, || async {
        let p = get().await?;
        if phase(&p) == "Running" {
            Ok(p)
        } else {
            Err(format!("phase {:?}", phase(&p)))
        }
    })
    .await;
    let pod_ip: IpAddr = running
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .expect("pod IP");

    // Nothing listens yet: several probe periods pass without Ready.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = get().await.unwrap();
    assert!(
        !is_ready(&p) && !container_ready(&p, "http") && !container_ready(&p, "tcp"),
        "ready with nothing listening"
    );

    // An HTTP server answering 503 is not enough.
    let healthy = Arc::new(AtomicBool::new(false));
    let http = TcpListener::bind((pod_ip, http_port))
        .await
        .expect("bind the probe port on the pod IP");
    let server = serve_health(http, healthy.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !container_ready(&get().await.unwrap(), "http"),
        "ready although the endpoint answers 503"
    );

    // 200: the http container turns ready; the pod still waits for the tcp one.
    healthy.store(true, Ordering::SeqCst);
    wait_for("the http container to be ready", WAIT, || async {
        let p = get().await?;
        if container_ready(&p, "http") {
            Ok(p)
        } else {
            Err("http not ready".into())
        }
    })
    .await;
    assert!(
        !is_ready(&get().await.unwrap()),
        "pod Ready before its tcp probe passed"
    );

    let _tcp = TcpListener::bind((pod_ip, tcp_port))
        .await
        .expect("bind the tcp probe port");
    wait_for("pod Ready once both ports answer", WAIT, || async {
        let p = get().await?;
        if is_ready(&p) {
            Ok(())
        } else {
            Err(format!(
                "conditions {:?}",
                p.status.and_then(|s| s.conditions)
            ))
        }
    })
    .await;

    // The HTTP endpoint goes away: readiness is withdrawn.
    server.abort();
    let _ = server.await;
    wait_for(
        "pod not Ready after the http endpoint went away",
        WAIT,
        || async {
            let p = get().await?;
            if !is_ready(&p) && !container_ready(&p, "http") {
                Ok(())
            } else {
                Err("still ready".into())
            }
        },
    )
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn crashed_container_is_restarted_with_growing_restart_count() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("agent-crash").await;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "crasher"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "echo started; exit 3"]}]}
    }))
    .unwrap();
    let pods = ns.pods();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let status = wait_for("two restarts", WAIT, || async {
        let p = pods.get("crasher").await.map_err(|e| e.to_string())?;
        let cs = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first().cloned());
        match cs {
            Some(c) if c.restart_count >= 2 => Ok(c),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let last = status
        .last_state
        .and_then(|s| s.terminated)
        .expect("last termination recorded");
    assert_eq!(last.exit_code, 3);
    let log = std::fs::read_to_string(cluster.pod_log(&ns.name, "crasher", "c")).expect("log file");
    assert!(
        log.matches("started").count() >= 2,
        "each run appends to the log: {log:?}"
    );
    ns.delete().await;
}

#[tokio::test]
async fn pod_service_account_reaches_the_api_from_inside_the_pod() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("agent-sa").await;
    // The default service account may not list pods: a 403 naming it proves that the token,
    // the CA bundle, the namespace file and KUBERNETES_SERVICE_HOST/PORT all work in the pod.
    let script = r#"
        SA=/var/run/secrets/kubernetes.io/serviceaccount
        echo "namespace: $(cat $SA/namespace)"
        curl -sS --max-time 10 --cacert $SA/ca.crt -H "Authorization: Bearer $(cat $SA/token)" \
          "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/$(cat $SA/namespace)/pods"
        echo
        echo "done"
        exec sleep 3600
    "#;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "client"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "client", "image": "curlimages/curl", "command": ["sh", "-c", script]}]
        }
    }))
    .unwrap();
    ns.pods()
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let log_path = cluster.pod_log(&ns.name, "client", "client");
    let log = wait_for("the in-pod API call", WAIT, || async {
        let log = std::fs::read_to_string(&log_path).map_err(|e| e.to_string())?;
        if log.contains("done") {
            Ok(log)
        } else {
            Err(format!("{log:?}"))
        }
    })
    .await;
    assert!(log.contains(&format!("namespace: {}\n", ns.name)), "{log}");
    assert!(
        log.contains(&format!("system:serviceaccount:{}:default", ns.name))
            && log.contains("\"code\": 403"),
        "expected a 403 for the pod's service account: {log}"
    );
    ns.delete().await;
}

/// A test image in the agent's image store, removed when dropped. Unlike kubemail's images it
/// has a shell and coreutils (the host's, with the libraries they load), so the container can
/// report what it sees.
struct StoreImage {
    reference: String,
    archive: std::path::PathBuf,
}

impl Drop for StoreImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.archive);
    }
}

fn shell_image(store: &std::path::Path) -> StoreImage {
    use kubemail_e2e::image_build::{Program, Recipe, write_image};
    use kubemail_e2e::oci::ContainerConfig;
    let name = cluster::unique_name("shell");
    let reference = format!("kubemail-test/{name}:1");
    let path = "/usr/local/bin:/usr/bin:/bin";
    let program = |tool: &str| Program {
        host_path: kubemail_e2e::agent::process::find_on_path(tool, path)
            .unwrap_or_else(|| panic!("host {tool}")),
        image_path: format!("/bin/{tool}"),
        strip_debug: false,
    };
    let recipe = Recipe {
        names: vec![reference.clone()],
        created: 1_700_000_000,
        programs: ["sh", "cat", "id", "touch", "sleep"]
            .into_iter()
            .map(program)
            .collect(),
        files: vec![
            (
                "/etc/passwd".into(),
                b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234::/home/app:/bin/sh\n".to_vec(),
                0o644,
            ),
            (
                "/etc/group".into(),
                b"root:x:0:\napp:x:1234:\nextra:x:2345:app\n".to_vec(),
                0o644,
            ),
        ],
        // The user's own directory: only a read-only root can refuse it writes.
        dirs: vec![("/work".into(), 0o755, 1234, 1234)],
        config: ContainerConfig {
            // Numeric, as runAsNonRoot needs to verify it; the name comes from /etc/passwd.
            user: Some("1234".into()),
            env: Some(vec![
                "PATH=/bin".into(),
                "IMAGE_VAR=from-image".into(),
                "SHARED=image".into(),
            ]),
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            cmd: Some(vec!["echo cmd: default; exec sleep 3600".into()]),
            working_dir: Some("/work".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let archive = store.join(format!("{name}.tar"));
    write_image(&recipe, &archive).expect("write the test image into the store");
    StoreImage { reference, archive }
}

async fn wait_for_log(
    cluster: &TestCluster,
    ns: &str,
    pod: &str,
    container: &str,
    last: &str,
) -> String {
    let path = cluster.pod_log(ns, pod, container);
    wait_for(&format!("{last:?} in {}", path.display()), WAIT, || async {
        let log = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        if log.contains(last) {
            Ok(log)
        } else {
            Err(format!("{log:?}"))
        }
    })
    .await
}

#[tokio::test]
async fn pod_runs_from_its_image_root_as_the_image_user_with_env_volumes_and_read_only_root() {
    let cluster = TestCluster::connect().await;
    let store = cluster
        .image_store
        .clone()
        .expect("the node agent runs without an image store; start it with e2e/local-cluster up");
    let image = shell_image(&store);
    let ns = cluster.namespace("agent-image").await;
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"key": "cm-value"}}))
            .unwrap();
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "sec"}, "stringData": {"key": "secret-value"}}),
    )
    .unwrap();
    ns.api::<ConfigMap>()
        .create(&PostParams::default(), &cm)
        .await
        .expect("create configmap");
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let script = r#"
        echo "id: $(id -u) $(id -g) $(id -G)"
        echo "env: $IMAGE_VAR $SHARED $POD_VAR $HOME $PATH"
        echo "pwd: $(pwd)"
        echo "files: $(cat /etc/app/key) $(cat /etc/secret/key)"
        if touch /work/written 2>/dev/null; then echo "root: writable"; else echo "root: read-only"; fi
        if touch /scratch/written 2>/dev/null; then echo "scratch: writable"; else echo "scratch: read-only"; fi
        if [ -e /etc/os-release ] || [ -e /usr/bin/env ]; then echo "host: visible"; else echo "host: hidden"; fi
        echo "done"
        exec sleep 3600
    "#;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "imaged"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "securityContext": {"fsGroup": 3456, "runAsNonRoot": true},
            "containers": [
                {
                    "name": "main", "image": image.reference, "args": [script],
                    "env": [{"name": "SHARED", "value": "pod"}, {"name": "POD_VAR", "value": "pod-only"}],
                    "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false},
                    "readinessProbe": {"exec": {"command": ["/bin/touch", "/scratch/probed"]}, "periodSeconds": 1},
                    "volumeMounts": [
                        {"name": "cfg", "mountPath": "/etc/app", "readOnly": true},
                        {"name": "sec", "mountPath": "/etc/secret"},
                        {"name": "scratch", "mountPath": "/scratch"}
                    ]
                },
                {"name": "defaults", "image": image.reference}
            ],
            "volumes": [
                {"name": "cfg", "configMap": {"name": "cfg"}},
                {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o400}},
                {"name": "scratch", "emptyDir": {}}
            ]
        }
    }))
    .unwrap();
    let pods = ns.pods();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");

    let log = wait_for_log(&cluster, &ns.name, "imaged", "main", "done\n").await;
    let line = |prefix: &str| {
        log.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {log:?}"))
            .to_string()
    };
    let ids: Vec<u32> = line("id: ")["id: ".len()..]
        .split_whitespace()
        .map(|n| n.parse().expect("numeric id"))
        .collect();
    assert_eq!(
        &ids[..2],
        [1234, 1234],
        "uid and gid of the image user: {log:?}"
    );
    let groups: BTreeSet<u32> = ids[2..].iter().copied().collect();
    assert_eq!(
        groups,
        BTreeSet::from([1234, 2345, 3456]),
        "primary, the image's extra group and the pod's fsGroup: {log:?}"
    );
    assert_eq!(
        line("env: "),
        "env: from-image pod pod-only /home/app /bin",
        "image env under the pod's, HOME from the image's passwd"
    );
    assert_eq!(line("pwd: "), "pwd: /work", "the image's working directory");
    assert_eq!(
        line("files: "),
        "files: cm-value secret-value",
        "volumes inside the image root; the 0400 Secret readable through fsGroup"
    );
    assert_eq!(line("root: "), "root: read-only");
    assert_eq!(line("scratch: "), "scratch: writable");
    assert_eq!(line("host: "), "host: hidden", "nothing of the host's root");

    // The second container has no command or args: the image's entrypoint and cmd.
    let defaults = wait_for_log(&cluster, &ns.name, "imaged", "defaults", "cmd: default\n").await;
    assert_eq!(defaults, "cmd: default\n");

    // The exec probe ran inside the root as the image user and made the pod Ready.
    let running = wait_for("pod imaged Ready", WAIT, || async {
        let p = pods.get("imaged").await.map_err(|e| e.to_string())?;
        if is_ready(&p) {
            Ok(p)
        } else {
            Err(format!("phase {:?}, not Ready", phase(&p)))
        }
    })
    .await;
    let uid = running.metadata.uid.clone().expect("uid");
    let probed = cluster.pod_volume(&uid, "scratch").join("probed");
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(&probed).unwrap_or_else(|e| panic!("{}: {e}", probed.display())),
    );
    assert_eq!(owner, 1234, "the probe ran as the image user");
    let pid = container_pid(&running, "main").expect("main pid");
    assert_eq!(process_cmdline(pid).as_deref(), Some("sleep 3600"));

    // runAsNonRoot with an explicit root user: refused before anything runs.
    let root_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "as-root"},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 0},
            "containers": [{"name": "main", "image": image.reference}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &root_pod)
        .await
        .expect("create pod");
    let waiting = wait_for("as-root to be refused", WAIT, || async {
        let p = pods.get("as-root").await.map_err(|e| e.to_string())?;
        let waiting = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.clone())
            .filter(|w| w.reason.as_deref() == Some("CreateContainerConfigError"));
        waiting.ok_or_else(|| format!("status {:?}", p.status))
    })
    .await;
    assert_eq!(
        waiting.message.as_deref(),
        Some("container has runAsNonRoot and image will run as root")
    );
    ns.delete().await;
}
