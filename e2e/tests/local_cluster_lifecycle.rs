//! `e2e/local-cluster up` then `down` on a second, private instance (own state dir, own free
//! ports) leaves no process of ours behind: every recorded pid is gone, and no process anywhere
//! still refers to the instance's state directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use kubemail_e2e::local_env::workspace_root;
use kubemail_test_support::ports::free_port;

fn local_cluster(state: &Path, ports: &[(&str, u16)], verb: &str) -> std::process::Output {
    let mut cmd = Command::new(workspace_root().join("e2e/local-cluster"));
    cmd.arg(verb).env("KUBEMAIL_LOCAL", state);
    for (k, v) in ports {
        cmd.env(k, v.to_string());
    }
    let out = cmd.output().expect("run e2e/local-cluster");
    eprintln!(
        "local-cluster {verb}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn recorded_pids(state: &Path) -> Vec<(String, i32)> {
    let Ok(dir) = std::fs::read_dir(state.join("pids")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let name = e
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".pid")
                .to_string();
            let pid = std::fs::read_to_string(e.path())
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((name, pid))
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    // A zombie has no cmdline and is already dead for our purposes.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// Processes whose command line or working directory mentions `needle`.
fn processes_referring_to(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in proc_dir.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.parse::<u32>().is_err() || name == std::process::id().to_string() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        if cmdline.contains(needle) || cwd.starts_with(needle) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

#[test]
fn down_leaves_no_process_of_ours_running() {
    let state: PathBuf =
        std::env::temp_dir().join(format!("kubemail-lifecycle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let names = [
        "ETCD_PORT",
        "ETCD_PEER_PORT",
        "API_PORT",
        "KCM_PORT",
        "NATS_PORT",
        "NATS_MONITOR_PORT",
        "MAILPIT_SMTP_PORT",
        "MAILPIT_HTTP_PORT",
        "DNS_PORT",
        "OTLP_GRPC_PORT",
        "OTLP_HTTP_PORT",
        "JAEGER_QUERY_PORT",
        "JAEGER_QUERY_GRPC_PORT",
        "JAEGER_HEALTH_PORT",
    ];
    let ports: Vec<(&str, u16)> = names.iter().map(|n| (*n, free_port())).collect();

    let up = local_cluster(&state, &ports, "up");
    let pids = recorded_pids(&state);
    if !up.status.success() {
        local_cluster(&state, &ports, "down");
        panic!("local-cluster up failed");
    }
    let expected = [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "node-agent",
        "nats-server",
        "mailpit",
        "dns",
        "jaeger",
    ];
    for name in expected {
        let pid = pids
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("{name} has no pid file after up: {pids:?}"));
        assert!(alive(pid), "{name} (pid {pid}) is not running after up");
    }
    let status = local_cluster(&state, &ports, "status");
    assert!(status.status.success(), "status says not running after up");

    let down = local_cluster(&state, &ports, "down");
    assert!(down.status.success(), "local-cluster down failed");
    for (name, pid) in &pids {
        assert!(!alive(*pid), "{name} (pid {pid}) still running after down");
    }
    let left = processes_referring_to(&state.to_string_lossy());
    assert!(left.is_empty(), "processes left after down: {left:#?}");
    assert!(
        !state.exists(),
        "state dir {} left after down",
        state.display()
    );
}
