//! The OCI image format (image-spec v1.1) as far as kubemail needs it: the JSON documents
//! (index, manifest, image config), sha256 digests, deterministic filesystem layers and
//! `oci-archive` tarballs (an image layout — `oci-layout`, `index.json`, `blobs/sha256/<hex>` —
//! in one tar). `make images` writes archives with it ([`crate::image_build`]) and the node
//! agent's image store reads and unpacks them.
//!
//! Our own small writer rather than umoci/skopeo: every byte of an archive is decided here
//! (sorted entries, one timestamp, numeric owners, gzip without a name or time), so the same
//! commit yields the same archive on any machine with the same crate versions, and nothing
//! beyond the pinned Rust dependencies is needed to build one.

pub mod archive;
pub mod layer;
pub mod unpack;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use self::archive::Layout;

/// `imageLayoutVersion` of the `oci-layout` file.
pub const LAYOUT_VERSION: &str = "1.0.0";

/// Media types of the documents and blobs we write and read.
pub mod media_type {
    pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// What `docker save`/skopeo write for Docker-format images; same bytes as tar+gzip.
    pub const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
}

/// Annotation keys (image-spec `annotations.md`, plus the two names tools look for).
pub mod annotation {
    /// The tag of a manifest in an index (what `skopeo … oci-archive:FILE:TAG` selects).
    pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
    pub const CREATED: &str = "org.opencontainers.image.created";
    pub const VERSION: &str = "org.opencontainers.image.version";
    pub const REVISION: &str = "org.opencontainers.image.revision";
    pub const TITLE: &str = "org.opencontainers.image.title";
    pub const DESCRIPTION: &str = "org.opencontainers.image.description";
    pub const LICENSES: &str = "org.opencontainers.image.licenses";
    /// The full image name `ctr image import` gives the image.
    pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
    /// Every reference the image answers to (comma separated): the index can name one tag per
    /// manifest entry, and a second entry would make `skopeo copy oci-archive:FILE` ask which.
    pub const KUBEMAIL_NAMES: &str = "org.kubemail.image.names";
}

/// Why an image document or archive could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("build the layer tar")]
    BuildLayer(#[source] std::io::Error),
    #[error("layer path {path:?} is not a clean relative path")]
    InvalidPath { path: String },
    #[error("layer path {path:?} is added twice with different contents")]
    PathConflict { path: String },
    #[error("parse {what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is not an OCI image layout (no oci-layout file)")]
    NotALayout { path: PathBuf },
    #[error("invalid digest {digest:?} (only sha256 is supported)")]
    InvalidDigest { digest: String },
    #[error("blob {digest} is missing from the layout")]
    MissingBlob { digest: Digest },
    #[error("blob {digest} does not match its digest")]
    DigestMismatch { digest: Digest },
    #[error("the index has no image manifest")]
    NoManifest,
    #[error("layer media type {media_type} is not supported")]
    UnsupportedLayer { media_type: String },
    #[error("layer {index} does not match its diff_id in the image config")]
    DiffIdMismatch { index: usize },
    #[error("unpack layer {index} into {path}")]
    Unpack {
        index: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A content digest, always `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// The sha256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex(&Sha256::digest(bytes))))
    }

    /// The hex part, which is also the blob's file name under `blobs/sha256/`.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Digest {
    type Error = OciError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let valid = s.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if valid {
            Ok(Digest(s))
        } else {
            Err(OciError::InvalidDigest { digest: s })
        }
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> Self {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A reference to a blob (image-spec `descriptor.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

impl Platform {
    /// The platform this program runs on, in OCI (Go) names.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
        }
    }
}

/// `index.json` (image-spec `image-index.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest (image-spec `manifest.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The image configuration (image-spec `config.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub config: ContainerConfig,
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
}

/// What a runtime starts from an image, unless the pod says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// `uid`, `uid:gid`, `name` or `name:group`; empty means root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `NAME=value` entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

impl ContainerConfig {
    /// The image's environment as name/value pairs (entries without `=` are skipped).
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .flatten()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub type_: String,
    pub diff_ids: Vec<Digest>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_layer: Option<bool>,
}

/// RFC 3339 UTC time of a Unix timestamp, as image `created` fields want it.
pub fn rfc3339(unix_seconds: u64) -> String {
    let secs = i64::try_from(unix_seconds).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256_and_validated() {
        let d = Digest::of(b"");
        assert_eq!(
            d.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.hex().len(), 64);
        assert!(Digest::try_from("sha256:abc".to_string()).is_err());
        assert!(Digest::try_from(format!("sha512:{}", "a".repeat(64))).is_err());
        assert!(Digest::try_from(format!("sha256:{}", "A".repeat(64))).is_err());
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:../../etc\"").is_err());
    }

    #[test]
    fn config_uses_the_spec_field_names() {
        let config = ImageConfig {
            created: Some(rfc3339(1_700_000_000)),
            architecture: "amd64".into(),
            os: "linux".into(),
            config: ContainerConfig {
                user: Some("65532:65532".into()),
                entrypoint: Some(vec!["/usr/local/bin/x".into()]),
                working_dir: Some("/".into()),
                ..Default::default()
            },
            rootfs: RootFs {
                type_: "layers".into(),
                diff_ids: vec![Digest::of(b"x")],
            },
            history: vec![],
        };
        let v = serde_json::to_value(&config).unwrap();
        assert_eq!(v["created"], "2023-11-14T22:13:20Z");
        assert_eq!(v["config"]["User"], "65532:65532");
        assert_eq!(v["config"]["Entrypoint"][0], "/usr/local/bin/x");
        assert_eq!(v["config"]["WorkingDir"], "/");
        assert_eq!(v["rootfs"]["type"], "layers");
        assert!(v["config"].get("Cmd").is_none());
        let env = ContainerConfig {
            env: Some(vec!["A=1".into(), "B=x=y".into(), "broken".into()]),
            ..Default::default()
        };
        assert_eq!(
            env.env_pairs(),
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
    }
}
