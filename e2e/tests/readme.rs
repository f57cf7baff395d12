//! The README's "Install on your cluster" section, run: every fenced block of the section is
//! preceded by `<!-- readme-test: MODE [ARG] -->`, and the test runs the blocks in order,
//! failing with the command that broke. A block without a marker fails the test, so nothing in
//! the section goes unchecked. Commands run with bash in a scratch directory holding links to
//! the repository's `charts/`, `crds/` and `manifests/`.
//!
//! Modes:
//! - `images`: the block builds the images (`make images`); the test does not build them again
//!   but requires both archives in `$KUBEMAIL_IMAGES_DIR`, else `$CARGO_TARGET_DIR/oci-images`,
//!   else `~/.cache/kubemail/target/oci-images` (the next block's `$DIR`).
//! - `run`: run as written, except `docker://$REGISTRY/` becomes `oci:<scratch>/registry/`
//!   (there is no registry here; skopeo writes an OCI layout instead).
//! - `file NAME`: the block is written to NAME; a file with Kubernetes objects is validated
//!   with kubeconform -strict (the chart's schemas, `e2e/tests/chart.rs`).
//! - `template`: `helm install|upgrade R CHART ARGS` becomes `helm template R CHART ARGS` for
//!   the local cluster's Kubernetes version (`--reuse-values` reuses the `-f` files of the last
//!   install), and the output is validated with kubeconform -strict; `helm test R` checks that
//!   the last rendering has a test hook.
//! - `kubeconform`: `kubectl apply -f F` becomes `kubeconform -strict F` (objects of kinds whose
//!   CRDs the local cluster does not have, such as cert-manager's).
//! - `dry-run`: against the local cluster; `kubectl apply|create|delete|patch` get
//!   `--dry-run=server`, `helm uninstall` gets `--dry-run`, `kubectl get` runs as written.
//! - `reconciled`: against a real release: before the block the test installs the chart with
//!   the local cluster's values (`e2e/demo/render-values.sh`, the operator watching only the
//!   test's namespace), applies `maildomain.yaml` without `spec.tls` (there is no cert-manager
//!   here) and waits for the operator's `<name>-dns` ConfigMap; then runs the block as written.
//!
//! In the cluster modes the namespaces `mail` and `kubemail-system` are the test's own
//! namespace (created by the test, so `kubectl create namespace mail` is skipped) and the
//! release `kubemail` is named after it, so that the test shares nothing with other releases.
//! Needs the local cluster (`e2e/local-cluster up`, or `make test`), helm, kubeconform, skopeo.

// Test helpers panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/kubeconform.rs"]
mod kubeconform;
#[path = "common/mail.rs"]
mod mail;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster::{TestCluster, wait_for};
use kubeconform::Kubeconform;
use kubemail_e2e::local_env::{LocalEnv, workspace_root};
use mail::{ReleaseCleanup, apply_shared_crds, local_values, run, tool, tools_path};

const SECTION: &str = "## Install on your cluster";
const KUBE_VERSION: &str = "1.36.3";
const STEP: Duration = Duration::from_secs(180);

/// One marked block of the section.
#[derive(Debug)]
struct Block {
    mode: String,
    arg: String,
    text: String,
    line: usize,
}

fn blocks(readme: &str) -> Vec<Block> {
    let start = readme
        .find(&format!("\n{SECTION}\n"))
        .unwrap_or_else(|| panic!("README.md has no section {SECTION:?}"));
    let first_line = readme[..start].lines().count() + 1;
    let body = &readme[start + 1..];
    let end = body[SECTION.len()..]
        .find("\n## ")
        .map_or(body.len(), |i| i + SECTION.len());
    let section = &body[..end];
    let mut out = Vec::new();
    let mut marker: Option<(String, String)> = None;
    let mut lines = section.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        if let Some(m) = line
            .strip_prefix("<!-- readme-test: ")
            .and_then(|m| m.strip_suffix(" -->"))
        {
            let mut parts = m.splitn(2, ' ');
            let mode = parts.next().unwrap_or_default().to_owned();
            marker = Some((mode, parts.next().unwrap_or_default().to_owned()));
        } else if line.starts_with("```") && line.len() > 3 {
            let (mode, arg) = marker.take().unwrap_or_else(|| {
                panic!(
                    "README.md line {}: a {line} block without a readme-test marker",
                    first_line + i
                )
            });
            let mut text = String::new();
            for (_, l) in lines.by_ref() {
                if l == "```" {
                    break;
                }
                text.push_str(l);
                text.push('\n');
            }
            out.push(Block {
                mode,
                arg,
                text,
                line: first_line + i,
            });
        }
    }
    out
}

