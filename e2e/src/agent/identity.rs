//! Who a container from an image runs as, decided the way the kubelet and containerd decide it:
//! the image's `User` (`uid`, `uid:gid`, `name` or `name:group`, names looked up in the image's
//! own `/etc/passwd` and `/etc/group`), overridden by `runAsUser`/`runAsGroup` (the container's
//! securityContext over the pod's); supplementary groups are the user's memberships in the
//! image's `/etc/group`, then the pod's `supplementalGroups` and `fsGroup`. `runAsNonRoot`
//! refuses uid 0 (and an image user it cannot see is numeric), `allowPrivilegeEscalation:
//! false` means no_new_privs. HOME is the user's home in the image, `/` without one.

use k8s_openapi::api::core::v1::{PodSecurityContext, SecurityContext};

/// Why a container cannot be given an identity; shown as `CreateContainerConfigError`, worded
/// like the kubelet's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("unable to find user {user}: no matching entries in passwd file")]
    UnknownUser { user: String },
    #[error("unable to find group {group}: no matching entries in group file")]
    UnknownGroup { group: String },
    #[error("container has runAsNonRoot and image will run as root")]
    RunsAsRoot,
    #[error(
        "container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root"
    )]
    NonNumericUser { user: String },
}

/// The credentials a container process gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, without duplicates, in the order the runtime adds them.
    pub groups: Vec<u32>,
    /// HOME when neither the image nor the pod sets it.
    pub home: String,
    pub no_new_privs: bool,
}

/// Resolves the identity of a container of `pod` with `container` security context, from an
/// image whose config says `image_user` and whose `/etc/passwd` and `/etc/group` read
/// `passwd` and `group`.
pub fn resolve(
    image_user: Option<&str>,
    passwd: &str,
    group: &str,
    pod: Option<&PodSecurityContext>,
    container: Option<&SecurityContext>,
) -> Result<Identity, IdentityError> {
    let users = parse_passwd(passwd);
    let groups = parse_group(group);
    let run_as_user = container
        .and_then(|c| c.run_as_user)
        .or_else(|| pod.and_then(|p| p.run_as_user));
    let run_as_group = container
        .and_then(|c| c.run_as_group)
        .or_else(|| pod.and_then(|p| p.run_as_group));
    let run_as_non_root = container
        .and_then(|c| c.run_as_non_root)
        .or_else(|| pod.and_then(|p| p.run_as_non_root))
        == Some(true);
    let image_user = image_user.unwrap_or_default().trim();

    let (uid, mut gid) = match run_as_user {
        Some(uid) => {
            let uid = id(uid);
            // containerd's WithUserID: the primary group of that uid in the image, else 0.
            let gid = users.iter().find(|u| u.uid == uid).map_or(0, |u| u.gid);
            (uid, gid)
        }
        None => image_ids(image_user, &users, &groups)?,
    };
    if let Some(g) = run_as_group {
        gid = id(g);
    }
    if run_as_non_root {
        if run_as_user.is_none() {
            let user_part = image_user.split(':').next().unwrap_or_default();
            if !user_part.is_empty() && user_part.parse::<u32>().is_err() {
                return Err(IdentityError::NonNumericUser {
                    user: image_user.to_string(),
                });
            }
        }
        if uid == 0 {
            return Err(IdentityError::RunsAsRoot);
        }
    }

    let entry = users.iter().find(|u| u.uid == uid);
    let mut supplementary: Vec<u32> = Vec::new();
    let mut add = |g: u32| {
        if !supplementary.contains(&g) {
            supplementary.push(g);
        }
    };
    if let Some(name) = entry.map(|e| e.name.as_str()) {
        for g in groups
            .iter()
            .filter(|g| g.members.iter().any(|m| m == name))
        {
            add(g.gid);
        }
    }
    let pod_groups = pod.and_then(|p| p.supplemental_groups.as_ref());
    for g in pod_groups.into_iter().flatten() {
        add(id(*g));
    }
    if let Some(fs_group) = pod.and_then(|p| p.fs_group) {
        add(id(fs_group));
    }
    Ok(Identity {
        uid,
        gid,
        groups: supplementary,
        home: entry
            .map(|e| e.home.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".to_string()),
        no_new_privs: container.and_then(|c| c.allow_privilege_escalation) == Some(false),
    })
}

/// uid and gid of an image's `User` string.
fn image_ids(
    user: &str,
    users: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<(u32, u32), IdentityError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => users.iter().find(|u| u.uid == uid),
        Err(_) => Some(users.iter().find(|u| u.name == user_part).ok_or_else(|| {
            IdentityError::UnknownUser {
                user: user_part.to_string(),
            }
        })?),
    };
    let uid = match user_part.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => entry.map_or(0, |e| e.uid),
    };
    let gid = match group_part {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| IdentityError::UnknownGroup {
                    group: g.to_string(),
                })?,
        },
        None => entry.map_or(0, |e| e.gid),
    };
    Ok((uid, gid))
}

