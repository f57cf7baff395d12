//! How the node connects to NATS: the options shared by every use of the connection (queue,
//! delivery, AUTH-failure counts), built from the `nats` section.
//!
//! * **Credentials** (`nats.credentialsFile`): read again at every (re)connection through the
//!   client's auth callback, not once at start. The operator rotates the file before the
//!   JWT expires; when the server ends the session at the old JWT's expiry, the reconnection
//!   presents the new one without a restart.
//! * **TLS** (`nats.caFile`, `nats.requireTls`): the server certificate is verified against the
//!   configured CA only, and a server that does not offer TLS is refused.
//! * **Reply inbox** (`nats.inboxPrefix`): JetStream answers on the client's inbox; the
//!   node's credentials may subscribe to its own prefix only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::NatsConfig;

/// Why the NATS options could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("cannot read NATS credentials file {path}")]
    ReadCredentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use NATS credentials file {path}")]
    ParseCredentials {
        path: PathBuf,
        #[source]
        source: CredentialsFileError,
    },
    #[error("cannot read the NATS CA file {path}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What is wrong with a credentials file's content (never its content itself).
#[derive(Debug, thiserror::Error)]
pub enum CredentialsFileError {
    #[error(transparent)]
    Format(#[from] kubemail_queue::credentials::CredentialsError),
    #[error("the NKey seed is not valid")]
    Seed,
    #[error("cannot sign the server's nonce")]
    Sign,
}

/// The connect options of `nats`, with `name` as the client name. Fails at once when the
/// credentials or CA file cannot be used, so a broken mount is a start-up error, not a silent
/// reconnect loop.
pub fn options(nats: &NatsConfig, name: &str) -> Result<async_nats::ConnectOptions, OptionsError> {
    let mut options = match &nats.credentials_file {
        Some(path) => {
            // Checked now; read again at every connection.
            load_credentials(path)?;
            let path = path.clone();
            async_nats::ConnectOptions::with_auth_callback(move |nonce| {
                let path = path.clone();
                async move {
                    let (jwt, key) = load_credentials(&path).map_err(async_nats::AuthError::new)?;
                    let signature = key
                        .sign(&nonce)
                        .map_err(|_| async_nats::AuthError::new(CredentialsFileError::Sign))?;
                    let mut auth = async_nats::Auth::new();
                    auth.jwt = Some(jwt);
                    auth.signature = Some(signature);
                    Ok(auth)
                }
            })
        }
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(ca) = &nats.ca_file {
        // async-nats reads the file only when it connects; a missing one must fail here.
        std::fs::metadata(ca).map_err(|source| OptionsError::ReadCa {
            path: ca.clone(),
            source,
        })?;
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if nats.require_tls {
        options = options.require_tls(true);
    }
    if let Some(prefix) = &nats.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    Ok(options
        .name(name)
        .connection_timeout(Duration::from_secs(5)))
}

/// The user JWT and key pair of a credentials file.
fn load_credentials(path: &Path) -> Result<(String, nkeys::KeyPair), OptionsError> {
    let text = std::fs::read_to_string(path).map_err(|source| OptionsError::ReadCredentials {
        path: path.to_owned(),
        source,
    })?;
    let parse_error = |source| OptionsError::ParseCredentials {
        path: path.to_owned(),
        source,
    };
    let (jwt, seed) = kubemail_queue::credentials::parse(&text)
        .map_err(|e| parse_error(CredentialsFileError::Format(e)))?;
    let key =
        nkeys::KeyPair::from_seed(&seed).map_err(|_| parse_error(CredentialsFileError::Seed))?;
    Ok((jwt, key))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chain(error: &dyn std::error::Error) -> String {
        let mut out = error.to_string();
        let mut source = error.source();
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }

    #[test]
    fn unusable_files_fail_at_start_without_showing_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("user.creds");
        std::fs::write(&creds, "-----BEGIN NATS USER JWT-----\nsecret-jwt\n").unwrap();
        let nats = NatsConfig {
            credentials_file: Some(creds.clone()),
            ..NatsConfig::default()
        };
        let error = chain(&options(&nats, "t").unwrap_err());
        assert!(error.contains("no user NKey seed"), "{error}");
        assert!(!error.contains("secret-jwt"), "{error}");

        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        std::fs::write(&creds, kubemail_queue::credentials::render("a.b.c", &seed)).unwrap();
        assert!(options(&nats, "t").is_ok());
        std::fs::write(
            &creds,
            kubemail_queue::credentials::render("a.b.c", "SUnot-a-seed"),
        )
        .unwrap();
        let error = chain(&options(&nats, "t").unwrap_err());
        assert!(error.contains("seed is not valid"), "{error}");

        let nats = NatsConfig {
            ca_file: Some(dir.path().join("missing.crt")),
            ..NatsConfig::default()
        };
        assert!(matches!(
            options(&nats, "t"),
            Err(OptionsError::ReadCa { .. })
        ));
    }
}
