//! kubemail's OCI images as `make images` (and `e2e/local-cluster up`) builds them, checked with
//! tools that are not ours: Python's tarfile and json unpack each archive, skopeo reads it the
//! way a push would, readelf lists what the binaries need; then the binaries run inside the
//! unpacked root as the image's user. Also: the same commit packs byte-identical archives.
//! Needs the images (`make images` or the local cluster up; `KUBEMAIL_IMAGES_DIR` says where,
//! default `$CARGO_TARGET_DIR/oci-images`), and root (chroot, bind mounts) like the node agent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kubemail_e2e::local_env::workspace_root;
use serde_json::Value;

/// Unpacks an oci-archive with nothing but the standard library and prints what it found.
const PY_UNPACK: &str = r#"
import json, sys, tarfile
archive, dest = sys.argv[1], sys.argv[2]
with tarfile.open(archive) as outer:
    names = outer.getnames()
    read = lambda name: outer.extractfile(name).read()
    layout = json.loads(read("oci-layout"))
    index = json.loads(read("index.json"))
    blob = lambda d: read("blobs/sha256/" + d["digest"].split(":", 1)[1])
    manifest = json.loads(blob(index["manifests"][0]))
    config = json.loads(blob(manifest["config"]))
    entries = []
    for layer in manifest["layers"]:
        import io
        with tarfile.open(fileobj=io.BytesIO(blob(layer)), mode="r:*") as t:
            for m in t.getmembers():
                kind = "dir" if m.isdir() else "link" if m.issym() else "file" if m.isfile() else "other"
                entries.append({"path": "/" + m.name.rstrip("/"), "kind": kind, "mode": m.mode,
                                "uid": m.uid, "gid": m.gid, "mtime": m.mtime, "target": m.linkname})
            kwargs = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
            t.extractall(dest, numeric_owner=True, **kwargs)
print(json.dumps({"layout": layout, "index": index, "manifest": manifest, "config": config,
                  "entries": entries, "outer": sorted(names) == names}))
"#;

/// The shells no image of ours may have.
const SHELLS: [&str; 10] = [
    "sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "csh", "tcsh", "busybox",
];

fn target_dir() -> PathBuf {
    // <target>/debug/oci-image
    Path::new(env!("CARGO_BIN_EXE_oci-image"))
        .ancestors()
        .nth(2)
        .expect("cargo target dir")
        .to_path_buf()
}

fn images_dir() -> PathBuf {
    std::env::var_os("KUBEMAIL_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("oci-images"))
}

fn archive(name: &str) -> PathBuf {
    let path = images_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the images with `make images` (or e2e/local-cluster up)",
        path.display()
    );
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e} (run `make setup`)"))
}

fn ok(cmd: &mut Command) -> String {
    let output = run(cmd);
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

struct Unpacked {
    _dir: tempfile::TempDir,
    root: PathBuf,
    summary: Value,
}

fn unpack(archive: &Path) -> Unpacked {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(&root).expect("rootfs dir");
    let out = ok(Command::new("python3")
        .arg("-c")
        .arg(PY_UNPACK)
        .arg(archive)
        .arg(&root));
    Unpacked {
        _dir: dir,
        root,
        summary: serde_json::from_str(&out).expect("python summary"),
    }
}

/// `path` inside `root`, following the image's own symlinks (absolute ones from the root).
fn in_root(root: &Path, path: &str) -> PathBuf {
    let mut current = path.to_string();
    for _ in 0..10 {
        let on_disk = root.join(current.trim_start_matches('/'));
        match std::fs::read_link(&on_disk) {
            Ok(target) => {
                let target = target.to_string_lossy().into_owned();
                current = if target.starts_with('/') {
                    target
                } else {
                    let parent = Path::new(&current).parent().unwrap_or(Path::new("/"));
                    parent.join(target).to_string_lossy().into_owned()
                };
            }
            Err(_) => return on_disk,
        }
    }
    panic!("symlink loop at {path}");
}

/// `DT_NEEDED` names and the program interpreter of an ELF file, from binutils' readelf.
fn needed(file: &Path) -> (Vec<String>, Option<String>) {
    let dynamic = ok(Command::new("readelf").arg("-d").arg(file));
    let names = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next().map(String::from))
        .collect();
    let headers = ok(Command::new("readelf").arg("-l").arg(file));
    let interp = headers
        .lines()
        .find_map(|l| l.split("program interpreter: ").nth(1))
        .map(|s| s.trim_end_matches(']').to_string());
    (names, interp)
}

