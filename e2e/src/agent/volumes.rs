//! Pod volumes on the host. ConfigMap, Secret, downwardAPI and projected volumes (including the
//! ServiceAccount token, `kube-root-ca.crt` and namespace files of `kube-api-access-*`) are
//! materialised as plain files under `<state-dir>/pods/<uid>/volumes/<name>/`; emptyDir is an
//! empty directory there; hostPath is the host path itself. Each container then sees them at its
//! `volumeMounts` through bind mounts in its own mount namespace (see `process.rs`).
//! Planning is pure; writing is done atomically (temp file + rename) so a refresh never shows a
//! half-written file to a running container. With a pod `fsGroup`, the kubelet's volume
//! ownership rules apply: emptyDir and file volumes belong to that group, files get group read
//! (and emptyDir group write), directories the setgid bit, so a non-root container can read a
//! Secret of mode 0440.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, DownwardAPIVolumeFile, KeyToPath, Pod, Volume};

use super::env::{self, Allocatable, Env, EnvError};
use super::objects::{PodObjects, token_key};

/// The kubelet's default file mode for ConfigMap, Secret, downwardAPI and projected volumes
/// (0644, `defaultMode: 420`).
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// emptyDir is world-writable in Kubernetes so any container user can write to it.
const EMPTY_DIR_MODE: u32 = 0o777;
/// Bits the kubelet adds for `fsGroup`: group read on files of read-only volumes (ConfigMap,
/// Secret, downwardAPI, projected), group read-write on emptyDir, setgid and group search on
/// directories.
const FS_GROUP_RO: u32 = 0o440;
const FS_GROUP_RW: u32 = 0o660;
const FS_GROUP_DIR: u32 = 0o2000 | 0o110;

