//! The Service that exposes a domain's (or a pool's) nodes on the mail ports.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec as K8sServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;

use super::BuildError;
use crate::controller::mail_domain::names::selector_labels;
use crate::controller::mail_domain::validate::{ValidatedDomain, check_source_ranges};
use crate::crd::mail_domain::{ExternalTrafficPolicy, ServiceSpec, ServiceType};

/// The Service in front of the nodes: 25, 465 and 587 onto the container ports, and 443 onto
/// the MTA-STS policy listener when the domain publishes MTA-STS.
pub(super) fn service(v: &ValidatedDomain, metadata: ObjectMeta) -> Result<Service, BuildError> {
    node_service(
        selector_labels(&v.name),
        &v.service,
        v.mta_sts.is_some(),
        metadata,
    )
}

/// The Service of the nodes selected by `selector`, shaped by `spec`; `mta_sts`: also 443
/// onto the MTA-STS policy listener.
pub fn node_service(
    selector: BTreeMap<String, String>,
    spec: &ServiceSpec,
    mta_sts: bool,
    mut metadata: ObjectMeta,
) -> Result<Service, BuildError> {
    check_source_ranges(spec).map_err(BuildError::Service)?;
    if !spec.annotations.is_empty() {
        metadata.annotations = Some(spec.annotations.clone());
    }
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.to_owned()),
        port,
        protocol: Some("TCP".to_owned()),
        target_port: Some(IntOrString::String(name.to_owned())),
        ..Default::default()
    };
    // Local keeps the client address, which SPF checks and abuse limits depend on.
    let policy = match spec.external_traffic_policy {
        ExternalTrafficPolicy::Local => "Local",
        ExternalTrafficPolicy::Cluster => "Cluster",
    };
    let (type_, external_policy) = match spec.type_ {
        ServiceType::LoadBalancer => ("LoadBalancer", Some(policy.to_owned())),
        ServiceType::NodePort => ("NodePort", Some(policy.to_owned())),
        ServiceType::ClusterIP => ("ClusterIP", None),
    };
    // Load-balancer fields only on a LoadBalancer Service: Kubernetes refuses
    // loadBalancerClass on any other type.
    let load_balancer = spec.type_ == ServiceType::LoadBalancer;
    Ok(Service {
        metadata,
        spec: Some(K8sServiceSpec {
            type_: Some(type_.to_owned()),
            selector: Some(selector),
            external_traffic_policy: external_policy,
            load_balancer_class: spec.load_balancer_class.clone().filter(|_| load_balancer),
            load_balancer_source_ranges: (load_balancer
                && !spec.load_balancer_source_ranges.is_empty())
            .then(|| spec.load_balancer_source_ranges.clone()),
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
    })
}
