//! Errors that say what to do. [`explain`] renders an error's chain (`a: b: c`, with the API
//! server's answers shortened to their message) and, when it recognises a cause that people
//! meet on first contact, appends the fix, naming the flag, namespace or Secret involved:
//!
//! * the operator's namespace does not exist (its Lease and CA Secret live there);
//! * the API server refuses a request (RBAC): which verb on which resource, in which namespace;
//! * the API server is unreachable or refuses the credentials;
//! * NATS is unreachable, refuses the operator's credentials, or its TLS fails;
//! * there is no client configuration at all (outside a cluster without a kubeconfig).

use std::error::Error as StdError;

use async_nats::ConnectErrorKind;
use kube::core::Status;

/// What the fixes name: the operator's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    /// The operator's own namespace (`--namespace` / `POD_NAMESPACE`).
    pub operator_namespace: String,
    /// `--nats-url` / `NATS_URL`.
    pub nats_url: String,
    /// `--nats-account-secret`, when set.
    pub nats_account_secret: Option<String>,
    /// `--nats-account-dir`, when set.
    pub nats_account_dir: Option<String>,
    /// `--ca-secret`: the operator CA (also the bundled NATS' CA).
    pub ca_secret: String,
}

impl Hints {
    /// The hints of the controllers' settings.
    pub fn from_config(config: &crate::controller::Config) -> Self {
        Self {
            operator_namespace: config.operator_namespace.clone(),
            nats_url: config.nats.url.clone(),
            nats_account_secret: config.nats.account_secret.clone(),
            nats_account_dir: config
                .nats
                .account_dir
                .as_ref()
                .map(|d| d.display().to_string()),
            ca_secret: config.ca_secret_name.clone(),
        }
    }
}