/// Why a volume could not be prepared or mounted.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("configmap \"{name}\" not found")]
    ConfigMapNotFound { name: String },
    #[error("secret \"{name}\" not found")]
    SecretNotFound { name: String },
    #[error("configmap {name} references non-existent config key: {key}")]
    ConfigMapKeyNotFound { name: String, key: String },
    #[error("secret {name} references non-existent secret key: {key}")]
    SecretKeyNotFound { name: String, key: String },
    #[error("no token was fetched for volume {volume}")]
    TokenMissing { volume: String },
    #[error("volume {volume}: {kind} volumes are not supported by the node agent")]
    Unsupported { volume: String, kind: &'static str },
    #[error("volume {volume}: invalid path {path:?} (must be relative without '..')")]
    InvalidPath { volume: String, path: String },
    #[error("volume {volume}: downward API")]
    DownwardApi {
        volume: String,
        #[source]
        source: EnvError,
    },
    #[error("volumeMount {mount}: no volume of that name in the pod")]
    VolumeNotFound { mount: String },
    #[error("hostPath {path}: {reason}")]
    HostPath { path: String, reason: &'static str },
    #[error("write volume files under {dir}")]
    Write {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a volume is on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumePlan {
    /// A directory of files the agent writes (configMap, secret, downwardAPI, projected).
    Files(Vec<PlannedFile>),
    EmptyDir,
    HostPath {
        path: PathBuf,
        kind: String,
    },
}

/// One file of a materialised volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Relative path inside the volume, checked to stay inside it.
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Inputs for volumes that read the pod or the API (downward API, tokens, objects).
#[derive(Debug, Clone, Copy)]
pub struct VolumeInputs<'a> {
    pub pod: &'a Pod,
    pub pod_ip: Option<IpAddr>,
    pub host_ip: IpAddr,
    pub allocatable: Allocatable,
    pub objects: &'a PodObjects,
}

/// A bind mount for one container: `source` on the host appears at `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
    /// A subPath that names a file: the target is created as a file, not a directory.
    pub is_file: bool,
}

/// Works out what `volume` holds.
pub fn plan_volume(volume: &Volume, inputs: &VolumeInputs<'_>) -> Result<VolumePlan, VolumeError> {
    let name = &volume.name;
    let mut files = FileSet {
        volume: name,
        files: Vec::new(),
    };
    if volume.empty_dir.is_some() {
        return Ok(VolumePlan::EmptyDir);
    }
    if let Some(hp) = &volume.host_path {
        return Ok(VolumePlan::HostPath {
            path: PathBuf::from(&hp.path),
            kind: hp.type_.clone().unwrap_or_default(),
        });
    }
    if let Some(cm) = &volume.config_map {
        let mode = mode_or(cm.default_mode, DEFAULT_FILE_MODE);
        add_config_map(
            &mut files,
            inputs,
            &cm.name,
            cm.items.as_deref(),
            cm.optional,
            mode,
        )?;
        return Ok(VolumePlan::Files(files.files));
    }
    if let Some(s) = &volume.secret {
        let mode = mode_or(s.default_mode, DEFAULT_FILE_MODE);
        let secret_name = s.secret_name.clone().unwrap_or_default();
        add_secret(
            &mut files,
            inputs,
            &secret_name,
            s.items.as_deref(),
            s.optional,
            mode,
        )?;
        return Ok(VolumePlan::Files(files.files));
    }
    if let Some(d) = &volume.downward_api {
        let mode = mode_or(d.default_mode, DEFAULT_FILE_MODE);
        add_downward(&mut files, inputs, d.items.as_deref(), mode)?;
        return Ok(VolumePlan::Files(files.files));
    }
    if let Some(p) = &volume.projected {
        let mode = mode_or(p.default_mode, DEFAULT_FILE_MODE);
        for source in p.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                add_config_map(
                    &mut files,
                    inputs,
                    &cm.name,
                    cm.items.as_deref(),
                    cm.optional,
                    mode,
                )?;
            } else if let Some(s) = &source.secret {
                add_secret(
                    &mut files,
                    inputs,
                    &s.name,
                    s.items.as_deref(),
                    s.optional,
                    mode,
                )?;
            } else if let Some(d) = &source.downward_api {
                add_downward(&mut files, inputs, d.items.as_deref(), mode)?;
            } else if let Some(t) = &source.service_account_token {
                let key = token_key(t.audience.as_deref(), t.expiration_seconds);
                let token =
                    inputs
                        .objects
                        .tokens
                        .get(&key)
                        .ok_or_else(|| VolumeError::TokenMissing {
                            volume: name.clone(),
                        })?;
                files.add(&t.path, token.as_bytes().to_vec(), mode)?;
            } else if source.cluster_trust_bundle.is_some() {
                return Err(VolumeError::Unsupported {
                    volume: name.clone(),
                    kind: "clusterTrustBundle projection",
                });
            } else if source.pod_certificate.is_some() {
                return Err(VolumeError::Unsupported {
                    volume: name.clone(),
                    kind: "podCertificate projection",
                });
            }
        }
        return Ok(VolumePlan::Files(files.files));
    }
    let kind = if volume.persistent_volume_claim.is_some() {
        "persistentVolumeClaim"
    } else if volume.ephemeral.is_some() {
        "ephemeral"
    } else if volume.csi.is_some() {
        "csi"
    } else if volume.image.is_some() {
        "image"
    } else {
        "this kind of"
    };
    Err(VolumeError::Unsupported {
        volume: name.clone(),
        kind,
    })
}

/// Writes `plan` into `dir` (files atomically, removing files no longer in the plan), owned by
/// `fs_group` when the pod has one, and returns the host directory that containers bind-mount.
pub fn materialise(
    dir: &Path,
    plan: &VolumePlan,
    fs_group: Option<u32>,
) -> Result<PathBuf, VolumeError> {
    let write_err = |source| VolumeError::Write {
        dir: dir.to_path_buf(),
        source,
    };
    match plan {
        VolumePlan::EmptyDir => {
            std::fs::create_dir_all(dir).map_err(write_err)?;
            let mut mode = EMPTY_DIR_MODE;
            if let Some(gid) = fs_group {
                std::os::unix::fs::chown(dir, None, Some(gid)).map_err(write_err)?;
                mode |= FS_GROUP_RW | FS_GROUP_DIR;
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(write_err)?;
            Ok(dir.to_path_buf())
        }
        VolumePlan::HostPath { path, kind } => {
            prepare_host_path(path, kind)?;
            Ok(path.clone())
        }
        VolumePlan::Files(files) => {
            std::fs::create_dir_all(dir).map_err(write_err)?;
            for f in files {
                let mode = f.mode | fs_group.map_or(0, |_| FS_GROUP_RO);
                write_if_changed(&dir.join(&f.path), &f.data, mode, fs_group).map_err(write_err)?;
            }
            let wanted: BTreeSet<PathBuf> = files.iter().map(|f| dir.join(&f.path)).collect();
            remove_stale(dir, &wanted).map_err(write_err)?;
            if let Some(gid) = fs_group {
                own_dirs(dir, gid).map_err(write_err)?;
            }
            Ok(dir.to_path_buf())
        }
    }
}

/// Gives `dir` and every directory below it to group `gid` with the fsGroup directory bits.
fn own_dirs(dir: &Path, gid: u32) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Ok(());
    }
    std::os::unix::fs::chown(dir, None, Some(gid))?;
    let mode = meta.permissions().mode() & 0o7777 | FS_GROUP_RO | FS_GROUP_DIR;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    for entry in std::fs::read_dir(dir)? {
        own_dirs(&entry?.path(), gid)?;
    }
    Ok(())
}

