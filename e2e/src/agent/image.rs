//! From a container's image and command to a local program. There is no container runtime:
//! our own images (those in the image map, matched by repository without tag or digest) run the
//! locally built binary; any other image runs `command[0]` from the host, so a `busybox` image
//! with `command: [sleep, "3600"]` runs the host's `sleep`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

/// Why a container's program could not be worked out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("invalid image map entry {entry:?}: expected image=path")]
    ParseMapEntry { entry: String },
    #[error(
        "image {image:?} is not in the agent's image map and the container has no command to run from the host"
    )]
    NoCommand { image: String },
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
/// For an image in the map the mapped binary is the entrypoint: it replaces `command[0]` when
/// a command is given (the image's binary at its in-image path) and is prepended to `args`
/// otherwise. For any other image `command` is required (there is no image to read an
/// entrypoint from) and `command[0]` is looked up on the container's PATH by the shell.
pub fn container_argv(
    container: &Container,
    images: &ImageMap,
    expand: impl Fn(&str) -> String,
) -> Result<Vec<String>, ImageError> {
    let image = container.image.as_deref().unwrap_or_default();
    let command: Vec<String> = container
        .command
        .iter()
        .flatten()
        .map(|s| expand(s))
        .collect();
    let args = container.args.iter().flatten().map(|s| expand(s));
    let mut argv = match images.lookup(image) {
        Some(binary) => {
            let mut argv = vec![binary.to_string_lossy().into_owned()];
            argv.extend(command.into_iter().skip(1));
            argv
        }
        None if command.is_empty() => {
            return Err(ImageError::NoCommand {
                image: image.to_string(),
            });
        }
        None => command,
    };
    argv.extend(args);
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
            container_argv(&c, &map, id).unwrap(),
            ["/t/smtp-node", "serve", "--config", "/etc/c.yaml"]
        );
        let c = container(
            "kubemail/smtp-node:1",
            &["/usr/local/bin/smtp-node", "serve"],
            &["-v"],
        );
        assert_eq!(
            container_argv(&c, &map, id).unwrap(),
            ["/t/smtp-node", "serve", "-v"]
        );
        let c = container("busybox", &["sleep"], &["3600"]);
        assert_eq!(container_argv(&c, &map, id).unwrap(), ["sleep", "3600"]);
        let c = container("busybox", &[], &["3600"]);
        assert!(matches!(
            container_argv(&c, &map, id),
            Err(ImageError::NoCommand { .. })
        ));
    }

    #[test]
    fn argv_is_expanded() {
        let c = container("busybox", &["echo", "$(A)"], &["$(B)x"]);
        let expand = |s: &str| s.replace("$(A)", "1").replace("$(B)", "2");
        assert_eq!(
            container_argv(&c, &ImageMap::default(), expand).unwrap(),
            ["echo", "1", "2x"]
        );
    }
}
