//! Submission users: from the Secret a MailDomain names in `submission.usersSecretRef` (keys are
//! user names, values passwords or argon2/bcrypt hashes) to the node's users file
//! (`user@domain:hash` per line, the format `smtp-node` reads).
//!
//! The file's format, the hashing of plain passwords (argon2) and the check of a previous hash
//! come from [`kubemail_config::users_file`], which the node reads the file with, so both sides
//! agree. A hash is salted at random, so hashing again on every reconcile would change the
//! file each time, churn the config checksum and roll the pods for nothing: a password whose
//! previous hash still verifies keeps that hash. Verifying is slow on purpose
//! (argon2), so the rendered file is also cached in memory per source Secret version.
//! Nothing here logs a password or a hash.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kubemail_config::users_file::{self, HashScheme};
use sha2::{Digest, Sha256};

/// Key of the users file in the rendered Secret.
pub const USERS_FILE_KEY: &str = "users";

/// Key of the node's user-name hashing secret in the rendered Secret (`auth.usernameKeyFile`:
/// the per-user AUTH failure count in JetStream is kept under an HMAC of the name).
pub const USERNAME_KEY_KEY: &str = "username-key";

/// Random bytes in a new user-name key (hex-encoded in the Secret; the node needs >= 16).
const USERNAME_KEY_BYTES: usize = 32;

/// The user-name key kept in `previous` (the rendered Secret's value), or a new random one.
/// Kept across reconciles and operator restarts so the cluster-wide failure counts survive.
pub fn username_key(previous: Option<&str>) -> String {
    match previous.map(str::trim) {
        Some(k)
            if k.len() >= 2 * USERNAME_KEY_BYTES && k.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            k.to_owned()
        }
        _ => {
            let bytes: [u8; USERNAME_KEY_BYTES] = rand::random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}

/// Why the users could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("Secret {secret} key {key:?} is not a user name (use the local part, e.g. alice)")]
    InvalidUserName { secret: String, key: String },
    #[error("Secret {secret} key {key:?} holds no password (empty or not UTF-8)")]
    EmptyPassword { secret: String, key: String },
    #[error("cannot hash the password of {user}: {reason}")]
    HashPassword { user: String, reason: String },
}

/// A user's credential as found in the source Secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Already an argon2 PHC string or a bcrypt hash: used as is.
    Hash(String),
    /// A plain password: hashed by the operator.
    Password(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hash(_) => f.write_str("Hash(<redacted>)"),
            Self::Password(_) => f.write_str("Password(<redacted>)"),
        }
    }
}

/// The users of one domain, by full address (lower case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceUsers {
    pub users: BTreeMap<String, Credential>,
}

/// Reads the source Secret: each key is a user (local part), each value a password or hash.
pub fn parse_source(secret: &Secret, domain: &str) -> Result<SourceUsers, UsersError> {
    let name = secret.name_any();
    let mut users = BTreeMap::new();
    let data = secret.data.clone().unwrap_or_default();
    for (key, value) in data {
        let local = key.trim().to_ascii_lowercase();
        let valid = !local.is_empty()
            && local
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'));
        if !valid {
            return Err(UsersError::InvalidUserName { secret: name, key });
        }
        let text = String::from_utf8(value.0)
            .ok()
            .map(|t| t.trim_end_matches(['\r', '\n']).to_owned())
            .filter(|t| !t.is_empty());
        let Some(text) = text else {
            return Err(UsersError::EmptyPassword { secret: name, key });
        };
        let credential = if is_hash(&text) {
            Credential::Hash(text)
        } else {
            Credential::Password(text)
        };
        users.insert(format!("{local}@{domain}"), credential);
    }
    Ok(SourceUsers { users })
}

/// Renders the users file, reusing a previous hash while it still matches the password.
/// Blocking (argon2): run it on a blocking thread.
pub fn render(
    source: &SourceUsers,
    previous: Option<&str>,
    secret_name: &str,
) -> Result<String, UsersError> {
    let previous = previous.map(parse_users_file).unwrap_or_default();
    let mut out = format!(
        "# Submission users rendered by kubemail-operator from Secret {secret_name}; do not edit.\n"
    );
    for (user, credential) in &source.users {
        let hash = match credential {
            Credential::Hash(h) => h.clone(),
            Credential::Password(p) => match previous.get(user) {
                Some(old) if verifies(p, old) => old.clone(),
                _ => users_file::hash_password(p).map_err(|e| UsersError::HashPassword {
                    user: user.clone(),
                    reason: e.to_string(),
                })?,
            },
        };
        out.push_str(&users_file::format_line(user, &hash));
    }
    Ok(out)
}