/// The bind mounts of `container`: each volumeMount's host directory (or subPath inside it,
/// `subPathExpr` expanded with the container's env), parents before children.
pub fn container_mounts(
    container: &Container,
    volume_dirs: &HashMap<String, PathBuf>,
    env: &Env,
) -> Result<Vec<BindMount>, VolumeError> {
    let mut mounts = Vec::new();
    for vm in container.volume_mounts.iter().flatten() {
        let base = volume_dirs
            .get(&vm.name)
            .ok_or_else(|| VolumeError::VolumeNotFound {
                mount: vm.mount_path.clone(),
            })?;
        let sub = match (&vm.sub_path, &vm.sub_path_expr) {
            (Some(p), _) if !p.is_empty() => Some(p.clone()),
            (_, Some(e)) if !e.is_empty() => Some(env.expand(e)),
            _ => None,
        };
        let (source, is_file) = match sub {
            Some(sub) => {
                check_relative(&vm.name, &sub)?;
                let source = base.join(&sub);
                if source.is_file() {
                    (source, true)
                } else {
                    // The kubelet creates a missing subPath as a directory.
                    std::fs::create_dir_all(&source).map_err(|e| VolumeError::Write {
                        dir: source.clone(),
                        source: e,
                    })?;
                    (source, false)
                }
            }
            None => (base.clone(), base.is_file()),
        };
        mounts.push(BindMount {
            source,
            target: vm.mount_path.clone(),
            read_only: vm.read_only == Some(true),
            is_file,
        });
    }
    mounts.sort_by_key(|m| Path::new(&m.target).components().count());
    Ok(mounts)
}

struct FileSet<'a> {
    volume: &'a str,
    files: Vec<PlannedFile>,
}

impl FileSet<'_> {
    fn add(&mut self, path: &str, data: Vec<u8>, mode: u32) -> Result<(), VolumeError> {
        check_relative(self.volume, path)?;
        // Later projections win on a path clash, like the kubelet's projection order.
        self.files.retain(|f| f.path != path);
        self.files.push(PlannedFile {
            path: path.to_string(),
            data,
            mode,
        });
        Ok(())
    }
}

fn add_config_map(
    files: &mut FileSet<'_>,
    inputs: &VolumeInputs<'_>,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
) -> Result<(), VolumeError> {
    let Some(cm) = inputs.objects.config_maps.get(name) else {
        return if optional == Some(true) {
            Ok(())
        } else {
            Err(VolumeError::ConfigMapNotFound { name: name.into() })
        };
    };
    let mut data: Vec<(String, Vec<u8>)> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    data.extend(
        cm.binary_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone())),
    );
    add_keys(files, data, items, optional, mode, |key| {
        VolumeError::ConfigMapKeyNotFound {
            name: name.into(),
            key: key.into(),
        }
    })
}

fn add_secret(
    files: &mut FileSet<'_>,
    inputs: &VolumeInputs<'_>,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
) -> Result<(), VolumeError> {
    let Some(secret) = inputs.objects.secrets.get(name) else {
        return if optional == Some(true) {
            Ok(())
        } else {
            Err(VolumeError::SecretNotFound { name: name.into() })
        };
    };
    let data = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    add_keys(files, data, items, optional, mode, |key| {
        VolumeError::SecretKeyNotFound {
            name: name.into(),
            key: key.into(),
        }
    })
}