/// `error` with its causes and, when one is recognised, what to do about it.
pub fn explain(error: &(dyn StdError + 'static), hints: &Hints) -> String {
    let mut out = String::new();
    let mut fix = None;
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = cause {
        if !out.is_empty() {
            out.push_str(": ");
        }
        match e.downcast_ref::<kube::Error>() {
            // The API server's own message, without the Debug dump of its Status.
            Some(kube::Error::Api(status)) => {
                out.push_str(&status_text(status));
                fix = fix.or_else(|| api_fix(status, hints));
                // Its source is the Status again.
                break;
            }
            Some(other) => {
                out.push_str(&other.to_string());
                fix = fix.or_else(|| client_fix(other));
            }
            None => {
                out.push_str(&e.to_string());
                if let Some(connect) = e.downcast_ref::<async_nats::ConnectError>() {
                    fix = fix.or_else(|| Some(nats_fix(connect.kind(), hints)));
                } else if e.is::<kube::config::InferConfigError>() {
                    fix = fix.or_else(|| {
                        Some("no Kubernetes client configuration: run the operator in a cluster (the chart), or point --kubeconfig / KUBECONFIG at a kubeconfig file".to_owned())
                    });
                }
            }
        }
        cause = e.source();
    }
    match fix {
        Some(fix) => format!("{out}; {fix}"),
        None => out,
    }
}

/// `message (Reason, code)`.
fn status_text(status: &Status) -> String {
    let message = if status.message.is_empty() {
        "the API server refused the request"
    } else {
        status.message.as_str()
    };
    if status.reason.is_empty() {
        format!("{message} (HTTP {})", status.code)
    } else {
        format!("{message} ({}, HTTP {})", status.reason, status.code)
    }
}

fn api_fix(status: &Status, hints: &Hints) -> Option<String> {
    let details = status.details.as_ref();
    match status.code {
        404 if details.is_some_and(|d| d.kind == "namespaces") => {
            let ns = details.map(|d| d.name.as_str()).unwrap_or_default();
            let mut fix = format!(
                "namespace {ns} does not exist: create it (kubectl create namespace {ns})"
            );
            if ns == hints.operator_namespace || hints.operator_namespace.is_empty() {
                fix.push_str(
                    ", or set --namespace / POD_NAMESPACE to the namespace the operator runs in (its leader Lease and CA Secret live there; the chart sets it)",
                );
            }
            Some(fix)
        }
        403 => {
            let denied = Denied::parse(&status.message);
            Some(match denied {
                Some(d) => format!(
                    "{} may not {} {} in {}: grant it with a Role (or ClusterRole) bound to that identity; the chart's RBAC does, so outside the chart use a kubeconfig whose user may",
                    d.user,
                    d.verb,
                    d.resource,
                    d.namespace
                        .map_or_else(|| "the cluster".to_owned(), |ns| format!("namespace {ns}")),
                ),
                None => "the operator's identity lacks the permission: grant it with a Role (or ClusterRole); the chart's RBAC does".to_owned(),
            })
        }
        401 => Some("the API server does not accept the operator's credentials: check the kubeconfig (--kubeconfig / KUBECONFIG) or the service account token".to_owned()),
        _ => None,
    }
}

fn client_fix(error: &kube::Error) -> Option<String> {
    match error {
        kube::Error::HyperError(_) | kube::Error::Service(_) => Some(
            "the Kubernetes API server is unreachable: check the server address in the kubeconfig (--kubeconfig / KUBECONFIG) and that it runs".to_owned(),
        ),
        kube::Error::Auth(_) => Some(
            "cannot authenticate to the API server: check the credentials in the kubeconfig (--kubeconfig / KUBECONFIG)".to_owned(),
        ),
        _ => None,
    }
}

fn nats_fix(kind: ConnectErrorKind, hints: &Hints) -> String {
    let url = if hints.nats_url.is_empty() {
        "NATS".to_owned()
    } else {
        format!("NATS at {}", hints.nats_url)
    };
    match kind {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            match (&hints.nats_account_secret, &hints.nats_account_dir) {
                (Some(secret), _) => format!(
                    "{url} refuses the operator's credentials: the account keys in Secret {}/{secret} (--nats-account-secret) must be those of an account nats-server trusts (its resolver configuration)",
                    hints.operator_namespace
                ),
                (None, Some(dir)) => format!(
                    "{url} refuses the operator's credentials: the account keys in {dir} (--nats-account-dir) must be those of an account nats-server trusts (its resolver configuration)"
                ),
                (None, None) => format!(
                    "{url} requires authentication: give the operator its account with --nats-account-secret (a Secret in {}) or --nats-account-dir",
                    hints.operator_namespace
                ),
            }
        }
        ConnectErrorKind::Tls => format!(
            "TLS to {url} failed: the server certificate must be signed by the CA of --nats-ca-file (or, with the bundled NATS, the operator CA in Secret {}/{}) and name the host of the URL",
            hints.operator_namespace, hints.ca_secret
        ),
        ConnectErrorKind::ServerParse => {
            "the NATS URL cannot be parsed: set --nats-url / NATS_URL to nats://host:port (comma separated for several)".to_owned()
        }
        _ => format!(
            "{url} is unreachable: check --nats-url / NATS_URL and that nats-server runs and accepts connections from the operator"
        ),
    }
}

/// The parts of an RBAC refusal: `secrets "x" is forbidden: User "u" cannot get resource
/// "secrets" in API group "" in the namespace "ns"`.
struct Denied<'a> {
    user: String,
    verb: &'a str,
    resource: String,
    namespace: Option<&'a str>,
}

impl<'a> Denied<'a> {
    fn parse(message: &'a str) -> Option<Self> {
        let (_, rest) = message.split_once("is forbidden: ")?;
        let (user, rest) = rest.split_once(" cannot ")?;
        let (verb, rest) = rest.split_once(' ')?;
        let resource = quoted_after(rest, "resource ")?;
        let group = quoted_after(rest, "API group ").unwrap_or_default();
        let namespace = quoted_after(rest, "namespace ");
        Some(Self {
            user: user
                .trim_start_matches("User ")
                .trim_matches('"')
                .to_owned(),
            verb,
            resource: if group.is_empty() {
                resource.to_owned()
            } else {
                format!("{resource}.{group}")
            },
            namespace,
        })
    }
}

