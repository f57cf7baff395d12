//! Smarthost delivery: a domain's outbound mail goes through its `Relay` instead of the
//! recipients' MX hosts.
//!
//! The relay is trusted configuration, so its host name is resolved with the system resolver
//! (it may be a cluster-internal name) and its addresses are not subject to the MX address
//! policy. TLS is required by default (`startTlsRequired` or `implicit`) with a verified
//! certificate; credentials are read from their files at every connection (so a rotated
//! Secret takes effect without a restart) and are only sent inside TLS. A per-relay rate
//! limit (`messagesPerSecond`, a token bucket) keeps this node under the provider's quota.

use std::num::NonZeroU32;
use std::path::Path;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::client::{Credentials, TlsPolicy};
use super::mx::Target;
use crate::config::{RelayAuth, RelayConfig, RelayTls};

/// Why relay credentials could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read relay credentials file {path}: {source}")]
pub struct ReadCredentialsError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// A relay with its rate limiter.
pub struct Relay {
    pub config: RelayConfig,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl Relay {
    pub fn new(config: RelayConfig) -> Self {
        let limiter = config
            .messages_per_second
            .and_then(NonZeroU32::new)
            .map(|n| RateLimiter::direct(Quota::per_second(n)));
        Self { config, limiter }
    }

    /// Waits until the rate limit allows one more message.
    pub async fn wait_for_turn(&self) {
        if let Some(l) = &self.limiter {
            l.until_ready().await;
        }
    }

    /// The client's TLS policy for this relay.
    pub fn tls_policy(&self) -> TlsPolicy {
        match self.config.tls {
            RelayTls::StartTlsRequired => TlsPolicy::Required,
            RelayTls::Implicit => TlsPolicy::Implicit,
            RelayTls::Opportunistic => TlsPolicy::Opportunistic,
        }
    }

    /// The credentials, freshly read.
    pub fn credentials(&self) -> Result<Option<Credentials>, ReadCredentialsError> {
        self.config.auth.as_ref().map(read_credentials).transpose()
    }

    /// The relay's addresses (system resolver), in the order the resolver gave them.
    pub async fn targets(&self) -> std::io::Result<Vec<Target>> {
        resolve_configured(&self.config.host, self.config.port).await
    }
}

/// Resolves a configured host (relay or inbound target) with the system resolver.
pub async fn resolve_configured(host: &str, port: u16) -> std::io::Result<Vec<Target>> {
    let addrs = tokio::net::lookup_host((host, port)).await?;
    Ok(addrs
        .map(|addr| Target {
            host: host.to_owned(),
            addr,
        })
        .collect())
}

fn read_credentials(auth: &RelayAuth) -> Result<Credentials, ReadCredentialsError> {
    Ok(Credentials {
        username: read_secret(&auth.username_file)?,
        password: read_secret(&auth.password_file)?,
    })
}

/// A Secret file's content without a trailing newline (editors and `echo` add one).
fn read_secret(path: &Path) -> Result<String, ReadCredentialsError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
        .map_err(|source| ReadCredentialsError {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn relay(mps: Option<u32>, auth: Option<RelayAuth>) -> Relay {
        Relay::new(RelayConfig {
            name: "r".into(),
            host: "127.0.0.1".into(),
            port: 2525,
            tls: RelayTls::Implicit,
            verify_certificate: true,
            auth,
            messages_per_second: mps,
        })
    }

    #[tokio::test]
    async fn rate_limit_spaces_messages() {
        let r = relay(Some(10), None);
        let start = Instant::now();
        // The bucket holds 10; the 11th to 15th wait about 100 ms each.
        for _ in 0..15 {
            r.wait_for_turn().await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(r.tls_policy(), TlsPolicy::Implicit);
        assert_eq!(r.targets().await.unwrap()[0].addr.port(), 2525);
    }

    #[test]
    fn reads_credentials_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("username"), "user@example.test\n").unwrap();
        std::fs::write(dir.path().join("password"), "s3cret").unwrap();
        let r = relay(
            None,
            Some(RelayAuth {
                username_file: dir.path().join("username"),
                password_file: dir.path().join("password"),
            }),
        );
        let c = r.credentials().unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user@example.test", "s3cret")
        );
        assert!(relay(None, None).credentials().unwrap().is_none());
        let missing = relay(
            None,
            Some(RelayAuth {
                username_file: dir.path().join("nope"),
                password_file: dir.path().join("password"),
            }),
        );
        assert!(missing.credentials().is_err());
    }
}
