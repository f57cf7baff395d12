//! Unpacks an image's layers into a directory — the root filesystem a container runs from — the
//! way a runtime's snapshotter would: layers in order, each checked against its `diff_id`,
//! whiteouts (`.wh.<name>`, `.wh..wh..opq`) removing what lower layers put there, owners and
//! modes kept (the node agent runs as root). Paths that would leave the directory are skipped.

use std::path::{Component, Path, PathBuf};

use super::archive::{Image, Layout};
use super::layer::gunzip;
use super::{Digest, OciError, media_type};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// Applies every layer of `image` from `layout` onto `dest` (created when missing).
pub fn unpack(layout: &Layout, image: &Image, dest: &Path) -> Result<(), OciError> {
    std::fs::create_dir_all(dest).map_err(|source| OciError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    for (index, layer) in image.manifest.layers.iter().enumerate() {
        let blob = layout.blob(&layer.digest)?;
        let tar = match layer.media_type.as_str() {
            media_type::LAYER_TAR => blob.to_vec(),
            media_type::LAYER_TAR_GZIP | media_type::DOCKER_LAYER_TAR_GZIP => gunzip(blob)
                .map_err(|source| OciError::Unpack {
                    index,
                    path: dest.to_path_buf(),
                    source,
                })?,
            other => {
                return Err(OciError::UnsupportedLayer {
                    media_type: other.to_string(),
                });
            }
        };
        if let Some(diff_id) = image.config.rootfs.diff_ids.get(index)
            && Digest::of(&tar) != *diff_id
        {
            return Err(OciError::DiffIdMismatch { index });
        }
        apply(&tar, dest).map_err(|source| OciError::Unpack {
            index,
            path: dest.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// Applies one uncompressed layer onto `dest`.
fn apply(tar_bytes: &[u8], dest: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let parent = path.parent().unwrap_or(Path::new(""));
            let Some(dir) = inside(dest, parent) else {
                continue;
            };
            if name == OPAQUE_WHITEOUT {
                if let Ok(children) = std::fs::read_dir(&dir) {
                    for child in children.flatten() {
                        remove(&child.path())?;
                    }
                }
            } else {
                remove(&dir.join(hidden))?;
            }
            continue;
        }
        // What an entry names replaces whatever a lower layer had there, except that a
        // directory over a directory merges.
        let parent = path.parent().unwrap_or(Path::new(""));
        if let Some(target) = inside(dest, parent).map(|dir| dir.join(name))
            && let Ok(existing) = std::fs::symlink_metadata(&target)
        {
            let entry_is_dir = entry.header().entry_type() == tar::EntryType::Directory;
            if existing.is_dir() != entry_is_dir {
                remove(&target)?;
            }
        }
        entry.unpack_in(dest)?;
    }
    Ok(())
}

/// `dest/rel` when `rel` is a plain relative path and no directory on the way is a symlink
/// (a whiteout must never delete outside the root).
fn inside(dest: &Path, rel: &Path) -> Option<PathBuf> {
    let mut path = dest.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(part) => {
                path.push(part);
                match std::fs::symlink_metadata(&path) {
                    Ok(meta) if meta.file_type().is_symlink() => return None,
                    _ => {}
                }
            }
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(path)
}

fn remove(path: &Path) -> std::io::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;
    use crate::oci::layer::{LayerBuilder, gzip};
    use crate::oci::{ContainerConfig, Descriptor, ImageConfig, Manifest, RootFs};

    fn image(layers: Vec<LayerBuilder>) -> (Layout, Image) {
        image_from_tars(layers.iter().map(|l| l.tar().unwrap()).collect())
    }

    fn image_from_tars(tars: Vec<Vec<u8>>) -> (Layout, Image) {
        let mut layout = Layout::default();
        let mut descriptors: Vec<Descriptor> = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in tars {
            diff_ids.push(Digest::of(&tar));
            descriptors.push(layout.add_blob(media_type::LAYER_TAR_GZIP, gzip(&tar).unwrap()));
        }
        let config = ImageConfig {
            created: None,
            architecture: "amd64".into(),
            os: "linux".into(),
            config: ContainerConfig::default(),
            rootfs: RootFs {
                type_: "layers".into(),
                diff_ids,
            },
            history: vec![],
        };
        let config_descriptor = layout.add_json(media_type::CONFIG, &config).unwrap();
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_type::MANIFEST.into()),
            config: config_descriptor,
            layers: descriptors,
            annotations: BTreeMap::new(),
        };
        let descriptor = layout.add_json(media_type::MANIFEST, &manifest).unwrap();
        layout.index.manifests.push(descriptor.clone());
        let image = layout.image().unwrap();
        (layout, image)
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts_owners_and_modes() {
        let mut base = LayerBuilder::new(0);
        base.file("etc/keep", b"1".to_vec(), 0o644).unwrap();
        base.file("etc/gone", b"2".to_vec(), 0o644).unwrap();
        base.file("opaque/old", b"3".to_vec(), 0o644).unwrap();
        base.dir("home/u", 0o700, 4321, 4321).unwrap();
        base.dir("tmp", 0o1777, 0, 0).unwrap();
        base.symlink("lib64", "../lib").unwrap();
        let mut top = LayerBuilder::new(0);
        top.file("etc/.wh.gone", vec![], 0o644).unwrap();
        top.file("opaque/.wh..wh..opq", vec![], 0o644).unwrap();
        top.file("opaque/new", b"4".to_vec(), 0o644).unwrap();
        top.file("etc/keep", b"updated".to_vec(), 0o600).unwrap();
        top.dir("was-link", 0o755, 0, 0).unwrap();
        top.file("was-link/f", b"5".to_vec(), 0o644).unwrap();
        base.symlink("was-link", "etc").unwrap();
        // A whiteout through a symlinked directory must not delete outside the root (written
        // by hand: LayerBuilder always adds the parent directory entry).
        let mut hostile = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(0);
        header.set_mode(0o644);
        hostile
            .append_data(&mut header, "lib64/.wh.x", std::io::empty())
            .unwrap();
        let (layout, img) = image_from_tars(vec![
            base.tar().unwrap(),
            top.tar().unwrap(),
            hostile.into_inner().unwrap(),
        ]);

        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("lib");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("x"), "outside").unwrap();
        let root = dir.path().join("root");
        unpack(&layout, &img, &root).unwrap();

        assert_eq!(std::fs::read(root.join("etc/keep")).unwrap(), b"updated");
        let keep = std::fs::metadata(root.join("etc/keep")).unwrap();
        assert_eq!(keep.permissions().mode() & 0o7777, 0o600);
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("opaque/old").exists());
        assert_eq!(std::fs::read(root.join("opaque/new")).unwrap(), b"4");
        let home = std::fs::metadata(root.join("home/u")).unwrap();
        assert_eq!((home.uid(), home.mode() & 0o7777), (4321, 0o700));
        let tmp = std::fs::metadata(root.join("tmp")).unwrap();
        assert_eq!(tmp.mode() & 0o7777, 0o1777);
        assert_eq!(
            std::fs::read_link(root.join("lib64")).unwrap(),
            Path::new("../lib")
        );
        assert!(outside.join("x").exists());
        assert!(
            root.join("was-link").is_dir() && !root.join("was-link").is_symlink(),
            "a directory replaces a lower layer's symlink"
        );
        assert_eq!(std::fs::read(root.join("was-link/f")).unwrap(), b"5");
        assert!(!root.join("etc/f").exists());
    }

    #[test]
    fn a_layer_that_does_not_match_its_diff_id_is_refused() {
        let mut l = LayerBuilder::new(0);
        l.file("a", b"1".to_vec(), 0o644).unwrap();
        let (layout, mut img) = image(vec![l]);
        img.config.rootfs.diff_ids[0] = Digest::of(b"something else");
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            unpack(&layout, &img, dir.path()),
            Err(OciError::DiffIdMismatch { index: 0 })
        ));
    }
}
