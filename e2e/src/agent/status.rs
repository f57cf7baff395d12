//! Pod status as the kubelet would report it, built from the agent's view of its processes:
//! phase (the kubelet's `getPhase` rules), the conditions PodScheduled, PodReadyToStartContainers,
//! Initialized, ContainersReady and Ready (with readiness gates), pod/host IPs and container
//! statuses with `proc://<pid>` container IDs. Pure; the pod runner patches the result through
//! the status subresource.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_RUNNING: &str = "Running";
pub const PHASE_SUCCEEDED: &str = "Succeeded";
pub const PHASE_FAILED: &str = "Failed";

/// The condition types this agent owns; any other condition in the pod status is kept.
const OWN_CONDITIONS: [&str; 5] = [
    "PodScheduled",
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
];

/// How one run of a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    pub pid: Option<u32>,
}

/// What a container is doing now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        pid: u32,
        started_at: Timestamp,
    },
    Terminated(Termination),
}

/// The agent's view of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub state: RunState,
    pub last_termination: Option<Termination>,
    pub restart_count: i32,
    pub ready: bool,
    pub started: bool,
}

/// The agent's view of one pod.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    pub pod: &'a Pod,
    pub init_containers: Vec<ContainerView>,
    pub containers: Vec<ContainerView>,
    /// Volumes materialised and the address assigned: containers can be started.
    pub sandbox_ready: bool,
    pub initialized: bool,
    pub pod_ip: Option<IpAddr>,
    pub host_ip: IpAddr,
    pub start_time: Option<Timestamp>,
}

/// Phase of the pod by the kubelet's rules.
pub fn pod_phase(view: &PodView<'_>) -> &'static str {
    let policy = restart_policy(view.pod);
    if !view.initialized {
        let init_failed = view
            .init_containers
            .iter()
            .any(|c| matches!(&c.state, RunState::Terminated(t) if t.exit_code != 0));
        return if init_failed && policy == "Never" {
            PHASE_FAILED
        } else {
            PHASE_PENDING
        };
    }
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in &view.containers {
        match &c.state {
            RunState::Running { .. } => running += 1,
            RunState::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            RunState::Waiting { .. } => match &c.last_termination {
                Some(t) => {
                    stopped += 1;
                    if t.exit_code == 0 {
                        succeeded += 1;
                    }
                }
                None => waiting += 1,
            },
        }
    }
    if waiting > 0 || view.containers.is_empty() {
        PHASE_PENDING
    } else if running > 0 || policy == "Always" {
        // Running, or all stopped but about to be restarted.
        PHASE_RUNNING
    } else if stopped == succeeded {
        PHASE_SUCCEEDED
    } else if policy == "Never" {
        PHASE_FAILED
    } else {
        PHASE_RUNNING
    }
}

/// The pod's restart policy, defaulting like the API server.
pub fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

/// Whether `phase` is final.
pub fn is_terminal(phase: &str) -> bool {
    phase == PHASE_SUCCEEDED || phase == PHASE_FAILED
}

/// Builds the full status. `previous` supplies condition transition times (and the
/// conditions other writers own); `now` stamps the conditions whose status changed.
pub fn build_status(view: &PodView<'_>, previous: Option<&PodStatus>, now: Timestamp) -> PodStatus {
    let phase = pod_phase(view);
    let terminal = is_terminal(phase);
    let all_ready = !view.containers.is_empty() && view.containers.iter().all(|c| c.ready);
    let unready: Vec<&str> = view
        .containers
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let unready_msg = format!("containers with unready status: [{}]", unready.join(" "));
    let uninitialized: Vec<&str> = view
        .init_containers
        .iter()
        .filter(|c| !matches!(&c.state, RunState::Terminated(t) if t.exit_code == 0))
        .map(|c| c.name.as_str())
        .collect();

    let previous_conditions = previous
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let gates_ok = readiness_gates_met(view.pod, previous_conditions);
    let reason_if = |ok: bool, reason: &str| if ok { None } else { Some(reason.to_string()) };
    let (ready_reason, ready_msg) = if terminal {
        (Some("PodCompleted".to_string()), None)
    } else if !all_ready {
        (
            Some("ContainersNotReady".to_string()),
            Some(unready_msg.clone()),
        )
    } else if !gates_ok {
        (
            Some("ReadinessGatesNotReady".to_string()),
            Some("the status of pod readiness gates is not \"True\"".into()),
        )
    } else {
        (None, None)
    };
    let (ready_now, containers_ready) =
        (all_ready && gates_ok && !terminal, all_ready && !terminal);
    let own = [
        ("PodScheduled", true, None, None),
        (
            "PodReadyToStartContainers",
            view.sandbox_ready && !terminal,
            None,
            None,
        ),
        (
            "Initialized",
            view.initialized,
            reason_if(view.initialized, "ContainersNotInitialized"),
            (!view.initialized).then(|| {
                format!(
                    "containers with incomplete status: [{}]",
                    uninitialized.join(" ")
                )
            }),
        ),
        (
            "ContainersReady",
            containers_ready,
            if terminal {
                Some("PodCompleted".to_string())
            } else {
                reason_if(all_ready, "ContainersNotReady")
            },
            (!all_ready && !terminal).then(|| unready_msg.clone()),
        ),
        ("Ready", ready_now, ready_reason, ready_msg),
    ];
    let mut conditions: Vec<PodCondition> = own
        .into_iter()
        .map(|(type_, ok, reason, message)| {
            let status = if ok { "True" } else { "False" }.to_string();
            let since = previous_conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .and_then(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            PodCondition {
                type_: type_.to_string(),
                status,
                reason,
                message,
                last_transition_time: Some(since),
                ..Default::default()
            }
        })
        .collect();
    conditions.extend(
        previous_conditions
            .iter()
            .filter(|c| !OWN_CONDITIONS.contains(&c.type_.as_str()))
            .cloned(),
    );

    let has_init = view
        .pod
        .spec
        .as_ref()
        .is_some_and(|s| s.init_containers.as_ref().is_some_and(|i| !i.is_empty()));
    PodStatus {
        phase: Some(phase.to_string()),
        conditions: Some(conditions),
        host_ip: Some(view.host_ip.to_string()),
        host_ips: Some(vec![HostIP {
            ip: view.host_ip.to_string(),
        }]),
        pod_ip: view.pod_ip.map(|ip| ip.to_string()),
        pod_ips: view.pod_ip.map(|ip| vec![PodIP { ip: ip.to_string() }]),
        start_time: view.start_time.map(Time),
        init_container_statuses: has_init
            .then(|| view.init_containers.iter().map(container_status).collect()),
        container_statuses: Some(view.containers.iter().map(container_status).collect()),
        observed_generation: view.pod.metadata.generation,
        ..Default::default()
    }
}

/// The `proc://<pid>` container ID the agent reports for a process.
pub fn container_id(pid: u32) -> String {
    format!("proc://{pid}")
}

/// Parses a `proc://<pid>` container ID.
pub fn pid_from_container_id(id: &str) -> Option<u32> {
    id.strip_prefix("proc://")?.parse().ok()
}

fn container_status(c: &ContainerView) -> ContainerStatus {
    let (state, id) = match &c.state {
        RunState::Waiting { reason, message } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            c.last_termination.as_ref().and_then(|t| t.pid),
        ),
        RunState::Running { pid, started_at } => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*started_at)),
                }),
                ..Default::default()
            },
            Some(*pid),
        ),
        RunState::Terminated(t) => (
            ContainerState {
                terminated: Some(terminated(t)),
                ..Default::default()
            },
            t.pid,
        ),
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: String::new(),
        container_id: id.map(container_id),
        state: Some(state),
        last_state: Some(ContainerState {
            terminated: c.last_termination.as_ref().map(terminated),
            ..Default::default()
        }),
        ready: c.ready,
        started: Some(c.started),
        restart_count: c.restart_count,
        ..Default::default()
    }
}

