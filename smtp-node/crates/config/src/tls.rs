//! `tls`: the certificate and key the node serves for STARTTLS and implicit TLS.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::HumanDuration;

/// TLS certificate files (PEM). They are re-read when they change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often to check the files for changes.
    #[serde(default = "default_tls_reload_interval")]
    pub reload_interval: HumanDuration,
}

impl TlsConfig {
    /// These files, re-read at the default interval.
    pub fn new(cert_file: PathBuf, key_file: PathBuf) -> Self {
        Self {
            cert_file,
            key_file,
            reload_interval: default_tls_reload_interval(),
        }
    }

    pub(crate) fn validate(&self, errors: &mut Vec<String>) {
        if self.reload_interval.0.is_zero() {
            errors.push("tls.reloadInterval: must be greater than 0".to_owned());
        }
    }
}

fn default_tls_reload_interval() -> HumanDuration {
    HumanDuration::from_secs(5)
}
