//! The DNS records a domain needs, as a ConfigMap with the zone fragment (and the MTA-STS
//! policy file) and, when external-dns is installed, a `DNSEndpoint` it publishes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DynamicObject, ObjectMeta};
use serde_json::json;

use super::Observed;
use crate::controller::mail_domain::names::{self, MTA_STS_KEY, ZONE_KEY, dns_endpoint_resource};
use crate::controller::mail_domain::provision::Provisioned;
use crate::controller::mail_domain::validate::{RelayResolution, ValidatedDomain};
use crate::crd::mail_domain::DnsRecord;
use crate::dns_records::{self, DnsInputs};

/// The DNS children and the records they carry.
pub(super) struct DnsChildren {
    pub records: Vec<DnsRecord>,
    pub config: ConfigMap,
    pub endpoint: Option<DynamicObject>,
}

pub(super) fn dns(
    v: &ValidatedDomain,
    p: &Provisioned,
    observed: &Observed,
    serves_mta_sts: bool,
    meta: impl Fn(String) -> ObjectMeta,
) -> DnsChildren {
    let mta_sts = v.mta_sts.as_ref().filter(|_| serves_mta_sts);
    let relay_include = match &v.relay {
        RelayResolution::Resolved { spf_include, .. } => spf_include.as_deref(),
        _ => None,
    };
    let published = p.dkim.published();
    let records = dns_records::records(&DnsInputs {
        domain: &v.domain,
        hostname: &v.hostname,
        ttl: v.ttl,
        addresses: &observed.addresses,
        spf: &v.spf,
        relay_include,
        dkim_keys: &published,
        dmarc: &v.dmarc,
        mta_sts,
        tls_rpt: v.tls_rpt.as_deref(),
    });
    let mut data = BTreeMap::from([(
        ZONE_KEY.to_owned(),
        dns_records::zone_fragment(&v.domain, &format!("{}/{}", v.namespace, v.name), &records),
    )]);
    if let Some(sts) = mta_sts {
        data.insert(
            MTA_STS_KEY.to_owned(),
            dns_records::mta_sts_policy(sts, &v.hostname),
        );
    }
    let config = ConfigMap {
        metadata: meta(names::dns_config(&v.name)),
        data: Some(data),
        ..Default::default()
    };
    let endpoint = observed.external_dns.then(|| {
        let mut ep = DynamicObject::new(&names::dns_endpoint(&v.name), &dns_endpoint_resource())
            .within(&v.namespace);
        ep.metadata = meta(names::dns_endpoint(&v.name));
        ep.data = json!({ "spec": dns_records::dns_endpoints(&records) });
        ep
    });
    DnsChildren {
        records,
        config,
        endpoint,
    }
}