/// Rendered users files by MailDomain, valid while the source Secret and the previously
/// rendered file are unchanged (so an unchanged Secret costs no argon2 work).
#[derive(Default)]
pub struct UsersCache {
    entries: Mutex<HashMap<String, (String, String)>>,
}

impl UsersCache {
    /// The cache key of a render: source uid and version plus a digest of the previous file.
    pub fn key(source: &Secret, previous: Option<&str>) -> String {
        let digest = Sha256::digest(previous.unwrap_or_default().as_bytes());
        format!(
            "{}/{}/{:x}",
            source.metadata.uid.as_deref().unwrap_or_default(),
            source
                .metadata
                .resource_version
                .as_deref()
                .unwrap_or_default(),
            digest
        )
    }

    pub fn get(&self, domain: &str, key: &str) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(domain)
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    pub fn put(&self, domain: &str, key: String, rendered: String) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(domain.to_owned(), (key, rendered));
    }

    pub fn forget(&self, domain: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(domain);
    }
}

fn is_hash(text: &str) -> bool {
    HashScheme::of(text).is_some()
}

/// Whether `hash`, from the previous file, is the operator's own hash of `password`. Only
/// argon2 hashes are the operator's: a bcrypt hash came from the Secret as it was.
fn verifies(password: &str, hash: &str) -> bool {
    HashScheme::of(hash) == Some(HashScheme::Argon2) && users_file::verify_password(password, hash)
}

/// The previous file's hashes by user; lines that do not parse are left out (the file is
/// rendered again from the Secret in any case).
fn parse_users_file(text: &str) -> BTreeMap<String, String> {
    users_file::entries(text)
        .filter_map(Result::ok)
        .map(|entry| (entry.user.to_owned(), entry.hash.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_username_key_is_kept_once_made_and_remade_when_unusable() {
        let first = username_key(None);
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(first, username_key(None), "random, not a constant");
        assert_eq!(username_key(Some(&first)), first);
        assert_eq!(username_key(Some(&format!("{first}\n"))), first);
        for bad in ["", "short", &"zz".repeat(32)] {
            let made = username_key(Some(bad));
            assert_ne!(made, bad);
            assert_eq!(made.len(), 64);
        }
    }
    use k8s_openapi::ByteString;

    use super::*;

    fn secret(entries: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("users".into()),
                ..Default::default()
            },
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn passwords_are_hashed_once_and_hashes_kept() {
        let bcrypt = "$2b$04$abcdefghijklmnopqrstuuJ1x6B9qS7bC6m1D4xT3g7bKq0F6e8a2";
        let src = parse_source(
            &secret(&[("Alice", "wonderland\n"), ("bob", bcrypt)]),
            "example.test",
        )
        .unwrap();
        assert_eq!(
            format!("{:?}", src.users["alice@example.test"]),
            "Password(<redacted>)"
        );
        let first = render(&src, None, "users").unwrap();
        let users = parse_users_file(&first);
        assert!(users["alice@example.test"].starts_with("$argon2id$"));
        assert!(verifies("wonderland", &users["alice@example.test"]));
        assert_eq!(users["bob@example.test"], bcrypt);
        assert!(!first.contains("wonderland"));

        let second = render(&src, Some(&first), "users").unwrap();
        assert_eq!(first, second, "an unchanged password keeps its hash");

        let changed = parse_source(
            &secret(&[("alice", "looking-glass"), ("bob", bcrypt)]),
            "example.test",
        )
        .unwrap();
        let third = render(&changed, Some(&first), "users").unwrap();
        assert_ne!(
            parse_users_file(&third)["alice@example.test"],
            users["alice@example.test"]
        );
    }

    #[test]
    fn bad_keys_and_empty_values_are_refused() {
        assert!(matches!(
            parse_source(&secret(&[("al ice", "x")]), "example.test"),
            Err(UsersError::InvalidUserName { .. })
        ));
        assert!(matches!(
            parse_source(&secret(&[("alice", "\n")]), "example.test"),
            Err(UsersError::EmptyPassword { .. })
        ));
    }
}
