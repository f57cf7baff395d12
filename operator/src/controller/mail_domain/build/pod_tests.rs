//! Tests of `spec.pod` and the load-balancer fields of `spec.service`: the Deployment and
//! Service a user gets, and the conditions for what Kubernetes or the node would refuse.

use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements, Service};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::tests::{FULL, config, md, observed, provisioned, refs};
use super::*;
use crate::controller::mail_domain::names::selector_labels;
use crate::controller::mail_domain::validate::validate;

const NOW: i64 = 1_800_000_000;

/// The children of [`FULL`] with `extra` (YAML lines of the spec) added.
fn children(extra: &str) -> Result<Children, BuildError> {
    let md = md(&format!("{FULL}{extra}"));
    let v = validate(&md, &refs()).unwrap();
    build(&md, &v, &provisioned(true), &observed(), &config(), NOW)
}

fn pod(c: &Children) -> &PodSpec {
    c.deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn resources(c: &Children) -> &ResourceRequirements {
    pod(c).containers[0].resources.as_ref().unwrap()
}

fn quantity(r: &Option<BTreeMap<String, Quantity>>, name: &str) -> String {
    r.as_ref().unwrap()[name].0.clone()
}

fn service_spec(s: &Service) -> &k8s_openapi::api::core::v1::ServiceSpec {
    s.spec.as_ref().unwrap()
}

#[test]
fn by_default_pods_spread_softly_over_hosts_and_zones_and_nothing_else_is_set() {
    let c = children("").unwrap();
    let pod = pod(&c);
    assert_eq!(pod.node_selector, None);
    assert_eq!(pod.tolerations, None);
    assert_eq!(pod.affinity, None);
    assert_eq!(pod.priority_class_name, None);
    assert_eq!(pod.image_pull_secrets, None);
    let spread = pod.topology_spread_constraints.as_ref().unwrap();
    let keys: Vec<&str> = spread.iter().map(|c| c.topology_key.as_str()).collect();
    assert_eq!(
        keys,
        ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    );
    for c in spread {
        assert_eq!(c.max_skew, 1);
        assert_eq!(c.when_unsatisfiable, "ScheduleAnyway");
        assert_eq!(
            c.label_selector.as_ref().unwrap().match_labels,
            Some(selector_labels("example-com")),
            "selects this domain's pods"
        );
    }
    let r = resources(&c);
    assert_eq!(quantity(&r.requests, "cpu"), "100m");
    assert_eq!(quantity(&r.requests, "memory"), "128Mi");
}

#[test]
fn an_explicit_pod_shape_reaches_the_pod_template() {
    let c = children(
        "  pod:
    nodeSelector: { pool: mail }
    tolerations: [{ key: dedicated, operator: Equal, value: mail, effect: NoSchedule }]
    affinity:
      nodeAffinity:
        requiredDuringSchedulingIgnoredDuringExecution:
          nodeSelectorTerms: [{ matchExpressions: [{ key: kubernetes.io/arch, operator: In, values: [amd64] }] }]
    priorityClassName: mail-critical
    imagePullSecrets: [{ name: registry }]
    topologySpreadConstraints:
      - { maxSkew: 2, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule }
      - { maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: { matchLabels: { app: other } } }
    resources:
      requests: { cpu: 500m }
      limits: { cpu: '2', memory: 2Gi }
",
    )
    .unwrap();
    let pod = pod(&c);
    assert_eq!(
        pod.node_selector,
        Some(BTreeMap::from([("pool".into(), "mail".into())]))
    );
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert_eq!(tolerations[0].key.as_deref(), Some("dedicated"));
    assert_eq!(tolerations[0].effect.as_deref(), Some("NoSchedule"));
    let terms = &pod
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms;
    assert_eq!(
        terms[0].match_expressions.as_ref().unwrap()[0].key,
        "kubernetes.io/arch"
    );
    assert_eq!(pod.priority_class_name.as_deref(), Some("mail-critical"));
    assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "registry");
    let spread = pod.topology_spread_constraints.as_ref().unwrap();
    assert_eq!(spread.len(), 2, "exactly the constraints given");
    assert_eq!(spread[0].max_skew, 2);
    assert_eq!(spread[0].when_unsatisfiable, "DoNotSchedule");
    assert_eq!(
        spread[0].label_selector.as_ref().unwrap().match_labels,
        Some(selector_labels("example-com")),
        "a constraint without a selector selects this domain's pods"
    );
    assert_eq!(
        spread[1].label_selector.as_ref().unwrap().match_labels,
        Some(BTreeMap::from([("app".into(), "other".into())])),
        "a selector given is kept"
    );
    let r = resources(&c);
    assert_eq!(quantity(&r.requests, "cpu"), "500m");
    assert_eq!(quantity(&r.requests, "memory"), "128Mi", "default kept");
    assert_eq!(quantity(&r.limits, "cpu"), "2");
    assert_eq!(quantity(&r.limits, "memory"), "2Gi");
}