fn add_keys(
    files: &mut FileSet<'_>,
    data: Vec<(String, Vec<u8>)>,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
    missing: impl Fn(&str) -> VolumeError,
) -> Result<(), VolumeError> {
    match items.filter(|i| !i.is_empty()) {
        None => {
            for (key, bytes) in data {
                files.add(&key, bytes, mode)?;
            }
        }
        Some(items) => {
            for item in items {
                match data.iter().find(|(k, _)| *k == item.key) {
                    Some((_, bytes)) => {
                        files.add(&item.path, bytes.clone(), mode_or(item.mode, mode))?
                    }
                    None if optional == Some(true) => {}
                    None => return Err(missing(&item.key)),
                }
            }
        }
    }
    Ok(())
}

fn add_downward(
    files: &mut FileSet<'_>,
    inputs: &VolumeInputs<'_>,
    items: Option<&[DownwardAPIVolumeFile]>,
    mode: u32,
) -> Result<(), VolumeError> {
    let volume = files.volume.to_string();
    let wrap = |source| VolumeError::DownwardApi {
        volume: volume.clone(),
        source,
    };
    for item in items.into_iter().flatten() {
        let value = if let Some(f) = &item.field_ref {
            env::field_value(inputs.pod, &f.field_path, inputs.pod_ip, inputs.host_ip)
                .map_err(wrap)?
        } else if let Some(r) = &item.resource_field_ref {
            let container = inputs
                .pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .find(|c| Some(&c.name) == r.container_name.as_ref())
                .cloned()
                .unwrap_or_default();
            env::resource_value(&container, r, inputs.allocatable).map_err(wrap)?
        } else {
            continue;
        };
        files.add(&item.path, value.into_bytes(), mode_or(item.mode, mode))?;
    }
    Ok(())
}

fn mode_or(mode: Option<i32>, default: u32) -> u32 {
    mode.and_then(|m| u32::try_from(m).ok())
        .map_or(default, |m| m & 0o7777)
}

fn check_relative(volume: &str, path: &str) -> Result<(), VolumeError> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidPath {
            volume: volume.to_string(),
            path: path.to_string(),
        })
    }
}

