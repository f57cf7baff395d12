//! `kubemail-operator nats-trust`: the NATS administrator's part for a NATS outside the chart,
//! done by kubemail itself (the local test cluster uses it; a production administrator may
//! use `nsc` instead, see the README).

use std::path::Path;
use std::time::Duration;

use super::trust::{ACCOUNT_KEY, RESOLVER_CONFIG_KEY, SIGNING_KEY_KEY, Trust, TrustError};

/// Why the trust files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot make the trust chain")]
    Trust(#[from] TrustError),
    #[error("cannot mint the admin user")]
    Mint(#[source] super::jwt::JwtError),
    #[error("cannot write {0}")]
    Write(String, #[source] std::io::Error),
}

/// Name of the admin user's credentials file.
pub const ADMIN_CREDS: &str = "admin.creds";

/// Writes a new trust chain into `dir` (see `Command::NatsTrust`); seeds and credentials are
/// readable by the owner only.
pub fn write_trust(dir: &Path, admin_validity: Duration) -> Result<(), ToolError> {
    use std::os::unix::fs::PermissionsExt as _;
    let now = crate::timestamps::now();
    let trust = Trust::generate();
    let data = trust.secret_data(now)?;
    let keys = trust.account_keys()?;
    let admin = super::credentials::mint_user(
        &keys,
        "kubemail-admin",
        &kubemail_queue::Permissions {
            publish: vec![">".to_owned()],
            subscribe: vec![">".to_owned()],
        },
        now,
        i64::try_from(admin_validity.as_secs()).unwrap_or(i64::MAX / 4),
    )
    .map_err(ToolError::Mint)?;
    std::fs::create_dir_all(dir).map_err(|e| ToolError::Write(dir.display().to_string(), e))?;
    let files = [
        (
            RESOLVER_CONFIG_KEY,
            data[RESOLVER_CONFIG_KEY].clone(),
            0o644,
        ),
        (ACCOUNT_KEY, data[ACCOUNT_KEY].clone(), 0o644),
        (SIGNING_KEY_KEY, data[SIGNING_KEY_KEY].clone(), 0o600),
        (ADMIN_CREDS, admin.creds, 0o600),
    ];
    for (name, text, mode) in files {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| ToolError::Write(path.display().to_string(), e))?;
    }
    Ok(())
}
