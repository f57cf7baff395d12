//! An OCI image layout held in memory: blobs by digest plus `index.json`. Read from and written
//! to `oci-archive` tarballs (the layout's files in one uncompressed tar), or read from an image
//! layout directory. Every blob is checked against its digest when read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::layer::LayerBuilder;
use super::{
    Descriptor, Digest, ImageConfig, Index, LAYOUT_VERSION, Manifest, OciError, Platform,
    media_type,
};

const INDEX_FILE: &str = "index.json";
const LAYOUT_FILE: &str = "oci-layout";
const BLOBS_DIR: &str = "blobs/sha256";

/// An image layout in memory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub index: Index,
    blobs: BTreeMap<Digest, Vec<u8>>,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            index: Index {
                schema_version: 2,
                media_type: Some(media_type::INDEX.to_string()),
                manifests: Vec::new(),
                annotations: BTreeMap::new(),
            },
            blobs: BTreeMap::new(),
        }
    }
}

impl Layout {
    /// Stores `data` as a blob and returns its descriptor.
    pub fn add_blob(&mut self, media_type: &str, data: Vec<u8>) -> Descriptor {
        let digest = Digest::of(&data);
        let descriptor = Descriptor {
            media_type: media_type.to_string(),
            digest: digest.clone(),
            size: data.len() as u64,
            annotations: BTreeMap::new(),
            platform: None,
        };
        self.blobs.insert(digest, data);
        descriptor
    }

    /// Stores `value` as compact JSON (field order as declared, so the bytes are stable).
    pub fn add_json(
        &mut self,
        media_type: &str,
        value: &impl Serialize,
    ) -> Result<Descriptor, OciError> {
        let data = serde_json::to_vec(value).map_err(|source| OciError::Json {
            what: media_type.to_string(),
            source,
        })?;
        Ok(self.add_blob(media_type, data))
    }

    pub fn blob(&self, digest: &Digest) -> Result<&[u8], OciError> {
        self.blobs
            .get(digest)
            .map(Vec::as_slice)
            .ok_or_else(|| OciError::MissingBlob {
                digest: digest.clone(),
            })
    }

    /// Parses the JSON blob `descriptor` points at.
    pub fn json<T: DeserializeOwned>(&self, descriptor: &Descriptor) -> Result<T, OciError> {
        serde_json::from_slice(self.blob(&descriptor.digest)?).map_err(|source| OciError::Json {
            what: format!("{} {}", descriptor.media_type, descriptor.digest),
            source,
        })
    }

    /// The image of this layout: the first manifest of the index, or, for a multi-platform
    /// index, the manifest for this machine's platform.
    pub fn image(&self) -> Result<Image, OciError> {
        let first = self.index.manifests.first().ok_or(OciError::NoManifest)?;
        let descriptor = if first.media_type == media_type::INDEX {
            let nested: Index = self.json(first)?;
            let host = Platform::host();
            nested
                .manifests
                .into_iter()
                .find(|m| m.platform.as_ref().is_none_or(|p| *p == host))
                .ok_or(OciError::NoManifest)?
        } else {
            first.clone()
        };
        let manifest: Manifest = self.json(&descriptor)?;
        let config: ImageConfig = self.json(&manifest.config)?;
        Ok(Image {
            descriptor,
            manifest,
            config,
        })
    }

    /// The layout as an `oci-archive` tar whose entries all carry `mtime`.
    pub fn to_archive(&self, mtime: u64) -> Result<Vec<u8>, OciError> {
        let mut files = LayerBuilder::new(mtime);
        for (digest, data) in &self.blobs {
            files.file(
                &format!("{BLOBS_DIR}/{}", digest.hex()),
                data.clone(),
                0o644,
            )?;
        }
        let index = serde_json::to_vec(&self.index).map_err(|source| OciError::Json {
            what: INDEX_FILE.into(),
            source,
        })?;
        files.file(INDEX_FILE, index, 0o644)?;
        let layout = format!(r#"{{"imageLayoutVersion":"{LAYOUT_VERSION}"}}"#);
        files.file(LAYOUT_FILE, layout.into_bytes(), 0o644)?;
        files.tar()
    }

    /// Writes the archive to `path` atomically (a temporary file renamed into place).
    pub fn write_archive(&self, path: &Path, mtime: u64) -> Result<(), OciError> {
        let bytes = self.to_archive(mtime)?;
        write_atomically(path, &bytes)
    }

    /// Reads an `oci-archive` tarball or an image layout directory.
    pub fn read(path: &Path) -> Result<Self, OciError> {
        if path.is_dir() {
            Self::read_dir(path)
        } else {
            Self::read_archive(path)
        }
    }

    /// Reads an `oci-archive` tarball, checking every blob against its digest.
    pub fn read_archive(path: &Path) -> Result<Self, OciError> {
        let read_err = |source| OciError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut archive = tar::Archive::new(std::io::BufReader::new(file));
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let name = entry_name(&entry).map_err(read_err)?;
            let mut data = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
            entry.read_to_end(&mut data).map_err(read_err)?;
            files.insert(name, data);
        }
        Self::from_files(path, files)
    }

