//! The trust chain of NATS' decentralized authentication, as kubemail uses it:
//!
//! ```text
//! operator key ──signs──► system account JWT      (the server's own account)
//!              └─signs──► kubemail account JWT    (JetStream enabled in its limits,
//!                                                  one signing key)
//! account signing key ──signs──► user JWTs         (one per set of nodes, and the operator's)
//! ```
//!
//! kubemail itself needs only the account's public key and its signing key
//! ([`AccountKeys`], Secret keys [`ACCOUNT_KEY`] and [`SIGNING_KEY_KEY`]): with them it mints
//! every user. With the bundled NATS the operator makes the whole chain once ([`Trust`]) and
//! writes the server's part of it, [`RESOLVER_CONFIG_KEY`] (`operator`, `system_account`,
//! `resolver: MEMORY` and `resolver_preload`), which the NATS pods include. With an external
//! NATS its administrator makes the chain (`nsc`) and gives kubemail the two keys.
//!
//! Why `resolver: MEMORY`: two accounts that never change need no account server, no
//! resolver storage and no system-account push, and the servers need nothing but the file.
//! The price is revocation: a user JWT cannot be revoked without a new account JWT and a
//! server restart. kubemail's user JWTs are short-lived instead (days, renewed at half), so
//! a deleted domain's credentials stop working when they expire.

use std::collections::BTreeMap;

use nkeys::KeyPair;

use super::jwt::{self, AccountLimits, AccountNats, Claims, JwtError, NO_LIMIT, OperatorNats};
use crate::timestamps::UnixSeconds;

/// Secret key holding the kubemail account's public key (`A...`).
pub const ACCOUNT_KEY: &str = "account.pub";
/// Secret key holding the seed of the account's signing key (`SA...`).
pub const SIGNING_KEY_KEY: &str = "signing-key.nk";
/// Secret key holding the server configuration fragment (bundled NATS).
pub const RESOLVER_CONFIG_KEY: &str = "resolver.conf";
const OPERATOR_SEED_KEY: &str = "operator.nk";
const SYSTEM_SEED_KEY: &str = "system-account.nk";
const ACCOUNT_SEED_KEY: &str = "account.nk";

/// Why the trust material cannot be made or read (never showing a seed).
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("the NATS account Secret has no {0}")]
    MissingKey(&'static str),
    #[error("{0} in the NATS account Secret is not a valid key of its kind")]
    InvalidKey(&'static str),
    #[error("cannot sign an account or operator JWT")]
    Sign(#[source] JwtError),
}

/// What kubemail needs to mint users: the account and its signing key.
#[derive(Clone)]
pub struct AccountKeys {
    /// The account's public key (`A...`).
    pub account: String,
    pub signing_key: std::sync::Arc<KeyPair>,
}

impl std::fmt::Debug for AccountKeys {
    // The signing key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountKeys")
            .field("account", &self.account)
            .field("signing_key", &self.signing_key.public_key())
            .finish()
    }
}

impl AccountKeys {
    /// Reads the two keys from a Secret's data.
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, TrustError> {
        let text = |key: &'static str| {
            data.get(key)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .ok_or(TrustError::MissingKey(key))
        };
        let account = text(ACCOUNT_KEY)?;
        match KeyPair::from_public_key(&account) {
            Ok(k) if k.key_pair_type() == nkeys::KeyPairType::Account => {}
            _ => return Err(TrustError::InvalidKey(ACCOUNT_KEY)),
        }
        let signing_key = KeyPair::from_seed(&text(SIGNING_KEY_KEY)?)
            .ok()
            .filter(|k| k.key_pair_type() == nkeys::KeyPairType::Account)
            .ok_or(TrustError::InvalidKey(SIGNING_KEY_KEY))?;
        Ok(Self {
            account,
            signing_key: std::sync::Arc::new(signing_key),
        })
    }
}

/// The whole chain, made by the operator for the bundled NATS.
pub struct Trust {
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
    signing: KeyPair,
}

impl Trust {
    /// New keys for every level.
    pub fn generate() -> Self {
        Self {
            operator: KeyPair::new_operator(),
            system: KeyPair::new_account(),
            account: KeyPair::new_account(),
            signing: KeyPair::new_account(),
        }
    }

    /// The public keys kubemail mints with.
    pub fn account_keys(&self) -> Result<AccountKeys, TrustError> {
        let seed = self
            .signing
            .seed()
            .map_err(|_| TrustError::InvalidKey(SIGNING_KEY_KEY))?;
        Ok(AccountKeys {
            account: self.account.public_key(),
            signing_key: std::sync::Arc::new(
                KeyPair::from_seed(&seed).map_err(|_| TrustError::InvalidKey(SIGNING_KEY_KEY))?,
            ),
        })
    }

