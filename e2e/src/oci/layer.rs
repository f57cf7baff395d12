//! A filesystem layer built in memory with deterministic bytes: entries sorted by path, every
//! parent directory present before its children, one modification time for everything,
//! numeric owners without user or group names, and gzip without a file name or timestamp.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path};

use flate2::Compression;

use super::OciError;

/// Mode of directories created implicitly as parents.
const PARENT_DIR_MODE: u32 = 0o755;

/// One entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The entries of one layer, keyed by their path relative to the root (no leading `/`).
#[derive(Debug, Clone)]
pub struct LayerBuilder {
    mtime: u64,
    entries: BTreeMap<String, Node>,
}

impl LayerBuilder {
    /// An empty layer whose entries all carry `mtime` (seconds since the epoch).
    pub fn new(mtime: u64) -> Self {
        LayerBuilder {
            mtime,
            entries: BTreeMap::new(),
        }
    }

    /// A directory; its parents are created (root-owned, 0755) when missing.
    pub fn dir(&mut self, path: &str, mode: u32, uid: u32, gid: u32) -> Result<(), OciError> {
        self.insert(
            path,
            Node {
                kind: NodeKind::Dir,
                mode,
                uid,
                gid,
            },
        )
    }

    /// A root-owned regular file.
    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) -> Result<(), OciError> {
        self.insert(
            path,
            Node {
                kind: NodeKind::File(data),
                mode,
                uid: 0,
                gid: 0,
            },
        )
    }

    /// A root-owned symbolic link to `target` (stored as given, absolute or relative).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), OciError> {
        self.insert(
            path,
            Node {
                kind: NodeKind::Symlink(target.to_string()),
                mode: 0o777,
                uid: 0,
                gid: 0,
            },
        )
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Node> {
        normalise(path).ok().and_then(|p| self.entries.get(&p))
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The uncompressed tar (what the image config's `diff_id` is the digest of).
    pub fn tar(&self) -> Result<Vec<u8>, OciError> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, node) in &self.entries {
            let mut header = tar::Header::new_ustar();
            header.set_mode(node.mode);
            header.set_uid(u64::from(node.uid));
            header.set_gid(u64::from(node.gid));
            header.set_mtime(self.mtime);
            let appended = match &node.kind {
                NodeKind::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    builder.append_data(&mut header, format!("{path}/"), std::io::empty())
                }
                NodeKind::File(data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(data.len() as u64);
                    builder.append_data(&mut header, path, data.as_slice())
                }
                NodeKind::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    builder.append_link(&mut header, path, target)
                }
            };
            appended.map_err(OciError::BuildLayer)?;
        }
        builder.into_inner().map_err(OciError::BuildLayer)
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), OciError> {
        let path = normalise(path)?;
        let mut parent = Path::new(&path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            let key = p.to_string_lossy().into_owned();
            match self.entries.get(&key) {
                Some(Node {
                    kind: NodeKind::Dir,
                    ..
                }) => {}
                Some(_) => return Err(OciError::PathConflict { path: key }),
                None => {
                    self.entries.insert(
                        key,
                        Node {
                            kind: NodeKind::Dir,
                            mode: PARENT_DIR_MODE,
                            uid: 0,
                            gid: 0,
                        },
                    );
                }
            }
            parent = p.parent();
        }
        match self.entries.get(&path) {
            // An implicit parent directory may be given its real mode and owner later.
            Some(existing) if existing.kind == NodeKind::Dir && node.kind == NodeKind::Dir => {}
            Some(existing) if *existing != node => return Err(OciError::PathConflict { path }),
            _ => {}
        }
        self.entries.insert(path, node);
        Ok(())
    }
}

/// Gzip with fixed settings and no name or timestamp in the header, so equal input gives equal
/// output.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>, OciError> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::with_capacity(data.len() / 2), Compression::default());
    encoder.write_all(data).map_err(OciError::BuildLayer)?;
    encoder.finish().map_err(OciError::BuildLayer)
}

/// Decompresses a gzip stream.
pub fn gunzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() * 3);
    let mut decoder = flate2::read::GzDecoder::new(data);
    std::io::copy(&mut decoder, &mut out)?;
    Ok(out)
}

/// `path` relative to the root, `/`-separated, without `.`, `..` or empty components.
fn normalise(path: &str) -> Result<String, OciError> {
    let invalid = || OciError::InvalidPath {
        path: path.to_string(),
    };
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => parts.push(p.to_str().ok_or_else(invalid)?),
            Component::ParentDir | Component::Prefix(_) => return Err(invalid()),
        }
    }
    if parts.is_empty() {
        return Err(invalid());
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mtime: u64) -> LayerBuilder {
        let mut l = LayerBuilder::new(mtime);
        // Added out of order on purpose: the tar is sorted regardless.
        l.file("/usr/local/bin/app", b"\x7fELF".to_vec(), 0o755)
            .unwrap();
        l.file("etc/passwd", b"root:x:0:0::/:/x\n".to_vec(), 0o644)
            .unwrap();
        l.dir("/tmp", 0o1777, 0, 0).unwrap();
        l.symlink("lib64/ld.so", "/lib/x86_64-linux-gnu/ld.so")
            .unwrap();
        l
    }

    fn listing(tar_bytes: &[u8]) -> Vec<(String, u32, u64, u64)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn entries_are_sorted_with_parents_first_and_one_mtime() {
        let tar = sample(1234).tar().unwrap();
        let names: Vec<String> = listing(&tar).into_iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            [
                "etc/",
                "etc/passwd",
                "lib64/",
                "lib64/ld.so",
                "tmp/",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/app"
            ]
        );
        assert!(listing(&tar).iter().all(|e| e.3 == 1234 && e.2 == 0));
        let tmp = listing(&tar).into_iter().find(|e| e.0 == "tmp/").unwrap();
        assert_eq!(tmp.1, 0o1777);
    }

    #[test]
    fn same_input_same_bytes_and_mtime_matters() {
        let a = sample(1).tar().unwrap();
        assert_eq!(a, sample(1).tar().unwrap());
        assert_ne!(a, sample(2).tar().unwrap());
        assert_eq!(gzip(&a).unwrap(), gzip(&a).unwrap());
        assert_eq!(gunzip(&gzip(&a).unwrap()).unwrap(), a);
        // No timestamp (bytes 4..8) and OS "unknown" in the gzip header.
        let gz = gzip(&a).unwrap();
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
        assert_eq!(gz[9], 255);
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let mut l = LayerBuilder::new(0);
        assert!(l.file("../etc/x", vec![], 0o644).is_err());
        assert!(l.file("/", vec![], 0o644).is_err());
        l.file("a/b", b"1".to_vec(), 0o644).unwrap();
        assert!(l.file("a/b/c", vec![], 0o644).is_err(), "a/b is a file");
        assert!(l.file("a/b", b"2".to_vec(), 0o644).is_err());
        l.file("a/b", b"1".to_vec(), 0o644).unwrap();
        l.dir("a", 0o700, 5, 5).unwrap();
        assert_eq!(l.get("/a").unwrap().mode, 0o700);
    }
}
