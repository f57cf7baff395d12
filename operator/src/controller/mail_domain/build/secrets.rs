//! The key material a domain's nodes mount: the DKIM Secret (keys and their schedule), the
//! TLS Secret from the operator's CA or a cert-manager `Certificate` that writes it, and the
//! rendered users file.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DynamicObject, ObjectMeta};
use serde_json::json;

use crate::certs::{CA_CERT_KEY, TLS_CERT_KEY, TLS_KEY_KEY};
use crate::controller::mail_domain::names::{
    self, SIGNING_ANNOTATION, certificate_resource, labels,
};
use crate::controller::mail_domain::provision::{Provisioned, TlsMaterial};
use crate::controller::mail_domain::validate::{TlsSource, ValidatedDomain};
use crate::crd::mail_domain::IssuerKind;
use crate::dkim::{self, STATE_ANNOTATION};
use crate::users::{USERNAME_KEY_KEY, USERS_FILE_KEY};

/// The DKIM Secret: every key's PEM, the rotation state and the selectors that sign now.
pub(super) fn dkim_secret(
    mut metadata: ObjectMeta,
    p: &Provisioned,
    state: String,
    signing: &[String],
) -> Secret {
    metadata.annotations = Some(BTreeMap::from([
        (STATE_ANNOTATION.to_owned(), state),
        (SIGNING_ANNOTATION.to_owned(), signing.join(",")),
    ]));
    Secret {
        metadata,
        type_: Some("Opaque".to_owned()),
        data: Some(
            p.dkim
                .keys
                .iter()
                .map(|k| {
                    (
                        dkim::secret_key(&k.record.selector),
                        ByteString(k.private_key.expose().as_bytes().to_vec()),
                    )
                })
                .collect(),
        ),
        ..Default::default()
    }
}

/// The TLS Secret (operator CA) or the cert-manager Certificate that writes it.
pub(super) fn tls(
    v: &ValidatedDomain,
    p: &Provisioned,
    meta: impl Fn(String) -> ObjectMeta,
) -> (Option<Secret>, Option<DynamicObject>) {
    match (&v.tls, &p.tls) {
        (
            TlsSource::OperatorCa,
            TlsMaterial::OperatorCa {
                leaf, ca_cert_pem, ..
            },
        ) => (
            Some(Secret {
                metadata: meta(names::tls_secret(&v.name)),
                type_: Some("kubernetes.io/tls".to_owned()),
                data: Some(BTreeMap::from([
                    (
                        TLS_CERT_KEY.to_owned(),
                        ByteString(leaf.cert_pem.clone().into_bytes()),
                    ),
                    (
                        TLS_KEY_KEY.to_owned(),
                        ByteString(leaf.key_pem.expose().as_bytes().to_vec()),
                    ),
                    (
                        CA_CERT_KEY.to_owned(),
                        ByteString(ca_cert_pem.clone().into_bytes()),
                    ),
                ])),
                ..Default::default()
            }),
            None,
        ),
        (TlsSource::CertManager(issuer), _) => {
            let mut cert =
                DynamicObject::new(&names::certificate(&v.name), &certificate_resource())
                    .within(&v.namespace);
            cert.metadata = meta(names::certificate(&v.name));
            cert.data = json!({
                "spec": {
                    "secretName": names::tls_secret(&v.name),
                    "commonName": v.hostname,
                    "dnsNames": v.certificate_names(),
                    "issuerRef": {
                        "name": issuer.name,
                        "kind": match issuer.kind {
                            IssuerKind::Issuer => "Issuer",
                            IssuerKind::ClusterIssuer => "ClusterIssuer",
                        },
                        "group": issuer.group,
                    },
                    "privateKey": { "algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always" },
                    "usages": ["digital signature", "server auth"],
                    "secretTemplate": { "labels": labels(&v.name) },
                }
            });
            (None, Some(cert))
        }
        // validate and provision agree on the source; a mismatch cannot happen.
        (TlsSource::OperatorCa, TlsMaterial::CertManager { .. }) => (None, None),
    }
}

/// The rendered users file and the user-name key, when the domain has submission users.
pub(super) fn users_secret(p: &Provisioned, metadata: ObjectMeta) -> Option<Secret> {
    let text = p.users_file.as_ref()?;
    let mut data = BTreeMap::from([(
        USERS_FILE_KEY.to_owned(),
        ByteString(text.clone().into_bytes()),
    )]);
    if let Some(key) = &p.username_key {
        data.insert(
            USERNAME_KEY_KEY.to_owned(),
            ByteString(key.clone().into_bytes()),
        );
    }
    Some(Secret {
        metadata,
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Default::default()
    })
}
