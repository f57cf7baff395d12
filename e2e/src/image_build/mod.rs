//! kubemail's container images, built without a container runtime (`make images`): one layer
//! holding the release binary at `/usr/local/bin/<name>` (debug info stripped), exactly the
//! shared libraries it loads (found with `ldd`, copied from the host's Debian packages at their
//! packaged paths, dynamic loader included), the CA bundle, `/etc/passwd` and `/etc/group` with
//! the non-root user 65532, and `/tmp` for the SMTP node — no shell, no package manager. Each
//! image is an `oci-archive` tarball written by [`crate::oci`]; the bytes depend only on the
//! inputs and the commit (`SOURCE_DATE_EPOCH` is the commit time), so building the same commit
//! twice gives the same archives. A rebuild whose image config would not change leaves the
//! archive as it is, so a warm `e2e/local-cluster up` does not recompress anything.
//!
//! The Dockerfiles next to the crates build the same layout (same user, entrypoint and paths)
//! for people who have Docker.

pub mod libs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::oci::archive::{Image, write_atomically};
use crate::oci::layer::{LayerBuilder, gzip};
use crate::oci::{
    ContainerConfig, Descriptor, Digest, History, ImageConfig, Layout, Manifest, OciError,
    Platform, RootFs, annotation, media_type, rfc3339,
};

/// uid and gid our images run as (distroless' `nonroot`; the chart and operator use it too).
pub const NONROOT_ID: u32 = 65532;
/// Where the program goes in the image.
pub const BIN_DIR: &str = "/usr/local/bin";
/// The CA bundle path every TLS stack on Debian looks at.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// PATH of Debian's and distroless' images.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                      nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";
/// Without it glibc asks DNS before /etc/hosts for names such as `localhost`.
const NSSWITCH: &str = "passwd: files\ngroup: files\nhosts: files dns\n";

/// One of kubemail's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpec {
    pub repository: &'static str,
    /// Archive file name in the output directory.
    pub archive: &'static str,
    /// Binary name in the cargo release directory and under [`BIN_DIR`].
    pub binary: &'static str,
    pub description: &'static str,
    /// Whether the image has a world-writable `/tmp` (the node's pods mount an emptyDir there).
    pub tmp: bool,
}

/// Every image `make images` builds.
pub const IMAGES: [ImageSpec; 2] = [
    ImageSpec {
        repository: "kubemail/operator",
        archive: "operator.tar",
        binary: "kubemail-operator",
        description: "kubemail operator: reconciles MailDomains into SMTP node Deployments",
        tmp: false,
    },
    ImageSpec {
        repository: "kubemail/smtp-node",
        archive: "smtp-node.tar",
        binary: "smtp-node",
        description: "kubemail SMTP node: receives, queues (NATS JetStream) and delivers mail",
        tmp: true,
    },
];

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageBuildError {
    #[error("run {tool}")]
    RunTool {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("git {args}: {message}")]
    Git { args: String, message: String },
    #[error("invalid SOURCE_DATE_EPOCH {value:?}")]
    SourceDateEpoch { value: String },
    #[error("ldd {binary}: {message}")]
    Ldd { binary: PathBuf, message: String },
    #[error("{binary} needs {library}, which the dynamic loader cannot find on this host")]
    LibraryNotFound { binary: PathBuf, library: String },
    #[error("read {path}")]
    ReadHostFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: too many levels of symbolic links")]
    SymlinkLoop { path: PathBuf },
    #[error("strip debug info from {path}: {message}")]
    Strip { path: PathBuf, message: String },
    #[error("assemble the image layer")]
    Layer(#[source] OciError),
    #[error("write image {path}")]
    WriteImage {
        path: PathBuf,
        #[source]
        source: OciError,
    },
}

/// What identifies a build: version, commit and the time every file carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    pub version: String,
    /// Full commit id.
    pub revision: String,
    /// Tracked files differ from the commit: the tag says so.
    pub dirty: bool,
    pub source_date_epoch: u64,
}

/// Characters of the commit id in tags (fixed, so a tag never depends on the repository size).
const SHORT_REVISION: usize = 12;

