//! kubemail operator: reconciles `MailDomain` and `Relay` custom resources into SMTP node
//! Deployments, certificates, DKIM keys and DNS records. The controllers arrive with the
//! operator issue; this crate exists so the workspace layout is fixed from the start.
