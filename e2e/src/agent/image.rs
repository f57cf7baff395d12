//! From a container's image and command to a program to run. Three cases, decided per container:
//! an image in the agent's image store (`make images` output) runs from that image's root
//! filesystem with its entrypoint, cmd, user, env and working directory combined with the pod's
//! the way a container runtime combines them; an image in the developer's image map
//! (`--image-map`, off unless asked for) runs the locally built binary on the host in place of
//! the image's entrypoint; any other image runs `command[0]` from the host, so a `busybox`
//! image with `command: [sleep, "3600"]` runs the host's `sleep`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Container;

use super::image_store::UnpackedImage;

/// Why a container's program could not be worked out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("invalid image map entry {entry:?}: expected image=path")]
    ParseMapEntry { entry: String },
    #[error(
        "image {image:?} is not in the agent's image store or map and the container has no command to run from the host"
    )]
    NoCommand { image: String },
    #[error(
        "no command specified: image {image:?} has no entrypoint or cmd and the container sets no command"
    )]
    NoEntrypoint { image: String },
}

/// Where a container's program comes from.
#[derive(Debug, Clone)]
pub enum ContainerImage {
    /// From the image store: runs inside the image's root filesystem.
    Store(Arc<UnpackedImage>),
    /// The developer shortcut: this host binary stands in for the image's entrypoint.
    Mapped(PathBuf),
    /// Not an image we have: `command` runs from the host.
    Host,
}

/// Image repository (without tag) → local executable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageMap {
    entries: BTreeMap<String, PathBuf>,
}

impl ImageMap {
    /// Builds the map from `image=path` entries; a tag on the image is ignored.
    pub fn from_entries<I, S>(entries: I) -> Result<Self, ImageError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut map = ImageMap::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                continue;
            }
            let (image, path) = entry
                .split_once('=')
                .filter(|(i, p)| !i.is_empty() && !p.is_empty())
                .ok_or_else(|| ImageError::ParseMapEntry {
                    entry: entry.to_string(),
                })?;
            map.entries
                .insert(repository(image).to_string(), PathBuf::from(path));
        }
        Ok(map)
    }

    /// The local binary for `image`, if it is one of ours. `docker.io/` and
    /// `docker.io/library/` prefixes are treated as absent, as container runtimes do.
    pub fn lookup(&self, image: &str) -> Option<&Path> {
        let repo = repository(image);
        let short = [
            "docker.io/library/",
            "index.docker.io/library/",
            "docker.io/",
            "index.docker.io/",
        ]
        .iter()
        .find_map(|prefix| repo.strip_prefix(prefix));
        self.entries
            .get(repo)
            .or_else(|| short.and_then(|s| self.entries.get(s)))
            .map(PathBuf::as_path)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_path()))
    }
}

/// The repository part of an image reference: without `@digest` and without `:tag` (a colon
/// before the last `/` belongs to a registry port and stays).
pub fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].find(':') {
        Some(colon) => &image[..last_slash + colon],
        None => image,
    }
}

