//! The Service that exposes a domain's (or a pool's) nodes on the mail ports.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;

use crate::controller::mail_domain::names::selector_labels;
use crate::controller::mail_domain::validate::ValidatedDomain;
use crate::crd::mail_domain::ServiceType;

/// The Service in front of the nodes: 25, 465 and 587 onto the container ports, and 443 onto
/// the MTA-STS policy listener when the domain publishes MTA-STS.
pub(super) fn service(v: &ValidatedDomain, metadata: ObjectMeta) -> Service {
    node_service(
        selector_labels(&v.name),
        v.service_type,
        &v.service_annotations,
        v.mta_sts.is_some(),
        metadata,
    )
}

/// The Service of the nodes selected by `selector`; `mta_sts`: also 443 onto the MTA-STS
/// policy listener.
pub fn node_service(
    selector: BTreeMap<String, String>,
    service_type: ServiceType,
    annotations: &BTreeMap<String, String>,
    mta_sts: bool,
    mut metadata: ObjectMeta,
) -> Service {
    if !annotations.is_empty() {
        metadata.annotations = Some(annotations.clone());
    }
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.to_owned()),
        port,
        protocol: Some("TCP".to_owned()),
        target_port: Some(IntOrString::String(name.to_owned())),
        ..Default::default()
    };
    let (type_, external_policy) = match service_type {
        // Local keeps the client address, which SPF checks and abuse limits depend on.
        ServiceType::LoadBalancer => ("LoadBalancer", Some("Local".to_owned())),
        ServiceType::NodePort => ("NodePort", Some("Local".to_owned())),
        ServiceType::ClusterIP => ("ClusterIP", None),
    };
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(type_.to_owned()),
            selector: Some(selector),
            external_traffic_policy: external_policy,
            ports: Some({
                let mut ports = vec![
                    port("smtp", 25),
                    port("submissions", 465),
                    port("submission", 587),
                ];
                // The MTA-STS policy host `mta-sts.<domain>` points here (RFC 8461 3.3).
                if mta_sts {
                    ports.push(ServicePort {
                        name: Some("https".to_owned()),
                        port: 443,
                        protocol: Some("TCP".to_owned()),
                        target_port: Some(IntOrString::String("mta-sts".to_owned())),
                        ..Default::default()
                    });
                }
                ports
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