/// Finds library `name` where the loader looks without a cache.
fn find_library(root: &Path, name: &str) -> Option<(String, PathBuf)> {
    [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib",
        "/usr/lib",
    ]
    .iter()
    .map(|dir| format!("{dir}/{name}"))
    .find_map(|p| {
        let file = in_root(root, &p);
        file.is_file().then_some((p, file))
    })
}

fn check_image(file: &str, repository: &str, binary: &str) -> Unpacked {
    let image = unpack(&archive(file));
    let s = &image.summary;
    let root = &image.root;
    let version = env!("CARGO_PKG_VERSION");

    assert_eq!(s["layout"]["imageLayoutVersion"], "1.0.0");
    assert_eq!(s["outer"], true, "archive entries are sorted");
    let manifests = s["index"]["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "one image per archive: {manifests:?}");
    let annotations = &manifests[0]["annotations"];
    let tag = annotations["org.opencontainers.image.ref.name"]
        .as_str()
        .expect("ref.name");
    assert!(
        tag.starts_with(&format!("{version}-")),
        "tag {tag} is <version>-<rev>"
    );
    let names: Vec<&str> = annotations["org.kubemail.image.names"]
        .as_str()
        .expect("names")
        .split(',')
        .collect();
    assert_eq!(
        names,
        [
            format!("{repository}:{tag}"),
            format!("{repository}:{version}")
        ]
    );

    let config = &s["config"]["config"];
    assert_eq!(config["User"], "65532:65532");
    let entrypoint = format!("/usr/local/bin/{binary}");
    assert_eq!(config["Entrypoint"], serde_json::json!([entrypoint]));
    assert_eq!(
        s["config"]["config"]["Labels"]["org.opencontainers.image.version"],
        version
    );

    let entries = s["entries"].as_array().expect("entries");
    let mtimes: BTreeSet<i64> = entries.iter().filter_map(|e| e["mtime"].as_i64()).collect();
    assert_eq!(mtimes.len(), 1, "one timestamp for every file: {mtimes:?}");
    let by_path: BTreeMap<&str, &Value> = entries
        .iter()
        .map(|e| (e["path"].as_str().unwrap_or_default(), e))
        .collect();
    for (path, e) in &by_path {
        let base = path.rsplit('/').next().unwrap_or_default();
        assert!(!SHELLS.contains(&base), "{path} is a shell: {e}");
    }
    assert!(!in_root(root, "/bin/sh").exists(), "no /bin/sh");

    let ca = std::fs::read_to_string(in_root(root, "/etc/ssl/certs/ca-certificates.crt"))
        .expect("CA bundle");
    assert!(
        ca.matches("BEGIN CERTIFICATE").count() > 50,
        "a real CA bundle"
    );
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    assert!(passwd.contains(":65532:65532:"), "{passwd}");
    let group = std::fs::read_to_string(root.join("etc/group")).expect("group");
    assert!(group.contains(":65532:"), "{group}");

    // Every DT_NEEDED, transitively, is in the image, plus the interpreter; and every library
    // in the image is one of those.
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut queue = vec![root.join(entrypoint.trim_start_matches('/'))];
    let (_, interp) = needed(&queue[0]);
    let interp = interp.expect("a dynamically linked binary");
    assert!(
        in_root(root, &interp).is_file(),
        "interpreter {interp} in the image"
    );
    wanted.insert(in_root(root, &interp).to_string_lossy().into_owned());
    while let Some(elf) = queue.pop() {
        for name in needed(&elf).0 {
            let (path, file) = find_library(root, &name).unwrap_or_else(|| {
                panic!("{} needs {name}, missing from the image", elf.display())
            });
            assert!(!path.is_empty());
            if wanted.insert(file.to_string_lossy().into_owned()) {
                queue.push(file);
            }
        }
    }
    let files: Vec<&str> = by_path
        .iter()
        .filter(|(_, e)| e["kind"] == "file")
        .map(|(p, _)| *p)
        .collect();
    let allowed = [
        entrypoint.as_str(),
        "/etc/passwd",
        "/etc/group",
        "/etc/nsswitch.conf",
        "/etc/ssl/certs/ca-certificates.crt",
    ];
    for f in &files {
        let on_disk = root
            .join(f.trim_start_matches('/'))
            .to_string_lossy()
            .into_owned();
        assert!(
            allowed.contains(f) || wanted.contains(&on_disk),
            "{f} is in the image but nothing needs it"
        );
    }
    assert_eq!(
        files.len(),
        allowed.len() + wanted.len(),
        "files: {files:?}, libraries: {wanted:?}"
    );
    image
}

#[test]
fn operator_image_holds_the_binary_its_libraries_and_ca_bundle_only() {
    let image = check_image("operator.tar", "kubemail/operator", "kubemail-operator");
    assert!(
        !image.root.join("tmp").exists(),
        "the operator does not need /tmp"
    );
}

#[test]
fn smtp_node_image_holds_the_binary_its_libraries_ca_bundle_and_tmp() {
    let image = check_image("smtp-node.tar", "kubemail/smtp-node", "smtp-node");
    let tmp = image.summary["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "/tmp")
        .expect("/tmp");
    assert_eq!(tmp["mode"], 0o1777);
}

#[test]
fn skopeo_reads_both_archives_without_naming_a_tag() {
    for (file, binary) in [
        ("operator.tar", "kubemail-operator"),
        ("smtp-node.tar", "smtp-node"),
    ] {
        let path = archive(file);
        let reference = format!("oci-archive:{}", path.display());
        let inspect: Value =
            serde_json::from_str(&ok(Command::new("skopeo").args(["inspect", &reference])))
                .expect("skopeo inspect json");
        assert_eq!(inspect["Os"], "linux");
        assert_eq!(inspect["Layers"].as_array().map(Vec::len), Some(1));
        assert!(
            inspect["Labels"]["org.kubemail.image.debian-packages"]
                .as_str()
                .is_some_and(|p| p.split(' ').any(|pkg| pkg.starts_with("libc6:"))),
            "{inspect}"
        );
        let config: Value = serde_json::from_str(&ok(
            Command::new("skopeo").args(["inspect", "--config", &reference])
        ))
        .expect("skopeo config json");
        assert_eq!(config["config"]["User"], "65532:65532");
        assert_eq!(
            config["config"]["Entrypoint"][0],
            format!("/usr/local/bin/{binary}")
        );
    }
}

#[test]
fn binaries_run_inside_their_image_as_the_image_user() {
    let version = env!("CARGO_PKG_VERSION");
    let operator = unpack(&archive("operator.tar"));
    let out = ok(Command::new("chroot")
        .arg("--userspec=65532:65532")
        .arg(&operator.root)
        .args(["/usr/local/bin/kubemail-operator", "--version"]));
    assert!(out.contains(version), "{out}");
    let shell = run(Command::new("chroot")
        .arg(&operator.root)
        .args(["/bin/sh", "-c", "true"]));
    assert!(!shell.status.success(), "no shell to run");

    let node = unpack(&archive("smtp-node.tar"));
    let out = ok(Command::new("chroot")
        .arg("--userspec=65532:65532")
        .arg(&node.root)
        .args(["/usr/local/bin/smtp-node", "--version"]));
    assert!(out.contains(version), "{out}");
    // The example configuration (certificate, users, DKIM keys next to it) bind-mounted in,
    // checked by the node as uid 65532; its TLS client loads the image's CA bundle.
    let examples = workspace_root().join("smtp-node/examples");
    let config_dir = node.root.join("etc/kubemail/config");
    std::fs::create_dir_all(&config_dir).unwrap();
    let script = format!(
        "mount --bind '{}' '{}' && exec chroot --userspec=65532:65532 '{}' /usr/local/bin/smtp-node check-config /etc/kubemail/config/dev.yaml",
        examples.display(),
        config_dir.display(),
        node.root.display()
    );
    let out = ok(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert!(
        out.contains("/etc/kubemail/config/dev.yaml: ok"),
        "check-config: {out}"
    );
}

#[test]
fn the_same_commit_packs_byte_identical_archives() {
    let release = target_dir().join("release");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for dir in &dirs {
        let out = ok(Command::new(env!("CARGO_BIN_EXE_oci-image"))
            .arg("--release-dir")
            .arg(&release)
            .arg("--out-dir")
            .arg(dir.path())
            .arg("--source-dir")
            .arg(workspace_root())
            .env_remove("SOURCE_DATE_EPOCH"));
        assert_eq!(out.matches("written").count(), 2, "{out}");
    }
    for file in ["operator.tar", "smtp-node.tar"] {
        let a = std::fs::read(dirs[0].path().join(file)).unwrap();
        let b = std::fs::read(dirs[1].path().join(file)).unwrap();
        assert!(
            a == b,
            "{file} differs between two builds of the same commit"
        );
    }
    // A rebuild that would produce the same image leaves the archive alone.
    let out = ok(Command::new(env!("CARGO_BIN_EXE_oci-image"))
        .arg("--release-dir")
        .arg(&release)
        .arg("--out-dir")
        .arg(dirs[0].path())
        .arg("--source-dir")
        .arg(workspace_root())
        .env_remove("SOURCE_DATE_EPOCH"));
    assert_eq!(out.matches("unchanged").count(), 2, "{out}");
}
