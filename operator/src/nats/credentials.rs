//! Minting of NATS user credentials: for a set of SMTP nodes (the domains they serve, with the
//! permissions of the queue contract, `kubemail_queue::permissions`) and for the operator's
//! own connection. Each user gets a fresh NKey; its JWT is signed by the account's signing key
//! and expires after a finite validity, renewed at half of it ([`renewal`]).

use kubemail_queue::{Permissions, QueueNames, node_permissions};
use nkeys::KeyPair;

use super::jwt::{self, Claims, JwtError, NO_LIMIT, Permission, UserNats};
use super::trust::AccountKeys;
use crate::timestamps::UnixSeconds;

/// Key of the credentials file in the nodes' Secret.
pub const CREDENTIALS_KEY: &str = "nats.creds";
/// Key of the CA certificate the nodes verify NATS with, in the same Secret.
pub const CA_KEY: &str = "ca.crt";

/// A freshly minted user.
#[derive(Clone)]
pub struct Minted {
    /// The credentials file (JWT and seed): secret.
    pub creds: String,
    /// The user's public key (`U...`), for logs.
    pub user: String,
    pub not_before: UnixSeconds,
    pub expires: UnixSeconds,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("user", &self.user)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// Credentials for the nodes that serve `domains`: the permissions of
/// [`kubemail_queue::node_permissions`], valid from `now` for `validity_seconds`.
pub fn node_credentials<S: AsRef<str>>(
    account: &AccountKeys,
    names: &QueueNames,
    domains: &[S],
    now: UnixSeconds,
    validity_seconds: i64,
) -> Result<Minted, JwtError> {
    let name = domains
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(",");
    mint(
        account,
        &format!("kubemail-nodes:{name}"),
        &node_permissions(names, domains),
        now,
        validity_seconds,
    )
}

/// Credentials for the operator's own connection (the JetStream API and its inbox).
pub fn operator_credentials(
    account: &AccountKeys,
    inbox: &str,
    now: UnixSeconds,
    validity_seconds: i64,
) -> Result<Minted, JwtError> {
    mint(
        account,
        "kubemail-operator",
        &kubemail_queue::permissions::operator_permissions(inbox),
        now,
        validity_seconds,
    )
}

/// Credentials of any user of the account with `permissions` (tests and tools).
pub fn mint_user(
    account: &AccountKeys,
    name: &str,
    permissions: &Permissions,
    now: UnixSeconds,
    validity_seconds: i64,
) -> Result<Minted, JwtError> {
    mint(account, name, permissions, now, validity_seconds)
}

fn mint(
    account: &AccountKeys,
    name: &str,
    permissions: &Permissions,
    now: UnixSeconds,
    validity_seconds: i64,
) -> Result<Minted, JwtError> {
    let user = KeyPair::new_user();
    let expires = now + validity_seconds.max(60);
    let token = jwt::encode(
        &account.signing_key,
        Claims {
            exp: Some(expires),
            jti: String::new(),
            iat: now,
            iss: String::new(),
            name: name.to_owned(),
            sub: user.public_key(),
            nats: UserNats {
                publish: Permission {
                    allow: permissions.publish.clone(),
                    deny: vec![],
                },
                subscribe: Permission {
                    allow: permissions.subscribe.clone(),
                    deny: vec![],
                },
                subs: NO_LIMIT,
                data: NO_LIMIT,
                payload: NO_LIMIT,
                allowed_connection_types: vec!["STANDARD".to_owned()],
                issuer_account: account.account.clone(),
                kind: "user".to_owned(),
                version: 2,
            },
        },
    )?;
    let seed = user.seed().map_err(JwtError::Sign)?;
    Ok(Minted {
        creds: kubemail_queue::credentials::render(&token, &seed),
        user: user.public_key(),
        not_before: now,
        expires,
    })
}

/// Why stored credentials must be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewReason {
    Missing,
    Unreadable,
    OtherAccount,
    PermissionsChanged,
    DueForRenewal,
}

impl RenewReason {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Missing => "no credentials yet",
            Self::Unreadable => "the stored credentials cannot be read",
            Self::OtherAccount => "the NATS account or its signing key changed",
            Self::PermissionsChanged => "the permissions changed (domains or queue names)",
            Self::DueForRenewal => "half of their lifetime has passed",
        }
    }
}

/// When stored credentials (valid `not_before`..`expires`) are renewed: at half of their
/// lifetime, leaving the other half for the Secret to reach the pods.
pub fn renew_after(not_before: UnixSeconds, expires: UnixSeconds) -> UnixSeconds {
    not_before + (expires - not_before) / 2
}

/// Whether the stored credentials file `stored` must be replaced by credentials of `account`
/// with `permissions`, and why; `None` with the time they are due otherwise. Pure.
pub fn renewal(
    stored: Option<&str>,
    account: &AccountKeys,
    permissions: &Permissions,
    now: UnixSeconds,
) -> Result<UnixSeconds, RenewReason> {
    let stored = stored.ok_or(RenewReason::Missing)?;
    let (token, _) =
        kubemail_queue::credentials::parse(stored).map_err(|_| RenewReason::Unreadable)?;
    let claims: Claims<UserNats> = jwt::decode(&token).map_err(|_| RenewReason::Unreadable)?;
    if claims.iss != account.signing_key.public_key()
        || claims.nats.issuer_account != account.account
    {
        return Err(RenewReason::OtherAccount);
    }
    if claims.nats.publish.allow != permissions.publish
        || claims.nats.subscribe.allow != permissions.subscribe
    {
        return Err(RenewReason::PermissionsChanged);
    }
    let expires = claims.exp.ok_or(RenewReason::Unreadable)?;
    let due = renew_after(claims.iat, expires);
    if now >= due {
        return Err(RenewReason::DueForRenewal);
    }
    Ok(due)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::nats::trust::Trust;

    #[test]
    fn credentials_are_renewed_at_half_life_and_on_any_change() {
        let keys = Trust::generate().account_keys().unwrap();
        let names = QueueNames::default();
        let t0 = 1_700_000_000;
        let day = 86_400;
        let minted = node_credentials(&keys, &names, &["example.com"], t0, 7 * day).unwrap();
        assert_eq!(minted.expires, t0 + 7 * day);
        let perms = node_permissions(&names, &["example.com"]);
        let due = renewal(Some(&minted.creds), &keys, &perms, t0 + day).unwrap();
        assert_eq!(due, t0 + 7 * day / 2);
        assert_eq!(
            renewal(Some(&minted.creds), &keys, &perms, due),
            Err(RenewReason::DueForRenewal)
        );
        let more = node_permissions(&names, &["example.com", "example.org"]);
        assert_eq!(
            renewal(Some(&minted.creds), &keys, &more, t0),
            Err(RenewReason::PermissionsChanged)
        );
        let other = Trust::generate().account_keys().unwrap();
        assert_eq!(
            renewal(Some(&minted.creds), &other, &perms, t0),
            Err(RenewReason::OtherAccount)
        );
        assert_eq!(renewal(None, &keys, &perms, t0), Err(RenewReason::Missing));
        assert_eq!(
            renewal(Some("garbage"), &keys, &perms, t0),
            Err(RenewReason::Unreadable)
        );
        let (_, seed) = kubemail_queue::credentials::parse(&minted.creds).unwrap();
        assert!(
            !format!("{minted:?}").contains(&seed),
            "no seed in debug output"
        );
    }
}
