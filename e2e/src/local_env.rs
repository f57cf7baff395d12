//! Where the local real cluster's components listen, as written by `e2e/local-cluster up` into
//! `.kubemail-local/env`. Values already in the process environment win, so `make test` (which
//! sources the file) and a developer's shell behave the same.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The workspace root (the directory holding `e2e/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Endpoints of the running local cluster.
#[derive(Debug, Clone)]
pub struct LocalEnv {
    pub kubeconfig: PathBuf,
    pub nats_url: String,
    pub mailpit_smtp: String,
    pub mailpit_api: String,
    pub otlp_endpoint: String,
    pub jaeger_api: String,
    vars: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalEnvError {
    #[error(
        "the local cluster is not up: {path} is missing and {var} is not set; run `e2e/local-cluster up` (or `make test`)"
    )]
    NotUp { path: PathBuf, var: &'static str },
}

impl LocalEnv {
    /// Reads the environment, falling back to `<root>/.kubemail-local/env`.
    pub fn load() -> Result<Self, LocalEnvError> {
        let path = workspace_root().join(".kubemail-local/env");
        let file = std::fs::read_to_string(&path).unwrap_or_default();
        let mut vars = parse_env_file(&file);
        for (k, v) in std::env::vars() {
            if vars.contains_key(&k) {
                vars.insert(k, v);
            }
        }
        let get = |var: &'static str| -> Result<String, LocalEnvError> {
            std::env::var(var)
                .ok()
                .or_else(|| vars.get(var).cloned())
                .ok_or_else(|| LocalEnvError::NotUp {
                    path: path.clone(),
                    var,
                })
        };
        Ok(Self {
            kubeconfig: PathBuf::from(get("KUBECONFIG")?),
            nats_url: get("NATS_URL")?,
            mailpit_smtp: get("MAILPIT_SMTP")?,
            mailpit_api: get("MAILPIT_API")?,
            otlp_endpoint: get("OTEL_EXPORTER_OTLP_ENDPOINT")?,
            jaeger_api: get("JAEGER_API")?,
            vars,
        })
    }

    /// A NATS client of the local cluster's NATS with the test user's credentials
    /// (`NATS_CREDS`, every permission) over TLS verified with `NATS_CA`, as far as the env
    /// file names them.
    pub async fn nats_connect(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let mut options = match self
            .var("NATS_CREDS")
            .or(std::env::var("NATS_CREDS").ok().as_deref())
        {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| {
                    async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::Io, e)
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(ca) = self.var("NATS_CA") {
            options = options
                .add_root_certificates(PathBuf::from(ca))
                .require_tls(true);
        }
        options
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(
                self.nats_url
                    .split(',')
                    .map(str::trim)
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            )
            .await
    }

    /// Any other variable of the env file (e.g. `KUBEMAIL_AGENT_STATE`).
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }
}

/// Parses `export K=V` / `K=V` lines; comments and blank lines are skipped.
fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_export_lines_and_skips_comments() {
        let vars = parse_env_file("# c\nexport NATS_URL=nats://127.0.0.1:4222\n\nA=\"b\"\n");
        assert_eq!(vars["NATS_URL"], "nats://127.0.0.1:4222");
        assert_eq!(vars["A"], "b");
        assert_eq!(vars.len(), 2);
    }
}
