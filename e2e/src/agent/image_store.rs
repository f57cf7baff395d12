//! The node agent's local image store: a directory of `oci-archive` tarballs (what
//! `make images` writes), each listing in its index the references it answers to. A container
//! whose image is in the store runs from that image's root filesystem, unpacked once per
//! manifest digest under the agent's cache directory and never written to (each container gets
//! its own writable layer over it, see `process.rs`).
//!
//! The directory is listed again whenever a container starts (archives are recognised by size
//! and modification time), so images rebuilt while the agent runs are used by the next pod.
//! A reference matches by repository and tag (or digest); a tag the store does not have falls
//! back to the newest image of the same repository, because this is a test cluster whose
//! images are all built from the checkout (the operator tests deploy `kubemail/smtp-node:test`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::oci::unpack::unpack;
use crate::oci::{ContainerConfig, Digest, Layout, OciError, annotation};

/// Why an image could not be found or prepared.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("list image store {dir}")]
    List {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read image archive {path}")]
    ReadArchive {
        path: PathBuf,
        #[source]
        source: OciError,
    },
    #[error("unpack image {reference} into {dir}")]
    Unpack {
        reference: String,
        dir: PathBuf,
        #[source]
        source: OciError,
    },
    #[error("prepare image cache {dir}")]
    Cache {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image store lock poisoned")]
    Poisoned,
}

/// An image ready to run: its root filesystem on disk and its configuration.
#[derive(Debug, Clone)]
pub struct UnpackedImage {
    /// The reference the store knows the image by (its first name).
    pub reference: String,
    pub digest: Digest,
    /// Unpacked layers; read-only for containers.
    pub rootfs: PathBuf,
    pub config: ContainerConfig,
}

impl UnpackedImage {
    /// A file of the image (for `/etc/passwd` and `/etc/group`); empty when absent.
    pub fn read_file(&self, path: &str) -> String {
        std::fs::read_to_string(self.rootfs.join(path.trim_start_matches('/'))).unwrap_or_default()
    }
}

/// Which archive holds an image, and whether the reference matched exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHit {
    pub archive: PathBuf,
    pub digest: Digest,
    /// The archive's first name.
    pub reference: String,
    /// False when only the repository matched (another tag of a local build).
    pub exact: bool,
}

#[derive(Debug, Clone)]
struct Listed {
    modified: SystemTime,
    size: u64,
    names: Vec<Reference>,
    first_name: String,
    digest: Digest,
}

#[derive(Debug, Default)]
struct StoreState {
    archives: HashMap<PathBuf, Listed>,
    unpacked: HashMap<Digest, Arc<UnpackedImage>>,
}

/// A directory of image archives plus the cache of unpacked root filesystems.
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
    cache_dir: PathBuf,
    state: Mutex<StoreState>,
}