/// The block's commands: continuation lines joined, comments and empty lines dropped.
fn commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(cont) = line.strip_suffix('\\') {
            current.push_str(cont);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let cmd = strip_comment(current.trim());
        if !cmd.is_empty() {
            out.push(cmd);
        }
        current.clear();
    }
    out
}

/// Drops a trailing `# comment` outside quotes.
fn strip_comment(cmd: &str) -> String {
    let (mut single, mut double) = (false, false);
    for (i, c) in cmd.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && (i == 0 || cmd[..i].ends_with(' ')) => {
                return cmd[..i].trim_end().to_owned();
            }
            _ => {}
        }
    }
    cmd.to_owned()
}

struct Runner {
    work: tempfile::TempDir,
    ns: String,
    kubeconfig: String,
    kc: Kubeconform,
    /// The `-f` files of the last `helm install` in template mode.
    values: Vec<String>,
    last_render: String,
}

impl Runner {
    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Runs one bash command in the scratch directory; panics naming the README line.
    fn bash(&self, block: &Block, cmd: &str) -> String {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", cmd])
            .current_dir(self.work.path())
            .env("PATH", tools_path())
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .unwrap_or_else(|e| panic!("run bash: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "README.md block at line {} ({}): `{cmd}` failed:\n{text}",
            block.line,
            block.mode
        );
        text
    }

    /// The cluster modes' names: the test's namespace and release.
    fn local_names(&self, cmd: &str) -> String {
        let ns = &self.ns;
        let mut cmd = format!("{cmd} ");
        for (from, to) in [
            ("-n mail ", format!("-n {ns} ")),
            ("-n kubemail-system ", format!("-n {ns} ")),
            ("helm uninstall kubemail ", format!("helm uninstall {ns} ")),
            ("helm test kubemail ", format!("helm test {ns} ")),
        ] {
            cmd = cmd.replace(from, &to);
        }
        cmd.trim_end().to_owned()
    }

    fn validate(&self, block: &Block, what: &str, file: &Path) {
        let (ok, out) = self.kc.validate(&[file]);
        assert!(
            ok,
            "README.md block at line {} ({what}): kubeconform -strict refuses it:\n{out}",
            block.line
        );
    }

    fn images(&self, block: &Block) {
        assert_eq!(commands(&block.text), ["make images"], "{block:?}");
        let dir = images_dir();
        for archive in ["operator.tar", "smtp-node.tar"] {
            assert!(
                dir.join(archive).is_file(),
                "README.md line {}: no {} (run `make images` first)",
                block.line,
                dir.join(archive).display()
            );
        }
    }

    fn run_block(&self, block: &Block) {
        let registry = self.path("registry");
        std::fs::create_dir_all(registry.join("kubemail")).unwrap();
        let script = block.text.replace(
            "docker://$REGISTRY/",
            &format!("oci:{}/", registry.display()),
        );
        self.bash(block, &script);
        if block.text.contains("skopeo copy") {
            for image in ["operator", "smtp-node"] {
                assert!(
                    registry
                        .join("kubemail")
                        .join(image)
                        .join("index.json")
                        .is_file(),
                    "README.md line {}: skopeo wrote no {image} image",
                    block.line
                );
            }
        }
    }

    fn file(&self, block: &Block) {
        let path = self.path(&block.arg);
        std::fs::write(&path, &block.text).unwrap();
        if block.text.contains("\nkind: ") || block.text.starts_with("kind: ") {
            self.validate(block, &block.arg, &path);
        }
    }

    fn template(&mut self, block: &Block) {
        for cmd in commands(&block.text) {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            match words.as_slice() {
                ["helm", "install" | "upgrade", release, chart, rest @ ..] => {
                    let mut args: Vec<String> = vec![
                        "template".into(),
                        (*release).into(),
                        (*chart).into(),
                        "--kube-version".into(),
                        KUBE_VERSION.into(),
                    ];
                    let mut files = Vec::new();
                    let mut reuse = false;
                    let mut i = 0;
                    while i < rest.len() {
                        match rest[i] {
                            "--reuse-values" => reuse = true,
                            // Flags about the cluster's state, which a rendering has not.
                            "--create-namespace" | "--take-ownership" => {}
                            "-f" | "--values" => {
                                files.push(rest[i + 1].to_owned());
                                i += 1;
                            }
                            other => args.push(other.to_owned()),
                        }
                        i += 1;
                    }
                    if reuse {
                        files = self.values.clone();
                    } else if words[1] == "install" {
                        self.values = files.clone();
                    }
                    for f in &files {
                        args.push("-f".into());
                        args.push(f.clone());
                    }
                    let script = std::iter::once("helm".to_owned())
                        .chain(args.into_iter().map(|a| shell_quote(&a)))
                        .collect::<Vec<_>>()
                        .join(" ");
                    let rendered = self.bash(block, &script);
                    let file = self.path("rendered.yaml");
                    std::fs::write(&file, &rendered).unwrap();
                    self.validate(block, &cmd, &file);
                    self.last_render = rendered;
                }
                ["helm", "test", ..] => assert!(
                    self.last_render.contains("helm.sh/hook: test"),
                    "README.md line {}: `{cmd}` but the release renders no test hook",
                    block.line
                ),
                _ => panic!(
                    "README.md line {}: `{cmd}` is not a helm install/upgrade/test command",
                    block.line
                ),
            }
        }
    }

    fn kubeconform(&self, block: &Block) {
        for cmd in commands(&block.text) {
            let file = cmd
                .strip_prefix("kubectl apply -f ")
                .unwrap_or_else(|| panic!("README.md line {}: `{cmd}`", block.line));
            self.validate(block, &cmd, &self.path(file));
        }
    }

    fn dry_run(&self, block: &Block) {
        for cmd in commands(&block.text) {
            if cmd == "kubectl create namespace mail" {
                continue;
            }
            let cmd = self.local_names(&cmd);
            let words: Vec<&str> = cmd.split_whitespace().collect();
            let cmd = match words.as_slice() {
                ["kubectl", "apply" | "create" | "delete" | "patch", ..] => {
                    format!("{cmd} --dry-run=server")
                }
                ["helm", "uninstall", ..] => format!("{cmd} --dry-run"),
                ["kubectl", "get", ..] => cmd.clone(),
                _ => panic!("README.md line {}: no dry run for `{cmd}`", block.line),
            };
            // kubectl apply -f maildomain.yaml: the file names namespace mail.
            let cmd = if cmd.contains("-f maildomain.yaml") {
                cmd.replace(
                    "-f maildomain.yaml",
                    &format!("-f {}", self.local_file("maildomain.yaml", false)),
                )
            } else {
                cmd
            };
            self.bash(block, &cmd);
        }
    }

    /// A copy of a README file with the namespace `mail` replaced by the test's, optionally
    /// without `spec.tls` (the local cluster has no cert-manager).
    fn local_file(&self, name: &str, without_tls: bool) -> String {
        let text = std::fs::read_to_string(self.path(name)).unwrap();
        let mut out = String::new();
        let mut skipping = false;
        for line in text.lines() {
            if without_tls && line == "  tls:" {
                skipping = true;
                continue;
            }
            if skipping && line.starts_with("    ") {
                continue;
            }
            skipping = false;
            out.push_str(&line.replace("namespace: mail", &format!("namespace: {}", self.ns)));
            out.push('\n');
        }
        let local = self.path(&format!("local-{name}"));
        std::fs::write(&local, out).unwrap();
        local.to_string_lossy().into_owned()
    }

    async fn reconcile(&self, cluster: &TestCluster) {
        let ns = &self.ns;
        let k = |args: &[&str]| {
            let mut all = vec!["--kubeconfig", self.kubeconfig.as_str()];
            all.extend_from_slice(args);
            let out = run(&tool("kubectl"), &all);
            assert!(out.status.success(), "kubectl {args:?}: {out:?}");
        };
        apply_shared_crds(&self.kubeconfig);
        let values = self.path("local-values.yaml");
        std::fs::write(
            &values,
            local_values(ns, &stream_name(ns), &format!("kmrd.{ns}"), &[]),
        )
        .unwrap();
        let out = run(
            &tool("helm"),
            &[
                "install",
                ns,
                &workspace_root().join("charts/kubemail").to_string_lossy(),
                "--kubeconfig",
                &self.kubeconfig,
                "-n",
                ns,
                "-f",
                &values.to_string_lossy(),
                "--wait",
                "--timeout",
                "120s",
            ],
        );
        assert!(out.status.success(), "helm install (local values): {out:?}");
        let md = self.local_file("maildomain.yaml", true);
        k(&["apply", "-f", &md]);
        let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(cluster.client.clone(), ns);
        wait_for("the operator's example-com-dns ConfigMap", STEP, || async {
            cms.get_opt("example-com-dns")
                .await
                .map_err(|e| e.to_string())?
                .and_then(|c| c.data)
                .filter(|d| d.contains_key("zone"))
                .map(|_| ())
                .ok_or_else(|| "not yet".to_owned())
        })
        .await;
    }

    fn reconciled(&self, block: &Block) {
        for cmd in commands(&block.text) {
            self.bash(block, &self.local_names(&cmd));
        }
    }
}

fn images_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KUBEMAIL_IMAGES_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/kubemail/target")
        });
    target.join("oci-images")
}