    /// Every seed, the account keys and the server configuration, as Secret data.
    pub fn secret_data(&self, now: UnixSeconds) -> Result<BTreeMap<String, String>, TrustError> {
        let seed =
            |k: &KeyPair, name: &'static str| k.seed().map_err(|_| TrustError::InvalidKey(name));
        Ok(BTreeMap::from([
            (
                OPERATOR_SEED_KEY.to_owned(),
                seed(&self.operator, OPERATOR_SEED_KEY)?,
            ),
            (
                SYSTEM_SEED_KEY.to_owned(),
                seed(&self.system, SYSTEM_SEED_KEY)?,
            ),
            (
                ACCOUNT_SEED_KEY.to_owned(),
                seed(&self.account, ACCOUNT_SEED_KEY)?,
            ),
            (ACCOUNT_KEY.to_owned(), self.account.public_key()),
            (
                SIGNING_KEY_KEY.to_owned(),
                seed(&self.signing, SIGNING_KEY_KEY)?,
            ),
            (RESOLVER_CONFIG_KEY.to_owned(), self.resolver_config(now)?),
        ]))
    }

    /// Reads a chain written by [`Trust::secret_data`].
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, TrustError> {
        let seed = |key: &'static str| {
            let text = data
                .get(key)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::trim)
                .ok_or(TrustError::MissingKey(key))?;
            KeyPair::from_seed(text).map_err(|_| TrustError::InvalidKey(key))
        };
        Ok(Self {
            operator: seed(OPERATOR_SEED_KEY)?,
            system: seed(SYSTEM_SEED_KEY)?,
            account: seed(ACCOUNT_SEED_KEY)?,
            signing: seed(SIGNING_KEY_KEY)?,
        })
    }

    /// The nats-server configuration of this chain: include it from the server's config.
    pub fn resolver_config(&self, now: UnixSeconds) -> Result<String, TrustError> {
        let operator = jwt::encode(
            &self.operator,
            Claims {
                exp: None,
                jti: String::new(),
                iat: now,
                iss: String::new(),
                name: "kubemail".to_owned(),
                sub: self.operator.public_key(),
                nats: OperatorNats {
                    system_account: self.system.public_key(),
                    kind: "operator".to_owned(),
                    version: 2,
                },
            },
        )
        .map_err(TrustError::Sign)?;
        let account = |key: &KeyPair, name: &str, limits: AccountLimits, signing: Vec<String>| {
            jwt::encode(
                &self.operator,
                Claims {
                    exp: None,
                    jti: String::new(),
                    iat: now,
                    iss: String::new(),
                    name: name.to_owned(),
                    sub: key.public_key(),
                    nats: AccountNats {
                        limits,
                        signing_keys: signing,
                        kind: "account".to_owned(),
                        version: 2,
                    },
                },
            )
            .map_err(TrustError::Sign)
        };
        let system = account(&self.system, "SYS", AccountLimits::unlimited(), vec![])?;
        let kubemail = account(
            &self.account,
            "KUBEMAIL",
            AccountLimits::with_jetstream(NO_LIMIT, NO_LIMIT),
            vec![self.signing.public_key()],
        )?;
        Ok(format!(
            "# kubemail's NATS trust chain, written by kubemail-operator; do not edit.\n\
             operator: {operator}\n\
             system_account: {system_pub}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {system_pub}: {system}\n  {account_pub}: {kubemail}\n}}\n",
            system_pub = self.system.public_key(),
            account_pub = self.account.public_key(),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_survives_its_secret_and_the_account_keys_read_back() {
        let trust = Trust::generate();
        let data: BTreeMap<String, Vec<u8>> = trust
            .secret_data(1_700_000_000)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        let again = Trust::from_secret_data(&data).unwrap();
        assert_eq!(again.account.public_key(), trust.account.public_key());
        let keys = AccountKeys::from_secret_data(&data).unwrap();
        assert_eq!(keys.account, trust.account.public_key());
        assert_eq!(keys.signing_key.public_key(), trust.signing.public_key());
        let conf = std::str::from_utf8(&data[RESOLVER_CONFIG_KEY])
            .unwrap()
            .to_owned();
        assert!(conf.contains("resolver: MEMORY"));
        for seed in [
            OPERATOR_SEED_KEY,
            SYSTEM_SEED_KEY,
            ACCOUNT_SEED_KEY,
            SIGNING_KEY_KEY,
        ] {
            let seed = std::str::from_utf8(&data[seed]).unwrap();
            assert!(!conf.contains(seed), "no seed in the server's part");
            assert!(
                !format!("{keys:?}").contains(seed),
                "no seed in debug output"
            );
        }

        let mut broken = data.clone();
        broken.insert(SIGNING_KEY_KEY.to_owned(), b"SUnot-a-seed".to_vec());
        assert!(matches!(
            AccountKeys::from_secret_data(&broken),
            Err(TrustError::InvalidKey(SIGNING_KEY_KEY))
        ));
        broken.remove(ACCOUNT_KEY);
        assert!(matches!(
            AccountKeys::from_secret_data(&broken),
            Err(TrustError::MissingKey(ACCOUNT_KEY))
        ));
    }
}