#[test]
fn an_empty_spread_list_means_no_spread_constraints() {
    let c = children("  pod: { topologySpreadConstraints: [] }\n").unwrap();
    assert_eq!(pod(&c).topology_spread_constraints, None);
}

#[test]
fn resources_the_node_cannot_run_in_are_refused_with_a_reason() {
    // 10Mi messages: a budget of 256Mi, so the limit must be at least 512Mi.
    let low = children("  pod: { resources: { limits: { memory: 300Mi } } }\n").unwrap_err();
    assert_eq!(low.reason(), "InvalidPodResources");
    let message = low.to_string();
    assert!(message.contains("limits.memory (300Mi)"), "{message}");
    assert!(message.contains("512Mi"), "{message}");
    // Exactly the sum is enough, also written in another unit.
    let c = children("  pod: { resources: { limits: { memory: '536870912' } } }\n").unwrap();
    assert_eq!(quantity(&resources(&c).limits, "memory"), "536870912");

    let above = children(
        "  pod: { resources: { requests: { memory: 1Gi }, limits: { memory: 600Mi } } }\n",
    )
    .unwrap_err();
    assert_eq!(above.reason(), "InvalidPodResources");
    assert!(
        above.to_string().contains("requests.memory (1Gi)"),
        "{above}"
    );

    let garbage = children("  pod: { resources: { limits: { cpu: lots } } }\n").unwrap_err();
    assert_eq!(garbage.reason(), "InvalidPodResources");
    assert!(garbage.to_string().contains("\"lots\""), "{garbage}");

    // A CPU limit below the default request lowers the request, rather than failing.
    let c = children("  pod: { resources: { limits: { cpu: 50m } } }\n").unwrap();
    assert_eq!(quantity(&resources(&c).requests, "cpu"), "50m");
}

#[test]
fn load_balancer_class_source_ranges_and_traffic_policy_reach_the_service() {
    let c = children(
        "  service: { loadBalancerClass: service.k8s.aws/nlb, loadBalancerSourceRanges: [198.51.100.0/24, '2001:db8::/48'], externalTrafficPolicy: Cluster, proxyProtocol: { enabled: true, trustedCidrs: [10.0.0.0/8] } }\n",
    )
    .unwrap();
    let spec = service_spec(&c.service);
    assert_eq!(
        spec.load_balancer_class.as_deref(),
        Some("service.k8s.aws/nlb")
    );
    assert_eq!(
        spec.load_balancer_source_ranges,
        Some(vec![
            "198.51.100.0/24".to_owned(),
            "2001:db8::/48".to_owned()
        ])
    );
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));

    let plain = children("").unwrap();
    let spec = service_spec(&plain.service);
    assert_eq!(spec.load_balancer_class, None);
    assert_eq!(spec.load_balancer_source_ranges, None);
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));

    // Kubernetes refuses load-balancer fields on other Service types.
    let node_port = children(
        "  service: { type: NodePort, loadBalancerClass: x.example/lb, loadBalancerSourceRanges: [198.51.100.0/24] }\n",
    )
    .unwrap();
    let spec = service_spec(&node_port.service);
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.load_balancer_class, None);
    assert_eq!(spec.load_balancer_source_ranges, None);
}