fn terminated(t: &Termination) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: t.exit_code,
        signal: t.signal,
        reason: Some(t.reason.clone()),
        message: t.message.clone(),
        started_at: t.started_at.map(Time),
        finished_at: Some(Time(t.finished_at)),
        container_id: t.pid.map(container_id),
    }
}

fn readiness_gates_met(pod: &Pod, conditions: &[PodCondition]) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.readiness_gates.iter().flatten())
        .all(|gate| {
            conditions
                .iter()
                .any(|c| c.type_ == gate.condition_type && c.status == "True")
        })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::json;

    use super::*;

    fn pod(policy: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "generation": 2},
            "spec": {"restartPolicy": policy, "containers": [{"name": "a"}, {"name": "b"}]}
        }))
        .unwrap()
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn running(name: &str, ready: bool) -> ContainerView {
        ContainerView {
            name: name.into(),
            image: "busybox".into(),
            state: RunState::Running {
                pid: 42,
                started_at: t(0),
            },
            last_termination: None,
            restart_count: 0,
            ready,
            started: true,
        }
    }

    fn exited(name: &str, code: i32) -> ContainerView {
        let term = Termination {
            exit_code: code,
            signal: None,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: Some(t(0)),
            finished_at: t(5),
            pid: Some(43),
        };
        ContainerView {
            state: RunState::Terminated(term),
            ready: false,
            started: false,
            ..running(name, false)
        }
    }

    fn backing_off(name: &str, code: i32) -> ContainerView {
        let RunState::Terminated(term) = exited(name, code).state else {
            unreachable!()
        };
        ContainerView {
            state: RunState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: None,
            },
            last_termination: Some(term),
            restart_count: 1,
            ..running(name, false)
        }
    }

    fn never_started(name: &str) -> ContainerView {
        ContainerView {
            state: RunState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            ..running(name, false)
        }
    }

    fn view(pod: &Pod, containers: Vec<ContainerView>) -> PodView<'_> {
        PodView {
            pod,
            init_containers: vec![],
            containers,
            sandbox_ready: true,
            initialized: true,
            pod_ip: Some(IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1))),
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            start_time: Some(t(0)),
        }
    }

    #[test]
    fn phase_follows_kubelet_rules() {
        let always = pod("Always");
        let never = pod("Never");
        let on_failure = pod("OnFailure");
        let phase = |p: &Pod, c: Vec<ContainerView>| pod_phase(&view(p, c));
        assert_eq!(
            phase(&always, vec![running("a", true), never_started("b")]),
            PHASE_PENDING
        );
        assert_eq!(
            phase(&always, vec![running("a", true), running("b", false)]),
            PHASE_RUNNING
        );
        assert_eq!(
            phase(&always, vec![backing_off("a", 1), exited("b", 0)]),
            PHASE_RUNNING
        );
        assert_eq!(
            phase(&never, vec![exited("a", 0), exited("b", 0)]),
            PHASE_SUCCEEDED
        );
        assert_eq!(
            phase(&never, vec![exited("a", 0), exited("b", 2)]),
            PHASE_FAILED
        );
        assert_eq!(
            phase(&never, vec![running("a", true), exited("b", 2)]),
            PHASE_RUNNING
        );
        assert_eq!(
            phase(&on_failure, vec![exited("a", 0), backing_off("b", 1)]),
            PHASE_RUNNING
        );
        assert_eq!(
            phase(&on_failure, vec![exited("a", 0), exited("b", 0)]),
            PHASE_SUCCEEDED
        );
        let mut v = view(&never, vec![never_started("a"), never_started("b")]);
        v.initialized = false;
        v.init_containers = vec![exited("init", 1)];
        assert_eq!(pod_phase(&v), PHASE_FAILED);
    }

    #[test]
    fn ready_needs_every_container_ready_and_keeps_transition_times() {
        let p = pod("Always");
        let s = build_status(
            &view(&p, vec![running("a", true), running("b", false)]),
            None,
            t(10),
        );
        let cond = |s: &PodStatus, ty: &str| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == ty)
                .cloned()
                .unwrap()
        };
        assert_eq!(s.phase.as_deref(), Some(PHASE_RUNNING));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(
            cond(&s, "ContainersReady").message.as_deref(),
            Some("containers with unready status: [b]")
        );
        assert_eq!(cond(&s, "PodScheduled").status, "True");
        assert_eq!(cond(&s, "Initialized").status, "True");
        assert_eq!(s.pod_ip.as_deref(), Some("127.1.0.1"));
        assert_eq!(s.pod_ips.as_ref().unwrap()[0].ip, "127.1.0.1");
        assert_eq!(s.observed_generation, Some(2));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(cs.container_id.as_deref(), Some("proc://42"));
        assert!(cs.state.as_ref().unwrap().running.is_some());

        let s2 = build_status(
            &view(&p, vec![running("a", true), running("b", true)]),
            Some(&s),
            t(20),
        );
        assert_eq!(cond(&s2, "Ready").status, "True");
        assert_eq!(
            cond(&s2, "Ready").last_transition_time,
            Some(Time(t(20))),
            "flipped now"
        );
        assert_eq!(
            cond(&s2, "PodScheduled").last_transition_time,
            Some(Time(t(10))),
            "unchanged keeps its time"
        );
        let s3 = build_status(
            &view(&p, vec![running("a", true), running("b", true)]),
            Some(&s2),
            t(30),
        );
        assert_eq!(s3, s2, "nothing changed, nothing to patch");
    }

    #[test]
    fn readiness_gates_and_foreign_conditions() {
        let mut p = pod("Always");
        p.spec.as_mut().unwrap().readiness_gates = Some(vec![
            serde_json::from_value(json!({"conditionType": "example.com/lb"})).unwrap(),
        ]);
        let v = view(&p, vec![running("a", true), running("b", true)]);
        let s = build_status(&v, None, t(0));
        let ready = |s: &PodStatus| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == "Ready")
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(ready(&s), "False");
        let mut with_gate = s.clone();
        with_gate.conditions.as_mut().unwrap().push(PodCondition {
            type_: "example.com/lb".into(),
            status: "True".into(),
            ..Default::default()
        });
        let s = build_status(&v, Some(&with_gate), t(1));
        assert_eq!(ready(&s), "True");
        assert!(
            s.conditions
                .unwrap()
                .iter()
                .any(|c| c.type_ == "example.com/lb"),
            "foreign condition kept"
        );
    }

    #[test]
    fn restarting_container_reports_last_state_and_count() {
        let p = pod("Always");
        let s = build_status(
            &view(&p, vec![backing_off("a", 137), running("b", true)]),
            None,
            t(0),
        );
        let cs = &s.container_statuses.unwrap()[0];
        assert_eq!(cs.restart_count, 1);
        assert_eq!(
            cs.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("CrashLoopBackOff")
        );
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(
            (last.exit_code, last.container_id.as_deref()),
            (137, Some("proc://43"))
        );
        assert_eq!(pid_from_container_id("proc://43"), Some(43));
        assert_eq!(pid_from_container_id("containerd://x"), None);
    }
}