fn write_if_changed(path: &Path, data: &[u8], mode: u32, gid: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o7777 == mode
        && gid.is_none_or(|g| meta.gid() == g)
        && std::fs::read(path).is_ok_and(|old| old == data)
    {
        return Ok(());
    }
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!("..{file_name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        if let Some(gid) = gid {
            std::os::unix::fs::fchown(&f, None, Some(gid))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    std::fs::rename(&tmp, path)
}

fn remove_stale(dir: &Path, wanted: &BTreeSet<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let kind = std::fs::symlink_metadata(&path)?.file_type();
        if kind.is_dir() {
            remove_stale(&path, wanted)?;
            if std::fs::read_dir(&path)?.next().is_none() {
                std::fs::remove_dir(&path)?;
            }
        } else if !wanted.contains(&path) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn prepare_host_path(path: &Path, kind: &str) -> Result<(), VolumeError> {
    let err = |reason| VolumeError::HostPath {
        path: path.display().to_string(),
        reason,
    };
    match kind {
        "DirectoryOrCreate" => {
            std::fs::create_dir_all(path).map_err(|_| err("cannot create directory"))
        }
        "FileOrCreate" => {
            if !path.exists() {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|_| err("cannot create parent directory"))?;
                }
                std::fs::File::create(path).map_err(|_| err("cannot create file"))?;
            }
            Ok(())
        }
        "Directory" if !path.is_dir() => Err(err("is not a directory")),
        "File" if !path.is_file() => Err(err("is not a file")),
        "" => Ok(()),
        _ if !path.exists() => Err(err("does not exist")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use serde_json::json;

    use super::*;
    use crate::agent::objects::TokenKey;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns1", "labels": {"b": "2", "a": "1"}},
            "spec": {"containers": [{"name": "c", "resources": {"limits": {"memory": "64Mi"}}}]}
        }))
        .unwrap()
    }

    fn objects() -> PodObjects {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "cfg"}, "data": {"key": "v1", "other": "v2"}
        }))
        .unwrap();
        let root_ca: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": "PEM"}
        }))
        .unwrap();
        let secret = Secret {
            data: Some([("key".to_string(), ByteString(b"s3cret".to_vec()))].into()),
            ..Default::default()
        };
        PodObjects {
            config_maps: HashMap::from([("cfg".into(), cm), ("kube-root-ca.crt".into(), root_ca)]),
            secrets: HashMap::from([("sec".into(), secret)]),
            tokens: HashMap::from([(
                TokenKey {
                    audience: None,
                    expiration_seconds: 3607,
                },
                "jwt".to_string(),
            )]),
        }
    }

    fn plan(volume: serde_json::Value) -> Result<VolumePlan, VolumeError> {
        let pod = pod();
        let objects = objects();
        let volume: Volume = serde_json::from_value(volume).unwrap();
        let inputs = VolumeInputs {
            pod: &pod,
            pod_ip: Some(IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1))),
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            allocatable: Allocatable {
                cpu_millis: 2000,
                memory_bytes: 1 << 30,
            },
            objects: &objects,
        };
        plan_volume(&volume, &inputs)
    }

    fn files(plan: VolumePlan) -> Vec<(String, String, u32)> {
        let VolumePlan::Files(files) = plan else {
            panic!("not a files volume: {plan:?}")
        };
        files
            .into_iter()
            .map(|f| (f.path, String::from_utf8(f.data).unwrap(), f.mode))
            .collect()
    }

    #[test]
    fn config_map_all_keys_or_items_with_modes() {
        let all = files(plan(json!({"name": "v", "configMap": {"name": "cfg"}})).unwrap());
        assert_eq!(
            all,
            [
                ("key".into(), "v1".into(), 0o644),
                ("other".into(), "v2".into(), 0o644)
            ]
        );
        let items = files(
            plan(json!({"name": "v", "configMap": {"name": "cfg", "defaultMode": 0o600,
                "items": [{"key": "key", "path": "sub/k.txt"}, {"key": "other", "path": "o", "mode": 0o400}]}}))
            .unwrap(),
        );
        assert_eq!(
            items,
            [
                ("sub/k.txt".into(), "v1".into(), 0o600),
                ("o".into(), "v2".into(), 0o400)
            ]
        );
    }

    #[test]
    fn missing_objects_and_keys() {
        let err = plan(json!({"name": "v", "configMap": {"name": "nope"}})).unwrap_err();
        assert_eq!(err.to_string(), "configmap \"nope\" not found");
        assert!(
            files(
                plan(json!({"name": "v", "secret": {"secretName": "nope", "optional": true}}))
                    .unwrap()
            )
            .is_empty()
        );
        let err = plan(
            json!({"name": "v", "secret": {"secretName": "sec", "items": [{"key": "x", "path": "x"}]}}),
        );
        assert!(matches!(err, Err(VolumeError::SecretKeyNotFound { .. })));
        let err = plan(
            json!({"name": "v", "configMap": {"name": "cfg", "items": [{"key": "key", "path": "../etc"}]}}),
        );
        assert!(matches!(err, Err(VolumeError::InvalidPath { .. })));
    }

    #[test]
    fn service_account_projection_like_kube_api_access() {
        let v = json!({"name": "kube-api-access-x", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
        ]}});
        assert_eq!(
            files(plan(v).unwrap()),
            [
                ("token".into(), "jwt".into(), 0o644),
                ("ca.crt".into(), "PEM".into(), 0o644),
                ("namespace".into(), "ns1".into(), 0o644)
            ]
        );
    }

    #[test]
    fn downward_api_volume_labels_and_resources() {
        let v = json!({"name": "d", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "mem", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory", "divisor": "1Mi"}}
        ]}});
        assert_eq!(
            files(plan(v).unwrap()),
            [
                ("labels".into(), "a=\"1\"\nb=\"2\"".into(), 0o644),
                ("mem".into(), "64".into(), 0o644)
            ]
        );
    }

    #[test]
    fn other_kinds() {
        assert_eq!(
            plan(json!({"name": "e", "emptyDir": {}})).unwrap(),
            VolumePlan::EmptyDir
        );
        assert!(matches!(
            plan(json!({"name": "p", "persistentVolumeClaim": {"claimName": "c"}})),
            Err(VolumeError::Unsupported {
                kind: "persistentVolumeClaim",
                ..
            })
        ));
    }

    #[test]
    fn materialise_writes_updates_and_prunes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("v");
        let f = |p: &str, d: &str| PlannedFile {
            path: p.into(),
            data: d.as_bytes().to_vec(),
            mode: 0o640,
        };
        materialise(
            &dir,
            &VolumePlan::Files(vec![f("a", "1"), f("sub/b", "2")]),
            None,
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("sub/b")).unwrap(), "2");
        let mode = std::fs::metadata(dir.join("a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o640);
        materialise(&dir, &VolumePlan::Files(vec![f("a", "changed")]), None).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "changed");
        assert!(
            !dir.join("sub").exists(),
            "stale files and empty dirs are removed"
        );
        let e = materialise(&tmp.path().join("e"), &VolumePlan::EmptyDir, None).unwrap();
        assert_eq!(
            std::fs::metadata(e).unwrap().permissions().mode() & 0o777,
            0o777
        );
    }

    /// Needs root (chown to another group), as the agent itself.
    #[test]
    fn fs_group_owns_volume_files_with_group_read() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("secret");
        let secret = PlannedFile {
            path: "tls/key.pem".into(),
            data: b"k".to_vec(),
            mode: 0o400,
        };
        materialise(&dir, &VolumePlan::Files(vec![secret.clone()]), Some(4321)).unwrap();
        let key = std::fs::metadata(dir.join("tls/key.pem")).unwrap();
        assert_eq!((key.gid(), key.mode() & 0o7777), (4321, 0o440));
        let sub = std::fs::metadata(dir.join("tls")).unwrap();
        assert_eq!(sub.gid(), 4321);
        assert_eq!(sub.mode() & 0o2000, 0o2000, "setgid directory");
        let before = key.ino();
        materialise(&dir, &VolumePlan::Files(vec![secret]), Some(4321)).unwrap();
        let again = std::fs::metadata(dir.join("tls/key.pem")).unwrap();
        assert_eq!(again.ino(), before, "an unchanged file is not rewritten");
        let e = materialise(&tmp.path().join("e"), &VolumePlan::EmptyDir, Some(4321)).unwrap();
        let e = std::fs::metadata(e).unwrap();
        assert_eq!((e.gid(), e.mode() & 0o7777), (4321, 0o2777));
    }

    #[test]
    fn mounts_resolve_sub_paths_and_sort_parents_first() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("cfg");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(cfg.join("config.yaml"), "x").unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let dirs = HashMap::from([
            ("cfg".to_string(), cfg.clone()),
            ("data".to_string(), data.clone()),
        ]);
        let c: Container = serde_json::from_value(json!({"name": "c", "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/app/config.yaml", "subPath": "config.yaml", "readOnly": true},
            {"name": "data", "mountPath": "/var/data"},
            {"name": "data", "mountPath": "/var/data/$(POD)", "subPathExpr": "$(POD)"},
            {"name": "cfg", "mountPath": "/etc"}
        ]}))
        .unwrap();
        let mut env = Env::default();
        env.set("POD", "p1".into());
        let mounts = container_mounts(&c, &dirs, &env).unwrap();
        let targets: Vec<_> = mounts.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(
            targets,
            [
                "/etc",
                "/var/data",
                "/etc/app/config.yaml",
                "/var/data/$(POD)"
            ]
        );
        assert!(mounts[2].is_file && mounts[2].read_only);
        assert_eq!(mounts[2].source, cfg.join("config.yaml"));
        assert_eq!(mounts[3].source, data.join("p1"));
        assert!(
            data.join("p1").is_dir(),
            "missing subPath created as a directory"
        );
        let bad: Container = serde_json::from_value(
            json!({"name": "c", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}),
        )
        .unwrap();
        assert!(matches!(
            container_mounts(&bad, &dirs, &env),
            Err(VolumeError::VolumeNotFound { .. })
        ));
    }
}
