//! Helpers for the chart and mail-cluster tests: finding the pinned tools (helm, kubectl,
//! python3 from the peers' venv) and running them with a clear failure when they are missing.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kubemail_e2e::local_env::workspace_root;

/// Finds `name` in the peers' venv or the pinned tool directories of the kubemail cache
/// (`$KUBEMAIL_CACHE/{venv-*/bin,tools/*}`, default `~/.cache/kubemail`), else on PATH: the
/// pinned versions first, and `python3` is the venv's (with dkimpy), not the system's.
/// Panics with what to run when it is nowhere: a missing tool is a failure, never a skip.
pub fn tool(name: &str) -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let cache = std::env::var_os("KUBEMAIL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kubemail")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache/kubemail"));
    let mut cache_dirs: Vec<PathBuf> = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("venv-"))
        })
        .map(|p| p.join("bin"))
        .collect();
    cache_dirs.extend(
        std::fs::read_dir(cache.join("tools"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    );
    cache_dirs
        .iter()
        .chain(path_dirs.iter())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found under {} nor on PATH; run `make setup` (or e2e/tools/setup.sh) \
                 and put the tool dirs on PATH (`. .kubemail-local/env`)",
                cache.display()
            )
        })
}

/// A PATH with every pinned tool directory and the venv first, so scripts that call `helm`
/// or `python3` get the pinned ones.
pub fn tools_path() -> String {
    let mut dirs: Vec<PathBuf> = ["helm", "kubectl", "python3"]
        .iter()
        .map(|t| tool(t).parent().map(Path::to_path_buf).unwrap_or_default())
        .collect();
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(dirs)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs `program args` in the workspace root and returns its output (it may have failed).
pub fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .env("PATH", tools_path())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

/// Runs and requires success; returns stdout. Panics with the command, status and stderr.
pub fn run_ok(program: &Path, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "`{} {}` failed ({}):\nstdout:\n{}\nstderr:\n{}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a test that installs a release leaves behind, removed when dropped (so also when the
/// test fails): the namespace's MailDomains while the operator can still finalize them (and
/// `maildomain`'s finalizer if it cannot, or the namespace would never go away), the Helm
/// release and the test's JetStream stream. The namespace itself goes with its own guard.
pub struct ReleaseCleanup {
    pub kubeconfig: String,
    pub namespace: String,
    pub release: String,
    pub maildomain: String,
    pub stream: String,
    /// `false` after [`ReleaseCleanup::finish`]: the test removed the rest itself.
    armed: bool,
}

impl ReleaseCleanup {
    pub fn new(
        kubeconfig: &str,
        namespace: &str,
        release: &str,
        maildomain: &str,
        stream: &str,
    ) -> Self {
        Self {
            kubeconfig: kubeconfig.to_owned(),
            namespace: namespace.to_owned(),
            release: release.to_owned(),
            maildomain: maildomain.to_owned(),
            stream: stream.to_owned(),
            armed: true,
        }
    }

    /// For a test that deleted its MailDomain and release itself: only the stream is left.
    pub fn finish(&mut self) {
        self.armed = false;
        delete_stream(&self.stream);
    }
}

impl Drop for ReleaseCleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let kubectl = tool("kubectl");
        let base = ["--kubeconfig", &self.kubeconfig, "-n", &self.namespace];
        let _ = run(
            &kubectl,
            &[
                &base[..],
                &["delete", "maildomain", "--all", "--timeout=60s"][..],
            ]
            .concat(),
        );
        let _ = run(
            &kubectl,
            &[
                &base[..],
                &[
                    "patch",
                    "maildomain",
                    &self.maildomain,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ][..],
            ]
            .concat(),
        );
        let _ = run(
            &tool("helm"),
            &[
                "uninstall",
                &self.release,
                "--kubeconfig",
                &self.kubeconfig,
                "--namespace",
                &self.namespace,
                "--timeout",
                "60s",
            ],
        );
        delete_stream(&self.stream);
    }
}

/// Deletes a JetStream stream of the local cluster's NATS (best effort, within seconds), from
/// any context: it runs on a runtime of its own, so also from `Drop` inside a test's runtime.
pub fn delete_stream(stream: &str) {
    let stream = stream.to_owned();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(env) = kubemail_e2e::local_env::LocalEnv::load() else {
                return;
            };
            if let Ok(Ok(c)) =
                tokio::time::timeout(std::time::Duration::from_secs(5), env.nats_connect()).await
            {
                let _ = async_nats::jetstream::new(c).delete_stream(&stream).await;
            }
        });
    })
    .join();
}

/// Applies the repository's CRDs (server-side) and waits until they are established. The
/// local cluster's releases share them (`render-values.sh` sets `crds.enabled=false`), so a
/// test installs them as a platform team would.
pub fn apply_shared_crds(kubeconfig: &str) {
    let crds = workspace_root().join("crds").to_string_lossy().into_owned();
    let kubectl = tool("kubectl");
    run_ok(
        &kubectl,
        &[
            "--kubeconfig",
            kubeconfig,
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &crds,
        ],
    );
    run_ok(
        &kubectl,
        &[
            "--kubeconfig",
            kubeconfig,
            "wait",
            "--for=condition=Established",
            "-f",
            &crds,
            "--timeout=60s",
        ],
    );
}

/// The local cluster's Helm values (`e2e/demo/render-values.sh`) for a release whose operator
/// watches only `namespace` and queues in `stream` under `subject_prefix`; `env` adds more of
/// the script's variables. Panics with the script's error when it fails.
pub fn local_values(
    namespace: &str,
    stream: &str,
    subject_prefix: &str,
    env: &[(&str, &str)],
) -> Vec<u8> {
    let rendered = Command::new(workspace_root().join("e2e/demo/render-values.sh"))
        .envs(env.iter().copied())
        .env("KUBEMAIL_WATCH_NAMESPACE", namespace)
        .env("KUBEMAIL_NATS_STREAM", stream)
        .env("KUBEMAIL_NATS_SUBJECT_PREFIX", subject_prefix)
        .output()
        .expect("run e2e/demo/render-values.sh");
    assert!(
        rendered.status.success(),
        "render-values.sh: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    rendered.stdout
}