impl ImageStore {
    pub fn new(dir: PathBuf, cache_dir: PathBuf) -> Self {
        ImageStore {
            dir,
            cache_dir,
            state: Mutex::new(StoreState::default()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every reference in the store (for the startup log).
    pub fn references(&self) -> Result<Vec<String>, StoreError> {
        let mut state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
        self.rescan(&mut state)?;
        let mut names: Vec<String> = state
            .archives
            .values()
            .flat_map(|l| l.names.iter().map(Reference::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The archive holding `image`, if the store has it (or another tag of its repository).
    pub fn find(&self, image: &str) -> Result<Option<StoreHit>, StoreError> {
        let wanted = Reference::parse(image);
        let mut state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
        self.rescan(&mut state)?;
        let hit = |(path, l): (&PathBuf, &Listed), exact| StoreHit {
            archive: path.clone(),
            digest: l.digest.clone(),
            reference: l.first_name.clone(),
            exact,
        };
        let exact = state.archives.iter().find(|(_, l)| {
            l.names.iter().any(|n| {
                n.repository == wanted.repository
                    && match &wanted.digest {
                        Some(d) => *d == l.digest.as_str(),
                        None => n.tag == wanted.tag,
                    }
            })
        });
        if let Some(found) = exact {
            return Ok(Some(hit(found, true)));
        }
        let newest = state
            .archives
            .iter()
            .filter(|(_, l)| l.names.iter().any(|n| n.repository == wanted.repository))
            .max_by_key(|(path, l)| (l.modified, (*path).clone()));
        Ok(newest.map(|found| hit(found, false)))
    }

    /// The unpacked image of `hit` (unpacked now when this digest was not yet).
    pub fn unpacked(&self, hit: &StoreHit) -> Result<Arc<UnpackedImage>, StoreError> {
        let mut state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
        if let Some(done) = state.unpacked.get(&hit.digest) {
            return Ok(done.clone());
        }
        let layout =
            Layout::read_archive(&hit.archive).map_err(|source| StoreError::ReadArchive {
                path: hit.archive.clone(),
                source,
            })?;
        let image = layout.image().map_err(|source| StoreError::ReadArchive {
            path: hit.archive.clone(),
            source,
        })?;
        let rootfs = self.cache_dir.join(image.descriptor.digest.hex());
        if !rootfs.is_dir() {
            let cache_err = |source| StoreError::Cache {
                dir: self.cache_dir.clone(),
                source,
            };
            std::fs::create_dir_all(&self.cache_dir).map_err(cache_err)?;
            // Unpacked beside the final name and renamed, so a directory under the digest's
            // name is always complete (also for the next agent instance).
            let partial = self
                .cache_dir
                .join(format!("{}.partial", image.descriptor.digest.hex()));
            if partial.exists() {
                std::fs::remove_dir_all(&partial).map_err(cache_err)?;
            }
            unpack(&layout, &image, &partial).map_err(|source| StoreError::Unpack {
                reference: hit.reference.clone(),
                dir: partial.clone(),
                source,
            })?;
            std::fs::rename(&partial, &rootfs).map_err(cache_err)?;
            tracing::info!(image = %hit.reference, digest = %image.descriptor.digest, rootfs = %rootfs.display(), "image unpacked");
        }
        let unpacked = Arc::new(UnpackedImage {
            reference: hit.reference.clone(),
            digest: image.descriptor.digest.clone(),
            rootfs,
            config: image.config.config,
        });
        state.unpacked.insert(hit.digest.clone(), unpacked.clone());
        Ok(unpacked)
    }

    /// Lists the directory again, reading the index of new or changed archives only.
    fn rescan(&self, state: &mut StoreState) -> Result<(), StoreError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                state.archives.clear();
                return Ok(());
            }
            Err(source) => {
                return Err(StoreError::List {
                    dir: self.dir.clone(),
                    source,
                });
            }
        };
        let mut seen = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("tar") {
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let (modified, size) = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            seen.push(path.clone());
            if state
                .archives
                .get(&path)
                .is_some_and(|l| l.modified == modified && l.size == size)
            {
                continue;
            }
            match list_archive(&path) {
                Ok(Some((names, digest))) => {
                    let first_name = names.first().map(Reference::to_string).unwrap_or_default();
                    state.archives.insert(
                        path,
                        Listed {
                            modified,
                            size,
                            names,
                            first_name,
                            digest,
                        },
                    );
                }
                Ok(None) => {
                    state.archives.remove(&path);
                }
                Err(e) => {
                    // Another archive being written, or not an image: not fatal for the others.
                    tracing::warn!(archive = %path.display(), error = %crate::agent::pod_runner::error_chain(&e), "skipping unreadable image archive");
                    state.archives.remove(&path);
                }
            }
        }
        state.archives.retain(|p, _| seen.contains(p));
        Ok(())
    }
}

/// The names and manifest digest of the first image in an archive; `None` when it names none.
fn list_archive(path: &Path) -> Result<Option<(Vec<Reference>, Digest)>, OciError> {
    let index = Layout::read_archive_index(path)?;
    let Some(first) = index.manifests.first() else {
        return Ok(None);
    };
    let a = &first.annotations;
    let names: Vec<Reference> = match a.get(annotation::KUBEMAIL_NAMES) {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(Reference::parse)
            .collect(),
        None => a
            .get(annotation::CONTAINERD_NAME)
            .map(|n| vec![Reference::parse(n)])
            .unwrap_or_default(),
    };
    Ok((!names.is_empty()).then(|| (names, first.digest.clone())))
}

/// An image reference split the way runtimes compare them: Docker Hub prefixes dropped, `latest`
/// when neither tag nor digest is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub repository: String,
    pub tag: String,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(image: &str) -> Self {
        let (name, digest) = match image.split_once('@') {
            Some((n, d)) => (n, Some(d.to_string())),
            None => (image, None),
        };
        let repository = super::image::repository(name);
        let tag = name[repository.len()..].trim_start_matches(':');
        let short = [
            "docker.io/library/",
            "index.docker.io/library/",
            "docker.io/",
            "index.docker.io/",
        ]
        .iter()
        .find_map(|prefix| repository.strip_prefix(prefix))
        .unwrap_or(repository);
        Reference {
            repository: short.to_string(),
            tag: if tag.is_empty() { "latest" } else { tag }.to_string(),
            digest,
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)?;
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::image_build::{Recipe, write_image};

    #[test]
    fn references_normalise_like_a_runtime() {
        let r = Reference::parse("docker.io/library/busybox");
        assert_eq!(
            (r.repository.as_str(), r.tag.as_str()),
            ("busybox", "latest")
        );
        let r = Reference::parse("docker.io/kubemail/smtp-node:0.1.0");
        assert_eq!(r.to_string(), "kubemail/smtp-node:0.1.0");
        let r = Reference::parse("reg:5000/a/b@sha256:abc");
        assert_eq!(r.repository, "reg:5000/a/b");
        assert_eq!(r.digest.as_deref(), Some("sha256:abc"));
    }

    fn store_image(dir: &Path, file: &str, names: &[&str], created: u64) -> StoreHit {
        let mut recipe = Recipe {
            names: names.iter().map(|n| n.to_string()).collect(),
            created,
            files: vec![("/etc/passwd".into(), b"root:x:0:0::/:/x\n".to_vec(), 0o644)],
            annotations: BTreeMap::new(),
            ..Default::default()
        };
        recipe.config.user = Some("7:7".into());
        let built = write_image(&recipe, &dir.join(file)).unwrap();
        StoreHit {
            archive: built.archive,
            digest: built.digest,
            reference: names[0].to_string(),
            exact: true,
        }
    }

    #[test]
    fn lookup_by_tag_then_by_repository_and_unpack_once() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let a = store_image(&images, "a.tar", &["kubemail/x:1-abc", "kubemail/x:1"], 1);
        std::fs::write(images.join("notes.txt"), "ignored").unwrap();
        std::fs::write(images.join("broken.tar"), "not a tar").unwrap();
        let store = ImageStore::new(images.clone(), dir.path().join("cache"));

        assert_eq!(store.find("kubemail/x:1").unwrap(), Some(a.clone()));
        assert_eq!(
            store.find("docker.io/kubemail/x:1-abc").unwrap(),
            Some(a.clone())
        );
        let by_digest = format!("kubemail/x@{}", a.digest);
        assert!(store.find(&by_digest).unwrap().unwrap().exact);
        let other_tag = store.find("kubemail/x:test").unwrap().unwrap();
        assert!(!other_tag.exact);
        assert_eq!(other_tag.archive, a.archive);
        assert_eq!(store.find("busybox:1.36").unwrap(), None);

        let unpacked = store.unpacked(&a).unwrap();
        assert_eq!(unpacked.config.user.as_deref(), Some("7:7"));
        assert!(unpacked.read_file("/etc/passwd").starts_with("root:"));
        assert!(unpacked.rootfs.ends_with(a.digest.hex()));
        assert!(Arc::ptr_eq(&unpacked, &store.unpacked(&a).unwrap()));

        // An archive added while the agent runs is found by the next lookup.
        let b = store_image(&images, "b.tar", &["test/y:2"], 2);
        assert_eq!(store.find("test/y:2").unwrap(), Some(b));
        assert_eq!(
            store.references().unwrap(),
            ["kubemail/x:1", "kubemail/x:1-abc", "test/y:2"]
        );
    }
}