#[test]
fn a_bad_source_range_is_a_condition_not_an_apply_error() {
    for (bad, needle) in [
        ("198.51.100.7", "the /prefix is missing"),
        ("198.51.100.0/33", "prefix length too long"),
        ("mail.example.net/24", "no valid IP address"),
        ("2001:db8::/x", "not a number"),
    ] {
        let md = md(&format!(
            "{FULL}  service: {{ loadBalancerSourceRanges: [10.0.0.0/8, '{bad}'] }}\n"
        ));
        let invalid = validate(&md, &refs()).unwrap_err();
        assert_eq!(invalid.reason, "InvalidLoadBalancerSourceRanges", "{bad}");
        assert!(
            invalid.message.contains("loadBalancerSourceRanges[1]")
                && invalid.message.contains(needle),
            "{bad}: {}",
            invalid.message
        );
    }
    // The same check guards the Service builder the pools use.
    let spec: crate::crd::mail_domain::ServiceSpec =
        serde_yaml::from_str("loadBalancerSourceRanges: [10.0.0.0/40]").unwrap();
    let err = node_service(BTreeMap::new(), &spec, false, ObjectMeta::default()).unwrap_err();
    assert_eq!(err.reason(), "InvalidLoadBalancerSourceRanges");
}

#[test]
fn a_pooled_domain_is_not_judged_by_pod_and_load_balancer_settings_it_does_not_use() {
    let md = md(&format!(
        "{FULL}  poolRef: {{ name: shared }}\n  service: {{ loadBalancerSourceRanges: [nonsense] }}\n  pod: {{ resources: {{ limits: {{ memory: 1Mi }} }} }}\n"
    ));
    let v = validate(&md, &refs()).unwrap();
    build(&md, &v, &provisioned(true), &observed(), &config(), NOW).unwrap();
}

#[test]
fn site_defaults_fill_what_the_resource_leaves_unset() {
    let cfg = BuildConfig {
        pod_defaults: serde_json::from_str(
            r#"{"priorityClassName":"mail-default","nodeSelector":{"pool":"default"},
                "topologySpreadConstraints":[{"maxSkew":3,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"DoNotSchedule"}],
                "resources":{"limits":{"cpu":"4"}}}"#,
        )
        .unwrap(),
        ..config()
    };
    let md = md(&format!(
        "{FULL}  pod: {{ nodeSelector: {{ pool: mail }}, topologySpreadConstraints: [] }}\n"
    ));
    let v = validate(&md, &refs()).unwrap();
    let c = build(&md, &v, &provisioned(true), &observed(), &cfg, NOW).unwrap();
    let spec = pod(&c);
    assert_eq!(spec.priority_class_name.as_deref(), Some("mail-default"));
    assert_eq!(
        spec.node_selector,
        Some(BTreeMap::from([("pool".into(), "mail".into())])),
        "the resource's own value wins"
    );
    assert_eq!(
        spec.topology_spread_constraints, None,
        "an explicit empty list wins over the default spread"
    );
    assert_eq!(quantity(&resources(&c).limits, "cpu"), "4");

    // Without a spread of its own, the site's spread, selecting this domain's pods.
    let md2 = super::tests::md(FULL);
    let v = validate(&md2, &refs()).unwrap();
    let c = build(&md2, &v, &provisioned(true), &observed(), &cfg, NOW).unwrap();
    let spread = pod(&c).topology_spread_constraints.clone().unwrap();
    assert_eq!(spread.len(), 1);
    assert_eq!(spread[0].max_skew, 3);
    assert_eq!(
        spread[0].label_selector.as_ref().unwrap().match_labels,
        Some(selector_labels("example-com"))
    );
}
