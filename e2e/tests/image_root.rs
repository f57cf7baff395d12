//! A container process started the way the node agent starts one from an image, without a
//! cluster: the image is unpacked from the image store, the launch script assembles its root
//! (overlay, /proc, /dev, volumes) in a private mount namespace and `container-exec` enters it
//! as the image's user. Needs root and util-linux, like the agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kubemail_e2e::agent::identity;
use kubemail_e2e::agent::image_store::{ImageStore, UnpackedImage};
use kubemail_e2e::agent::process::{
    self, ContainerTag, HostTools, LaunchSpec, ProcessExit, RootSpec, find_on_path,
};
use kubemail_e2e::agent::volumes::BindMount;
use kubemail_e2e::image_build::{Program, Recipe, write_image};
use kubemail_e2e::oci::ContainerConfig;
use tokio::sync::mpsc;

const HOST_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn shell_image(store: &Path) -> Arc<UnpackedImage> {
    let program = |tool: &str| Program {
        host_path: find_on_path(tool, HOST_PATH).unwrap_or_else(|| panic!("host {tool}")),
        image_path: format!("/bin/{tool}"),
        strip_debug: false,
    };
    let recipe = Recipe {
        names: vec!["kubemail-test/shell:1".into()],
        created: 1_700_000_000,
        programs: ["sh", "cat", "id", "touch", "sleep", "ls"]
            .into_iter()
            .map(program)
            .collect(),
        files: vec![(
            "/etc/passwd".into(),
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234::/home/app:/bin/sh\n".to_vec(),
            0o644,
        )],
        // The user's own directory: only a read-only root can refuse it writes.
        dirs: vec![("/data".into(), 0o755, 1234, 1234)],
        config: ContainerConfig {
            user: Some("1234".into()),
            env: Some(vec!["PATH=/bin".into()]),
            working_dir: Some("/data".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    write_image(&recipe, &store.join("shell.tar")).expect("write image");
    let images = ImageStore::new(store.to_path_buf(), store.join("cache"));
    let hit = images
        .find("kubemail-test/shell:1")
        .expect("list store")
        .expect("image in store");
    images.unpacked(&hit).expect("unpack")
}

fn spec(dir: &Path, image: &UnpackedImage, script: &str, read_only: bool) -> LaunchSpec {
    let identity = identity::resolve(
        image.config.user.as_deref(),
        &image.read_file("/etc/passwd"),
        &image.read_file("/etc/group"),
        None,
        None,
    )
    .expect("identity");
    let volume = dir.join("volume");
    std::fs::create_dir_all(&volume).expect("volume dir");
    std::fs::write(volume.join("key"), "from-volume").expect("volume file");
    LaunchSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/bin".into())],
        mounts: vec![BindMount {
            source: volume,
            target: "/etc/app".into(),
            read_only: true,
            is_file: false,
        }],
        working_dir: Some("/data".into()),
        hostname: "image-root".into(),
        mask_dirs: vec![],
        log_path: dir.join("c.log"),
        pid_path: dir.join("c.pid"),
        root: Some(RootSpec {
            image_rootfs: image.rootfs.clone(),
            read_only,
            identity,
            exec_helper: PathBuf::from(env!("CARGO_BIN_EXE_container-exec")),
        }),
    }
}

async fn run(spec: &LaunchSpec) -> (ProcessExit, String) {
    let tools = HostTools::find(&std::env::var("PATH").unwrap_or_default()).expect("host tools");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tag = ContainerTag {
        init: false,
        index: 0,
        generation: 1,
    };
    process::launch(&tools, spec, tag, tx).expect("launch");
    let exit = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("container exits in time")
        .expect("exit reported");
    let log = std::fs::read_to_string(&spec.log_path).unwrap_or_default();
    (exit, log)
}

#[tokio::test]
async fn a_container_runs_inside_its_image_root_as_the_image_user() {
    let dir = tempfile::tempdir().unwrap();
    let image = shell_image(&dir.path().join("store"));
    let script = r#"
        echo "id: $(id -u):$(id -g) $(cat /proc/sys/kernel/hostname)"
        echo "pwd: $(pwd)"
        echo "volume: $(cat /etc/app/key)"
        if touch /data/written 2>/dev/null; then echo "root: writable"; else echo "root: read-only"; fi
        if touch /etc/app/x 2>/dev/null; then echo "volume: writable"; else echo "volume: read-only"; fi
        if [ -e /usr/bin/env ]; then echo "host: visible"; else echo "host: hidden"; fi
        echo "dev:" $(ls /dev)
        if [ -r /proc/self/status ]; then echo "proc: mounted"; fi
        exit 7
    "#;
    let ro = spec(dir.path(), &image, script, true);
    let (exit, log) = run(&ro).await;
    assert_eq!(exit.exit_code, 7, "{log}");
    assert!(log.contains("id: 1234:1234 image-root\n"), "{log}");
    assert!(log.contains("pwd: /data\n"), "{log}");
    assert!(log.contains("volume: from-volume\n"), "{log}");
    assert!(log.contains("root: read-only\n"), "{log}");
    assert!(log.contains("volume: read-only\n"), "{log}");
    assert!(log.contains("host: hidden\n"), "{log}");
    assert!(
        log.contains("dev: fd full null random shm stderr stdin stdout tty urandom zero\n"),
        "{log}"
    );
    assert!(log.contains("proc: mounted\n"), "{log}");
    assert!(
        !image.rootfs.join("etc/app").exists(),
        "mount points are made in the container's own layer, never in the shared image"
    );

    // Without readOnlyRootFilesystem the root takes writes, which end with the container.
    let rw_dir = dir.path().join("rw");
    std::fs::create_dir_all(&rw_dir).unwrap();
    let rw = spec(
        &rw_dir,
        &image,
        "touch /data/new && ls /data && exit 0",
        false,
    );
    let (exit, log) = run(&rw).await;
    assert_eq!((exit.exit_code, log.as_str()), (0, "new\n"));
    assert!(!image.rootfs.join("data/new").exists());

    // A program that is not in the image is reported like a runtime would, not found.
    let missing_dir = dir.path().join("missing");
    std::fs::create_dir_all(&missing_dir).unwrap();
    let mut missing = spec(&missing_dir, &image, "", true);
    missing.argv = vec!["not-in-the-image".into()];
    let (exit, log) = run(&missing).await;
    assert_eq!(exit.exit_code, 127, "{log}");
    assert!(log.contains("executable file not found"), "{log}");
}