/// Kubernetes ids are int64; anything outside u32 cannot be a Linux id.
fn id(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .unwrap_or(&"")
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                          nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n\
                          app:x:1000:1001::/srv/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nnonroot:x:65532:\napp:x:1001:\nextra:x:2000:app,other\n";

    fn pod_sc(v: serde_json::Value) -> PodSecurityContext {
        serde_json::from_value(v).unwrap()
    }

    fn sc(v: serde_json::Value) -> SecurityContext {
        serde_json::from_value(v).unwrap()
    }

    fn ids(r: Result<Identity, IdentityError>) -> (u32, u32, Vec<u32>, String) {
        let i = r.unwrap();
        (i.uid, i.gid, i.groups, i.home)
    }

    #[test]
    fn image_user_forms() {
        let r = |u: Option<&str>| ids(resolve(u, PASSWD, GROUP, None, None));
        assert_eq!(r(None), (0, 0, vec![], "/root".into()));
        assert_eq!(
            r(Some("65532:65532")),
            (65532, 65532, vec![], "/home/nonroot".into())
        );
        assert_eq!(r(Some("1000")), (1000, 1001, vec![2000], "/srv/app".into()));
        assert_eq!(r(Some("app")), (1000, 1001, vec![2000], "/srv/app".into()));
        assert_eq!(
            r(Some("app:extra")),
            (1000, 2000, vec![2000], "/srv/app".into())
        );
        assert_eq!(
            r(Some("4242")),
            (4242, 0, vec![], "/".into()),
            "unknown uid is fine"
        );
        assert_eq!(
            resolve(Some("ghost"), PASSWD, GROUP, None, None),
            Err(IdentityError::UnknownUser {
                user: "ghost".into()
            })
        );
        assert_eq!(
            resolve(Some("app:ghosts"), PASSWD, GROUP, None, None),
            Err(IdentityError::UnknownGroup {
                group: "ghosts".into()
            })
        );
    }

    #[test]
    fn security_context_overrides_container_over_pod() {
        let pod = pod_sc(
            json!({"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 4000,
            "supplementalGroups": [5000, 4000]}),
        );
        let got = ids(resolve(
            Some("65532:65532"),
            PASSWD,
            GROUP,
            Some(&pod),
            None,
        ));
        assert_eq!(got, (1000, 3000, vec![2000, 5000, 4000], "/srv/app".into()));
        let container = sc(json!({"runAsUser": 65532}));
        let got = ids(resolve(None, PASSWD, GROUP, Some(&pod), Some(&container)));
        assert_eq!(got.0, 65532);
        assert_eq!(got.1, 3000, "pod runAsGroup still applies");
        // runAsUser without runAsGroup: the uid's primary group in the image.
        let container = sc(json!({"runAsUser": 1000}));
        let got = ids(resolve(None, PASSWD, GROUP, None, Some(&container)));
        assert_eq!((got.0, got.1), (1000, 1001));
        let container = sc(json!({"allowPrivilegeEscalation": false}));
        assert!(
            resolve(None, PASSWD, GROUP, None, Some(&container))
                .unwrap()
                .no_new_privs
        );
    }

    #[test]
    fn run_as_non_root_is_enforced() {
        let non_root = pod_sc(json!({"runAsNonRoot": true}));
        assert_eq!(
            resolve(None, PASSWD, GROUP, Some(&non_root), None),
            Err(IdentityError::RunsAsRoot)
        );
        assert_eq!(
            resolve(Some("app"), PASSWD, GROUP, Some(&non_root), None),
            Err(IdentityError::NonNumericUser { user: "app".into() })
        );
        assert!(resolve(Some("65532:65532"), PASSWD, GROUP, Some(&non_root), None).is_ok());
        let explicit = pod_sc(json!({"runAsNonRoot": true, "runAsUser": 0}));
        assert_eq!(
            resolve(Some("65532"), PASSWD, GROUP, Some(&explicit), None),
            Err(IdentityError::RunsAsRoot)
        );
        // The container may lift the pod's requirement.
        let lifted = sc(json!({"runAsNonRoot": false}));
        assert!(resolve(None, PASSWD, GROUP, Some(&non_root), Some(&lifted)).is_ok());
    }
}