/// The text between the quotes after `label`.
fn quoted_after<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let start = text.find(&format!("{label}\""))? + label.len() + 1;
    let end = text[start..].find('"')?;
    Some(&text[start..start + end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::Error;
    use crate::leader::LeaseError;

    /// What kube-apiserver answers to creating a Lease in a namespace that does not exist.
    const NAMESPACE_NOT_FOUND: &str = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"namespaces \"kubemail-system\" not found","reason":"NotFound","details":{"name":"kubemail-system","kind":"namespaces"},"code":404}"#;
    /// What kube-apiserver answers to reading a Secret without RBAC for it.
    const SECRET_FORBIDDEN: &str = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"secrets \"kubemail-ca\" is forbidden: User \"system:serviceaccount:kubemail-system:kubemail-operator\" cannot get resource \"secrets\" in API group \"\" in the namespace \"kubemail-system\"","reason":"Forbidden","details":{"name":"kubemail-ca","kind":"secrets"},"code":403}"#;

    fn api_error(body: &str) -> kube::Error {
        kube::Error::Api(Box::new(serde_json::from_str::<Status>(body).unwrap()))
    }

    fn hints() -> Hints {
        Hints {
            operator_namespace: "kubemail-system".into(),
            nats_url: "nats://nats:4222".into(),
            nats_account_secret: Some("kubemail-nats-account".into()),
            nats_account_dir: None,
            ca_secret: "kubemail-ca".into(),
        }
    }

    #[test]
    fn a_missing_lease_namespace_names_the_namespace_and_the_flag() {
        let e = LeaseError::WriteLease("kubemail-operator".into(), api_error(NAMESPACE_NOT_FOUND));
        assert_eq!(
            explain(&e, &hints()),
            "cannot write Lease kubemail-operator: namespaces \"kubemail-system\" not found (NotFound, HTTP 404); \
             namespace kubemail-system does not exist: create it (kubectl create namespace kubemail-system), \
             or set --namespace / POD_NAMESPACE to the namespace the operator runs in (its leader Lease and CA Secret live there; the chart sets it)"
        );
    }

    #[test]
    fn an_unreadable_ca_secret_names_the_verb_resource_and_namespace_to_grant() {
        let e = Error::ReadObject {
            kind: "Secret",
            name: "kubemail-system/kubemail-ca".into(),
            source: api_error(SECRET_FORBIDDEN),
        };
        let text = explain(&e, &hints());
        assert!(
            text.starts_with("cannot read Secret kubemail-system/kubemail-ca: secrets \"kubemail-ca\" is forbidden:"),
            "{text}"
        );
        assert!(
            text.ends_with("; system:serviceaccount:kubemail-system:kubemail-operator may not get secrets in namespace kubemail-system: grant it with a Role (or ClusterRole) bound to that identity; the chart's RBAC does, so outside the chart use a kubeconfig whose user may"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn unreachable_nats_names_the_url_and_the_flag() {
        // A loopback port nobody listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("nats://127.0.0.1:{port}");
        let access = crate::nats::NatsAccess::plain(&url, std::time::Duration::from_secs(2));
        let e = Error::ManageNats(access.connect().await.unwrap_err());
        let hints = Hints {
            nats_url: url.clone(),
            ..hints()
        };
        let text = explain(&e, &hints);
        assert!(
            text.starts_with(&format!(
                "cannot set up the domain's JetStream objects: cannot connect to NATS at {url}: "
            )),
            "{text}"
        );
        assert!(
            text.ends_with(&format!("; NATS at {url} is unreachable: check --nats-url / NATS_URL and that nats-server runs and accepts connections from the operator")),
            "{text}"
        );
    }

    #[test]
    fn refused_nats_credentials_name_the_account_secret() {
        let text = nats_fix(ConnectErrorKind::AuthorizationViolation, &hints());
        assert_eq!(
            text,
            "NATS at nats://nats:4222 refuses the operator's credentials: the account keys in Secret kubemail-system/kubemail-nats-account (--nats-account-secret) must be those of an account nats-server trusts (its resolver configuration)"
        );
    }

    #[test]
    fn unknown_errors_are_the_chain_alone() {
        let e = Error::InvalidCa("kubemail-system/kubemail-ca".into());
        assert_eq!(explain(&e, &hints()), crate::controller::chain(&e));
    }
}