impl BuildInfo {
    /// From the git checkout at `repo`; `SOURCE_DATE_EPOCH` (when set) wins over the commit time.
    pub fn from_git(repo: &Path, version: &str) -> Result<Self, ImageBuildError> {
        let revision = git(repo, &["rev-parse", "HEAD"])?;
        let dirty = !git(repo, &["status", "--porcelain", "--untracked-files=no"])?.is_empty();
        let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
            _ => git(repo, &["log", "-1", "--format=%ct", "HEAD"])?,
        };
        let source_date_epoch =
            source_date_epoch
                .parse()
                .map_err(|_| ImageBuildError::SourceDateEpoch {
                    value: source_date_epoch.clone(),
                })?;
        Ok(BuildInfo {
            version: version.to_string(),
            revision,
            dirty,
            source_date_epoch,
        })
    }

    /// `<version>-<12 hex of the commit>`, with `-dirty` for uncommitted changes.
    pub fn tag(&self) -> String {
        let short: String = self.revision.chars().take(SHORT_REVISION).collect();
        let dirty = if self.dirty { "-dirty" } else { "" };
        format!("{}-{short}{dirty}", self.version)
    }

    /// The references an image of `repository` answers to: revision tag first, then version.
    pub fn names(&self, repository: &str) -> Vec<String> {
        vec![
            format!("{repository}:{}", self.tag()),
            format!("{repository}:{}", self.version),
        ]
    }
}