fn stream_name(ns: &str) -> String {
    format!("KMRD_{}", ns.replace('-', "_").to_uppercase())
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[test]
fn the_install_section_is_fully_marked() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let blocks = blocks(&readme);
    assert!(blocks.len() >= 8, "{blocks:?}");
    for b in &blocks {
        assert!(
            [
                "images",
                "run",
                "file",
                "template",
                "kubeconform",
                "dry-run",
                "reconciled"
            ]
            .contains(&b.mode.as_str()),
            "README.md line {}: unknown readme-test mode {:?}",
            b.line,
            b.mode
        );
    }
    // The section comes before the local-cluster part and after the first lines' make targets.
    let install = readme.find(SECTION).unwrap();
    assert!(install < readme.find("## The local real cluster").unwrap());
    assert!(readme.find("make demo").unwrap() < install);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_the_install_section_runs() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let blocks = blocks(&readme);
    let _env = LocalEnv::load().unwrap_or_else(|e| panic!("{e}"));
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("readme").await;
    let work = tempfile::tempdir().unwrap();
    for dir in ["charts", "crds", "manifests"] {
        std::os::unix::fs::symlink(workspace_root().join(dir), work.path().join(dir)).unwrap();
    }
    let mut runner = Runner {
        work,
        ns: ns.name.clone(),
        kubeconfig: cluster.kubeconfig.to_string_lossy().into_owned(),
        kc: Kubeconform::new(),
        values: Vec::new(),
        last_render: String::new(),
    };
    let _cleanup = ReleaseCleanup::new(
        &runner.kubeconfig,
        &runner.ns,
        &runner.ns,
        "example-com",
        &stream_name(&runner.ns),
    );
    let mut reconciled = false;
    for block in &blocks {
        eprintln!(
            "[readme] line {} ({} {})",
            block.line, block.mode, block.arg
        );
        match block.mode.as_str() {
            "images" => runner.images(block),
            "run" => runner.run_block(block),
            "file" => runner.file(block),
            "template" => runner.template(block),
            "kubeconform" => runner.kubeconform(block),
            "dry-run" => runner.dry_run(block),
            "reconciled" => {
                if !reconciled {
                    runner.reconcile(&cluster).await;
                    reconciled = true;
                }
                runner.reconciled(block);
            }
            other => panic!("README.md line {}: unknown mode {other}", block.line),
        }
    }
    assert!(reconciled, "no block ran against a reconciled MailDomain");
    drop(_cleanup);
    ns.delete().await;
}
