//! The Service that exposes a domain's nodes on the mail ports.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;

use crate::controller::mail_domain::names::selector_labels;
use crate::controller::mail_domain::validate::ValidatedDomain;
use crate::crd::mail_domain::ServiceType;

/// The Service in front of the nodes: 25, 465 and 587 onto the container ports, and 443 onto
/// the MTA-STS policy listener when the domain publishes MTA-STS.
pub(super) fn service(v: &ValidatedDomain, mut metadata: ObjectMeta) -> Service {
    if !v.service_annotations.is_empty() {
        metadata.annotations = Some(v.service_annotations.clone());
    }
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.to_owned()),
        port,
        protocol: Some("TCP".to_owned()),
        target_port: Some(IntOrString::String(name.to_owned())),
        ..Default::default()
    };
    let (type_, external_policy) = match v.service_type {
        // Local keeps the client address, which SPF checks and abuse limits depend on.
        ServiceType::LoadBalancer => ("LoadBalancer", Some("Local".to_owned())),
        ServiceType::NodePort => ("NodePort", Some("Local".to_owned())),
        ServiceType::ClusterIP => ("ClusterIP", None),
    };
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(type_.to_owned()),
            selector: Some(selector_labels(&v.name)),
            external_traffic_policy: external_policy,
            ports: Some({
                let mut ports = vec![
                    port("smtp", 25),
                    port("submissions", 465),
                    port("submission", 587),
                ];
                // The MTA-STS policy host `mta-sts.<domain>` points here (RFC 8461 3.3).
                if v.mta_sts.is_some() {
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
