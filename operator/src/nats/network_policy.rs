//! The NetworkPolicy of a MailDomain's SMTP node pods, a child of the MailDomain like its
//! PodDisruptionBudget: node pods live in the tenants' namespaces, so only the operator, which
//! makes them there, can give each its policy. The chart's NATS policy admits these pods from
//! any namespace by their `app.kubernetes.io/name: kubemail-smtp-node` label.
//!
//! * ingress: the SMTP ports from anywhere; the admin port (metrics, probes are the kubelet's
//!   and need no rule) only from the configured scrapers;
//! * egress: DNS; NATS (its pods, or any address on its port when it is outside the cluster);
//!   SMTP to the world (the MX port, 465, 587) and the ports of the domain's inbound target
//!   and relay (and the trace collector's, when the nodes export traces). Nothing else.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kubemail_config::NodeConfig;

use super::settings::NetworkPolicySettings;

/// The label Kubernetes sets on every namespace with its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The policy of the pods `selector` selects, which run `node`.
pub fn node_policy(
    metadata: ObjectMeta,
    selector: BTreeMap<String, String>,
    node: &NodeConfig,
    settings: &NetworkPolicySettings,
    extra_egress_ports: &[u16],
) -> NetworkPolicy {
    let tcp = |port: u16| NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(port))),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    let udp = |port: u16| NetworkPolicyPort {
        protocol: Some("UDP".to_owned()),
        ..tcp(port)
    };
    let smtp_in: Vec<NetworkPolicyPort> = node
        .listeners
        .iter()
        .map(|l| tcp(l.address.port()))
        .collect();
    let mut ingress = vec![NetworkPolicyIngressRule {
        ports: Some(smtp_in),
        from: None,
    }];
    if !settings.metrics_from.is_empty() {
        ingress.push(NetworkPolicyIngressRule {
            ports: Some(vec![tcp(node.admin.address.port())]),
            from: Some(settings.metrics_from.clone()),
        });
    }

    let mut dns_ports: BTreeSet<u16> = BTreeSet::from([53]);
    dns_ports.extend(node.dns.nameservers.iter().map(std::net::SocketAddr::port));
    let mut out_ports: BTreeSet<u16> = BTreeSet::from([node.delivery.mx_port, 465, 587]);
    out_ports.extend(extra_egress_ports);
    for domain in &node.domains {
        out_ports.extend(domain.inbound.as_ref().map(|t| t.port));
        out_ports.extend(domain.relay.as_ref().map(|r| r.port));
    }
    let nats_peer = settings.nats_pods.as_ref().map(|(ns, labels)| {
        vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    NAMESPACE_NAME_LABEL.to_owned(),
                    ns.clone(),
                )])),
                ..Default::default()
            }),
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }]
    });
    let egress = vec![
        NetworkPolicyEgressRule {
            ports: Some(dns_ports.iter().flat_map(|p| [udp(*p), tcp(*p)]).collect()),
            to: None,
        },
        NetworkPolicyEgressRule {
            ports: Some(vec![tcp(settings.nats_port)]),
            to: nats_peer,
        },
        NetworkPolicyEgressRule {
            ports: Some(out_ports.into_iter().map(tcp).collect()),
            to: None,
        },
    ];
    NetworkPolicy {
        metadata,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    }
}