fn git(repo: &Path, args: &[&str]) -> Result<String, ImageBuildError> {
    let output = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|source| ImageBuildError::RunTool {
            tool: "git",
            source,
        })?;
    if !output.status.success() {
        return Err(ImageBuildError::Git {
            args: args.join(" "),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// A program to put into an image with its libraries.
#[derive(Debug, Clone)]
pub struct Program {
    pub host_path: PathBuf,
    pub image_path: String,
    /// Drop DWARF debug info (`objcopy --strip-debug`); symbols stay for backtraces.
    pub strip_debug: bool,
}

/// Everything that goes into a one-layer image.
#[derive(Debug, Clone, Default)]
pub struct Recipe {
    /// Full references, e.g. `kubemail/smtp-node:0.1.0-0123456789ab`; the first one's tag is
    /// the archive's `ref.name`.
    pub names: Vec<String>,
    /// Timestamp of every file and of the image.
    pub created: u64,
    pub programs: Vec<Program>,
    /// Host files copied to the same path in the image.
    pub host_files: Vec<PathBuf>,
    /// `(path, contents, mode)`, root-owned.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// `(path, mode, uid, gid)`.
    pub dirs: Vec<(String, u32, u32, u32)>,
    pub config: ContainerConfig,
    /// Manifest annotations (also copied to the index entry).
    pub annotations: BTreeMap<String, String>,
}

/// The recipe's layer, uncompressed, and the image config that describes it.
pub struct Prepared {
    pub layer_tar: Vec<u8>,
    pub config: ImageConfig,
    /// Every library copied, for the `org.kubemail.image.debian-packages` label.
    pub libraries: Vec<libs::Library>,
}

impl Recipe {
    /// The recipe for one of our images from the release binary in `release_dir`.
    pub fn kubemail(spec: &ImageSpec, release_dir: &Path, info: &BuildInfo) -> Self {
        let entrypoint = format!("{BIN_DIR}/{}", spec.binary);
        let created = rfc3339(info.source_date_epoch);
        let mut dirs = vec![("/home/nonroot".to_string(), 0o700, NONROOT_ID, NONROOT_ID)];
        if spec.tmp {
            dirs.push(("/tmp".to_string(), 0o1777, 0, 0));
        }
        let labels = BTreeMap::from([
            (annotation::TITLE.to_string(), spec.repository.to_string()),
            (
                annotation::DESCRIPTION.to_string(),
                spec.description.to_string(),
            ),
            (annotation::VERSION.to_string(), info.version.clone()),
            (annotation::REVISION.to_string(), info.revision.clone()),
            (annotation::CREATED.to_string(), created.clone()),
            (
                annotation::LICENSES.to_string(),
                env!("CARGO_PKG_LICENSE").to_string(),
            ),
        ]);
        Recipe {
            names: info.names(spec.repository),
            created: info.source_date_epoch,
            programs: vec![Program {
                host_path: release_dir.join(spec.binary),
                image_path: entrypoint.clone(),
                strip_debug: true,
            }],
            host_files: vec![PathBuf::from(CA_BUNDLE)],
            files: vec![
                ("/etc/passwd".into(), PASSWD.into(), 0o644),
                ("/etc/group".into(), GROUP.into(), 0o644),
                ("/etc/nsswitch.conf".into(), NSSWITCH.into(), 0o644),
            ],
            dirs,
            config: ContainerConfig {
                user: Some(format!("{NONROOT_ID}:{NONROOT_ID}")),
                env: Some(vec![
                    format!("PATH={DEFAULT_PATH}"),
                    format!("SSL_CERT_FILE={CA_BUNDLE}"),
                ]),
                entrypoint: Some(vec![entrypoint]),
                cmd: None,
                working_dir: Some("/".into()),
                labels: Some(labels.clone()),
                stop_signal: None,
            },
            annotations: labels,
        }
    }

    /// Collects the files (running `ldd` and `objcopy`) into the layer and its config.
    pub fn prepare(&self) -> Result<Prepared, ImageBuildError> {
        let mut layer = LayerBuilder::new(self.created);
        for (path, mode, uid, gid) in &self.dirs {
            layer
                .dir(path, *mode, *uid, *gid)
                .map_err(ImageBuildError::Layer)?;
        }
        for (path, data, mode) in &self.files {
            layer
                .file(path, data.clone(), *mode)
                .map_err(ImageBuildError::Layer)?;
        }
        for path in &self.host_files {
            let data = std::fs::read(path).map_err(|source| ImageBuildError::ReadHostFile {
                path: path.clone(),
                source,
            })?;
            layer
                .file(&path.to_string_lossy(), data, 0o644)
                .map_err(ImageBuildError::Layer)?;
        }
        let mut libraries = Vec::new();
        for program in &self.programs {
            let data = if program.strip_debug {
                strip_debug(&program.host_path)?
            } else {
                std::fs::read(&program.host_path).map_err(|source| {
                    ImageBuildError::ReadHostFile {
                        path: program.host_path.clone(),
                        source,
                    }
                })?
            };
            layer
                .file(&program.image_path, data, 0o755)
                .map_err(ImageBuildError::Layer)?;
            for lib in libs::shared_libraries(&program.host_path)? {
                libs::add_library(&mut layer, &lib.path)?;
                libraries.push(lib);
            }
        }
        libraries.sort_by(|a, b| a.path.cmp(&b.path));
        libraries.dedup();
        let layer_tar = layer.tar().map_err(ImageBuildError::Layer)?;

        let mut config = self.config.clone();
        let packages: std::collections::BTreeSet<&str> = libraries
            .iter()
            .filter_map(|l| l.package.as_deref())
            .collect();
        if !packages.is_empty() {
            config.labels.get_or_insert_with(BTreeMap::new).insert(
                "org.kubemail.image.debian-packages".into(),
                packages.into_iter().collect::<Vec<_>>().join(" "),
            );
        }
        let created = rfc3339(self.created);
        let platform = Platform::host();
        let config = ImageConfig {
            created: Some(created.clone()),
            architecture: platform.architecture,
            os: platform.os,
            config,
            rootfs: RootFs {
                type_: "layers".into(),
                diff_ids: vec![Digest::of(&layer_tar)],
            },
            history: vec![History {
                created: Some(created),
                created_by: Some("kubemail make images (e2e/src/image_build)".into()),
                ..Default::default()
            }],
        };
        Ok(Prepared {
            layer_tar,
            config,
            libraries,
        })
    }

    /// The annotations of the archive's index entry: the revision tag as `ref.name`, the full
    /// name for containerd, and every reference for the node agent's image store.
    pub fn index_annotations(&self) -> BTreeMap<String, String> {
        let mut annotations = self.annotations.clone();
        if let Some(first) = self.names.first() {
            let tag = first.rsplit_once(':').map_or("latest", |(_, t)| t);
            annotations.insert(annotation::REF_NAME.into(), tag.to_string());
            annotations.insert(annotation::CONTAINERD_NAME.into(), qualified(first));
        }
        annotations.insert(annotation::KUBEMAIL_NAMES.into(), self.names.join(","));
        annotations
    }

    /// The whole image as a layout (compresses the layer).
    pub fn assemble(&self, prepared: &Prepared) -> Result<Layout, ImageBuildError> {
        let mut layout = Layout::default();
        let layer = layout.add_blob(
            media_type::LAYER_TAR_GZIP,
            gzip(&prepared.layer_tar).map_err(ImageBuildError::Layer)?,
        );
        let config = layout
            .add_json(media_type::CONFIG, &prepared.config)
            .map_err(ImageBuildError::Layer)?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_type::MANIFEST.into()),
            config,
            layers: vec![layer],
            annotations: self.annotations.clone(),
        };
        let mut descriptor: Descriptor = layout
            .add_json(media_type::MANIFEST, &manifest)
            .map_err(ImageBuildError::Layer)?;
        descriptor.annotations = self.index_annotations();
        descriptor.platform = Some(Platform::host());
        layout.index.manifests.push(descriptor);
        Ok(layout)
    }
}

/// A Docker Hub short name the way containerd spells it (`docker.io/library/…` for one part).
fn qualified(name: &str) -> String {
    let first = name.split('/').next().unwrap_or(name);
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    match (has_registry, name.contains('/')) {
        (true, _) => name.to_string(),
        (false, true) => format!("docker.io/{name}"),
        (false, false) => format!("docker.io/library/{name}"),
    }
}

/// The binary without its DWARF sections (the release profile keeps line tables for the
/// bench and local debugging; the image does not need them).
fn strip_debug(path: &Path) -> Result<Vec<u8>, ImageBuildError> {
    let dir = tempfile::tempdir().map_err(|source| ImageBuildError::ReadHostFile {
        path: path.to_path_buf(),
        source,
    })?;
    let out = dir.path().join("stripped");
    let output = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(path)
        .arg(&out)
        .output()
        .map_err(|source| ImageBuildError::RunTool {
            tool: "objcopy",
            source,
        })?;
    if !output.status.success() {
        return Err(ImageBuildError::Strip {
            path: path.to_path_buf(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    std::fs::read(&out).map_err(|source| ImageBuildError::ReadHostFile { path: out, source })
}

/// One archive `make images` produced.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub archive: PathBuf,
    pub names: Vec<String>,
    /// Digest of the image manifest (what a registry shows after a push).
    pub digest: Digest,
    pub size: u64,
    /// False when the archive already held this image and was left alone.
    pub written: bool,
}

/// Builds every image in [`IMAGES`] from `release_dir` into `out_dir`.
pub fn build_all(
    release_dir: &Path,
    out_dir: &Path,
    info: &BuildInfo,
) -> Result<Vec<BuiltImage>, ImageBuildError> {
    IMAGES
        .iter()
        .map(|spec| {
            let recipe = Recipe::kubemail(spec, release_dir, info);
            write_image(&recipe, &out_dir.join(spec.archive))
        })
        .collect()
}

/// Writes `recipe` as an `oci-archive` at `path`, unless the archive there already holds the
/// same image (same config, hence the same layer, and the same names).
pub fn write_image(recipe: &Recipe, path: &Path) -> Result<BuiltImage, ImageBuildError> {
    let prepared = recipe.prepare()?;
    let config_bytes = serde_json::to_vec(&prepared.config).map_err(|source| {
        ImageBuildError::Layer(OciError::Json {
            what: "image config".into(),
            source,
        })
    })?;
    let config_digest = Digest::of(&config_bytes);
    let wanted_annotations = recipe.index_annotations();
    if let Some(existing) = existing_image(path)
        && existing.manifest.config.digest == config_digest
        && existing.descriptor.annotations == wanted_annotations
    {
        return Ok(BuiltImage {
            archive: path.to_path_buf(),
            names: recipe.names.clone(),
            digest: existing.descriptor.digest,
            size: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            written: false,
        });
    }
    let layout = recipe.assemble(&prepared)?;
    let bytes =
        layout
            .to_archive(recipe.created)
            .map_err(|source| ImageBuildError::WriteImage {
                path: path.to_path_buf(),
                source,
            })?;
    write_atomically(path, &bytes).map_err(|source| ImageBuildError::WriteImage {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(BuiltImage {
        archive: path.to_path_buf(),
        names: recipe.names.clone(),
        digest: layout.index.manifests[0].digest.clone(),
        size: bytes.len() as u64,
        written: true,
    })
}

fn existing_image(path: &Path) -> Option<Image> {
    let layout = Layout::read_archive(path).ok()?;
    let image = layout.image().ok()?;
    Some(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(dirty: bool) -> BuildInfo {
        BuildInfo {
            version: "0.1.0".into(),
            revision: "0123456789abcdef0123456789abcdef01234567".into(),
            dirty,
            source_date_epoch: 1_700_000_000,
        }
    }

    #[test]
    fn tags_carry_version_and_revision() {
        assert_eq!(
            info(false).names("kubemail/smtp-node"),
            [
                "kubemail/smtp-node:0.1.0-0123456789ab",
                "kubemail/smtp-node:0.1.0"
            ]
        );
        assert_eq!(info(true).tag(), "0.1.0-0123456789ab-dirty");
        assert_eq!(
            qualified("kubemail/smtp-node:1"),
            "docker.io/kubemail/smtp-node:1"
        );
        assert_eq!(qualified("busybox:1"), "docker.io/library/busybox:1");
        assert_eq!(qualified("reg:5000/a/b:1"), "reg:5000/a/b:1");
    }

    #[test]
    fn our_images_run_as_nonroot_with_the_binary_as_entrypoint() {
        let r = Recipe::kubemail(&IMAGES[1], Path::new("/rel"), &info(false));
        assert_eq!(r.config.user.as_deref(), Some("65532:65532"));
        assert_eq!(
            r.config.entrypoint.as_deref(),
            Some(&["/usr/local/bin/smtp-node".to_string()][..])
        );
        assert_eq!(r.programs[0].host_path, Path::new("/rel/smtp-node"));
        assert!(r.dirs.iter().any(|d| d.0 == "/tmp" && d.1 == 0o1777));
        let a = r.index_annotations();
        assert_eq!(a[annotation::REF_NAME], "0.1.0-0123456789ab");
        assert_eq!(
            a[annotation::KUBEMAIL_NAMES],
            "kubemail/smtp-node:0.1.0-0123456789ab,kubemail/smtp-node:0.1.0"
        );
        let op = Recipe::kubemail(&IMAGES[0], Path::new("/rel"), &info(false));
        assert!(!op.dirs.iter().any(|d| d.0 == "/tmp"));
    }

    /// A test image from host programs: written twice, byte-identical; unchanged on a rebuild.
    #[test]
    fn the_same_recipe_gives_the_same_archive_and_is_not_rewritten() {
        let sleep =
            crate::agent::process::find_on_path("sleep", "/usr/bin:/bin").expect("coreutils sleep");
        let recipe = Recipe {
            names: vec!["test/sleep:1".into()],
            created: 1_700_000_000,
            programs: vec![Program {
                host_path: sleep,
                image_path: "/bin/sleep".into(),
                strip_debug: false,
            }],
            files: vec![("/etc/passwd".into(), PASSWD.into(), 0o644)],
            config: ContainerConfig {
                entrypoint: Some(vec!["/bin/sleep".into()]),
                ..Default::default()
            },
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
        assert!(write_image(&recipe, &a).unwrap().written);
        assert!(write_image(&recipe, &b).unwrap().written);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let again = write_image(&recipe, &a).unwrap();
        assert!(!again.written, "an unchanged image is not rewritten");
        let mut changed = recipe.clone();
        changed.created += 1;
        assert!(write_image(&changed, &a).unwrap().written);
        assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }
}