    /// Reads an image layout directory, checking every blob against its digest.
    pub fn read_dir(dir: &Path) -> Result<Self, OciError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| OciError::Read { path, source })
        };
        let mut files = BTreeMap::new();
        for name in [LAYOUT_FILE, INDEX_FILE] {
            if dir.join(name).exists() {
                files.insert(name.to_string(), read(name)?);
            }
        }
        let blobs = dir.join(BLOBS_DIR);
        let entries = std::fs::read_dir(&blobs).map_err(|source| OciError::Read {
            path: blobs.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| OciError::Read {
                path: blobs.clone(),
                source,
            })?;
            let name = format!("{BLOBS_DIR}/{}", entry.file_name().to_string_lossy());
            files.insert(name.clone(), read(&name)?);
        }
        Self::from_files(dir, files)
    }

    /// Only `index.json` of an `oci-archive` (for listing an image store without reading the
    /// blobs into memory).
    pub fn read_archive_index(path: &Path) -> Result<Index, OciError> {
        let read_err = |source| OciError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut archive = tar::Archive::new(std::io::BufReader::new(file));
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            if entry_name(&entry).map_err(read_err)? == INDEX_FILE {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(read_err)?;
                return serde_json::from_slice(&data).map_err(|source| OciError::Json {
                    what: format!("{} in {}", INDEX_FILE, path.display()),
                    source,
                });
            }
        }
        Err(OciError::NotALayout {
            path: path.to_path_buf(),
        })
    }

    fn from_files(path: &Path, mut files: BTreeMap<String, Vec<u8>>) -> Result<Self, OciError> {
        if !files.contains_key(LAYOUT_FILE) {
            return Err(OciError::NotALayout {
                path: path.to_path_buf(),
            });
        }
        let index_bytes = files
            .remove(INDEX_FILE)
            .ok_or_else(|| OciError::NotALayout {
                path: path.to_path_buf(),
            })?;
        let index: Index =
            serde_json::from_slice(&index_bytes).map_err(|source| OciError::Json {
                what: format!("{} in {}", INDEX_FILE, path.display()),
                source,
            })?;
        let mut blobs = BTreeMap::new();
        for (name, data) in files {
            let Some(hex) = name.strip_prefix(&format!("{BLOBS_DIR}/")) else {
                continue;
            };
            let digest = Digest::try_from(format!("sha256:{hex}"))?;
            if Digest::of(&data) != digest {
                return Err(OciError::DigestMismatch { digest });
            }
            blobs.insert(digest, data);
        }
        Ok(Layout { index, blobs })
    }
}

/// One image of a layout: its manifest descriptor, manifest and config.
#[derive(Debug, Clone)]
pub struct Image {
    pub descriptor: Descriptor,
    pub manifest: Manifest,
    pub config: ImageConfig,
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), OciError> {
    let write_err = |source| OciError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(write_err)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_err)?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    set_mode(tmp.path(), 0o644).map_err(write_err)?;
    tmp.persist(path).map_err(|e| write_err(e.error))?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// An entry's path without a leading `./` (tools differ in writing one).
fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> std::io::Result<String> {
    let path: PathBuf = entry.path()?.into_owned();
    let name = path.to_string_lossy();
    Ok(name.trim_start_matches("./").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{ContainerConfig, RootFs};

    fn layout() -> Layout {
        let mut l = Layout::default();
        let layer = l.add_blob(media_type::LAYER_TAR, b"layer".to_vec());
        let config = l
            .add_json(
                media_type::CONFIG,
                &ImageConfig {
                    created: None,
                    architecture: "amd64".into(),
                    os: "linux".into(),
                    config: ContainerConfig {
                        user: Some("1:1".into()),
                        ..Default::default()
                    },
                    rootfs: RootFs {
                        type_: "layers".into(),
                        diff_ids: vec![layer.digest.clone()],
                    },
                    history: vec![],
                },
            )
            .unwrap();
        let manifest = l
            .add_json(
                media_type::MANIFEST,
                &Manifest {
                    schema_version: 2,
                    media_type: Some(media_type::MANIFEST.into()),
                    config,
                    layers: vec![layer],
                    annotations: BTreeMap::new(),
                },
            )
            .unwrap();
        l.index.manifests.push(manifest);
        l
    }

    #[test]
    fn archive_round_trip_is_byte_stable_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tar");
        let original = layout();
        original.write_archive(&path, 42).unwrap();
        let first = std::fs::read(&path).unwrap();
        let read = Layout::read_archive(&path).unwrap();
        assert_eq!(read.index, original.index);
        let image = read.image().unwrap();
        assert_eq!(image.config.config.user.as_deref(), Some("1:1"));
        assert_eq!(
            read.blob(&image.manifest.layers[0].digest).unwrap(),
            b"layer"
        );
        assert_eq!(Layout::read_archive_index(&path).unwrap(), original.index);
        read.write_archive(&path, 42).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            first,
            "same layout, same bytes"
        );

        // A blob whose bytes do not match its name is refused.
        let hex = image.manifest.layers[0].digest.hex().to_string();
        let mut files = LayerBuilder::new(0);
        files.file("oci-layout", b"{}".to_vec(), 0o644).unwrap();
        files
            .file(
                "index.json",
                serde_json::to_vec(&read.index).unwrap(),
                0o644,
            )
            .unwrap();
        files
            .file(&format!("blobs/sha256/{hex}"), b"tampered".to_vec(), 0o644)
            .unwrap();
        std::fs::write(&path, files.tar().unwrap()).unwrap();
        assert!(matches!(
            Layout::read_archive(&path),
            Err(OciError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn a_tar_without_oci_layout_is_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tar");
        let mut files = LayerBuilder::new(0);
        files.file("index.json", b"{}".to_vec(), 0o644).unwrap();
        std::fs::write(&path, files.tar().unwrap()).unwrap();
        assert!(matches!(
            Layout::read_archive(&path),
            Err(OciError::NotALayout { .. })
        ));
    }
}
