//! The Service that exposes a domain's (or a pool's) nodes on the mail ports.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;

use crate::controller::mail_domain::names::selector_labels;
use crate::controller::mail_domain::validate::ValidatedDomain;
use crate::crd::mail_domain::ServiceType;

/// The Service in front of the nodes: 25, 465 and 587 onto the container ports.
pub(super) fn service(v: &ValidatedDomain, metadata: ObjectMeta) -> Service {
    node_service(
        selector_labels(&v.name),
        v.service_type,
        &v.service_annotations,
        metadata,
    )
}

/// The Service of the nodes selected by `selector`.
pub fn node_service(
    selector: BTreeMap<String, String>,
    service_type: ServiceType,
    annotations: &BTreeMap<String, String>,
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
            ports: Some(vec![
                port("smtp", 25),
                port("submissions", 465),
                port("submission", 587),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