/// The argv to execute for `container` after `$(VAR)` expansion of command and args.
///
/// From the image store, as Kubernetes documents it: `command` replaces the image's entrypoint
/// (and drops its cmd), `args` replace the cmd; only the pod's strings are expanded. For an
/// image in the developer's map the mapped binary is the entrypoint: it replaces `command[0]`
/// when a command is given (the image's binary at its in-image path) and is prepended to `args`
/// otherwise. For any other image `command` is required (there is no image to read an
/// entrypoint from) and `command[0]` is looked up on the container's PATH.
pub fn container_argv(
    container: &Container,
    image: &ContainerImage,
    expand: impl Fn(&str) -> String,
) -> Result<Vec<String>, ImageError> {
    let name = container.image.as_deref().unwrap_or_default();
    let command: Option<Vec<String>> = container
        .command
        .as_ref()
        .filter(|c| !c.is_empty())
        .map(|c| c.iter().map(|s| expand(s)).collect());
    let args: Option<Vec<String>> = container
        .args
        .as_ref()
        .filter(|a| !a.is_empty())
        .map(|a| a.iter().map(|s| expand(s)).collect());
    let argv = match image {
        ContainerImage::Store(unpacked) => {
            let config = &unpacked.config;
            let mut argv = match command {
                Some(command) => command,
                None => config.entrypoint.clone().unwrap_or_default(),
            };
            match args {
                Some(args) => argv.extend(args),
                None if container.command.as_ref().is_none_or(Vec::is_empty) => {
                    argv.extend(config.cmd.clone().unwrap_or_default());
                }
                None => {}
            }
            if argv.is_empty() {
                return Err(ImageError::NoEntrypoint {
                    image: name.to_string(),
                });
            }
            argv
        }
        ContainerImage::Mapped(binary) => {
            let mut argv = vec![binary.to_string_lossy().into_owned()];
            argv.extend(command.into_iter().flatten().skip(1));
            argv.extend(args.into_iter().flatten());
            argv
        }
        ContainerImage::Host => {
            let Some(mut argv) = command else {
                return Err(ImageError::NoCommand {
                    image: name.to_string(),
                });
            };
            argv.extend(args.into_iter().flatten());
            argv
        }
    };
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(image: &str, command: &[&str], args: &[&str]) -> Container {
        let strings =
            |v: &[&str]| (!v.is_empty()).then(|| v.iter().map(|s| s.to_string()).collect());
        Container {
            name: "c".into(),
            image: Some(image.into()),
            command: strings(command),
            args: strings(args),
            ..Default::default()
        }
    }

    #[test]
    fn repository_strips_tag_and_digest_but_not_registry_port() {
        assert_eq!(repository("kubemail/smtp-node:0.1.0"), "kubemail/smtp-node");
        assert_eq!(repository("kubemail/smtp-node"), "kubemail/smtp-node");
        assert_eq!(
            repository("reg:5000/kubemail/smtp-node:v1"),
            "reg:5000/kubemail/smtp-node"
        );
        assert_eq!(
            repository("reg:5000/kubemail/smtp-node"),
            "reg:5000/kubemail/smtp-node"
        );
        assert_eq!(repository("busybox@sha256:abc"), "busybox");
        assert_eq!(repository("busybox:1.36@sha256:abc"), "busybox");
    }

    #[test]
    fn map_entries_parse_and_match_by_repository() {
        let map = ImageMap::from_entries([
            "kubemail/smtp-node=/bin/smtp-node",
            " ",
            "kubemail/operator:x=/bin/op",
        ])
        .unwrap();
        assert_eq!(
            map.lookup("kubemail/smtp-node:0.1.0"),
            Some(Path::new("/bin/smtp-node"))
        );
        assert_eq!(
            map.lookup("docker.io/kubemail/smtp-node"),
            Some(Path::new("/bin/smtp-node"))
        );
        assert_eq!(
            map.lookup("kubemail/operator:latest"),
            Some(Path::new("/bin/op"))
        );
        assert_eq!(map.lookup("busybox"), None);
        assert!(ImageMap::from_entries(["nopath"]).is_err());
        assert!(ImageMap::from_entries(["=x"]).is_err());
    }

    fn mapped(map: &ImageMap, image: &str) -> ContainerImage {
        map.lookup(image).map_or(ContainerImage::Host, |p| {
            ContainerImage::Mapped(p.to_path_buf())
        })
    }

    fn store(entrypoint: &[&str], cmd: &[&str]) -> ContainerImage {
        let strings =
            |v: &[&str]| (!v.is_empty()).then(|| v.iter().map(|s| s.to_string()).collect());
        ContainerImage::Store(Arc::new(UnpackedImage {
            reference: "kubemail/smtp-node:1".into(),
            digest: crate::oci::Digest::of(b"x"),
            rootfs: "/cache/x".into(),
            config: crate::oci::ContainerConfig {
                entrypoint: strings(entrypoint),
                cmd: strings(cmd),
                ..Default::default()
            },
        }))
    }

    #[test]
    fn argv_from_an_image_combines_entrypoint_cmd_command_and_args() {
        let id = |s: &str| s.to_string();
        let img = store(&["/usr/local/bin/smtp-node"], &["--help"]);
        let argv = |command: &[&str], args: &[&str]| {
            container_argv(&container("kubemail/smtp-node:1", command, args), &img, id).unwrap()
        };
        assert_eq!(argv(&[], &[]), ["/usr/local/bin/smtp-node", "--help"]);
        assert_eq!(
            argv(&[], &["--config", "/c.yaml"]),
            ["/usr/local/bin/smtp-node", "--config", "/c.yaml"]
        );
        assert_eq!(
            argv(&["/bin/other"], &[]),
            ["/bin/other"],
            "command drops cmd"
        );
        assert_eq!(argv(&["/bin/other"], &["-x"]), ["/bin/other", "-x"]);
        let expand = |s: &str| s.replace("$(POD_IP)", "127.1.0.9");
        let c = container("kubemail/smtp-node:1", &[], &["--listen-ip", "$(POD_IP)"]);
        assert_eq!(
            container_argv(&c, &img, expand).unwrap(),
            ["/usr/local/bin/smtp-node", "--listen-ip", "127.1.0.9"]
        );
        let empty = store(&[], &[]);
        assert!(matches!(
            container_argv(&container("x", &[], &[]), &empty, id),
            Err(ImageError::NoEntrypoint { .. })
        ));
    }

    #[test]
    fn argv_for_mapped_and_host_images() {
        let map = ImageMap::from_entries(["kubemail/smtp-node=/t/smtp-node"]).unwrap();
        let id = |s: &str| s.to_string();
        let c = container(
            "kubemail/smtp-node:1",
            &[],
            &["serve", "--config", "/etc/c.yaml"],
        );
        assert_eq!(
            container_argv(&c, &mapped(&map, "kubemail/smtp-node:1"), id).unwrap(),
            ["/t/smtp-node", "serve", "--config", "/etc/c.yaml"]
        );
        let c = container(
            "kubemail/smtp-node:1",
            &["/usr/local/bin/smtp-node", "serve"],
            &["-v"],
        );
        assert_eq!(
            container_argv(&c, &mapped(&map, "kubemail/smtp-node:1"), id).unwrap(),
            ["/t/smtp-node", "serve", "-v"]
        );
        let c = container("busybox", &["sleep"], &["3600"]);
        assert_eq!(
            container_argv(&c, &mapped(&map, "busybox"), id).unwrap(),
            ["sleep", "3600"]
        );
        let c = container("busybox", &[], &["3600"]);
        assert!(matches!(
            container_argv(&c, &mapped(&map, "busybox"), id),
            Err(ImageError::NoCommand { .. })
        ));
    }

    #[test]
    fn argv_is_expanded() {
        let c = container("busybox", &["echo", "$(A)"], &["$(B)x"]);
        let expand = |s: &str| s.replace("$(A)", "1").replace("$(B)", "2");
        assert_eq!(
            container_argv(&c, &ContainerImage::Host, expand).unwrap(),
            ["echo", "1", "2x"]
        );
    }
}
