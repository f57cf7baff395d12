//! `listeners`: the SMTP ports a node opens and what each is for.

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One SMTP listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name (used in logs and metrics), e.g. `mx`, `submission`, `submissions`.
    pub name: String,
    /// What the listener is for.
    pub kind: ListenerKind,
    /// Socket address to bind, e.g. `0.0.0.0:25` or `[::]:587`.
    pub address: SocketAddr,
    /// Expect a PROXY protocol v1 or v2 header on every connection and use the client address
    /// it carries for policy and logs. Only enable behind a load balancer that sends it.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// What to do with a bare CR or LF in commands and message data.
    #[serde(default)]
    pub bare_line_endings: BareLineEndings,
    /// Require STARTTLS before MAIL (and before AUTH). Default: true for `submission`, false for
    /// `mx`. Always satisfied on `implicitTls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_tls: Option<bool>,
}

/// The role of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ListenerKind {
    /// Port 25: inbound mail for local domains, no AUTH, STARTTLS offered.
    Mx,
    /// Port 587: authenticated submission after STARTTLS.
    Submission,
    /// Port 465: authenticated submission over implicit TLS (RFC 8314).
    ImplicitTls,
}

/// Handling of bare CR / bare LF (SMTP smuggling defence). In every mode only
/// `<CRLF>.<CRLF>` ends DATA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BareLineEndings {
    /// Refuse the command or the message with a 5xx; nothing of that transaction is queued.
    #[default]
    Reject,
    /// Accept and rewrite bare line endings to CRLF before queueing.
    Normalize,
}

impl ListenerConfig {
    /// Whether STARTTLS must precede MAIL and AUTH on this listener.
    pub fn requires_tls(&self) -> bool {
        match self.kind {
            ListenerKind::Mx => self.require_tls.unwrap_or(false),
            ListenerKind::Submission => self.require_tls.unwrap_or(true),
            ListenerKind::ImplicitTls => true,
        }
    }

    /// Whether clients must authenticate before MAIL (submission ports).
    pub fn requires_auth(&self) -> bool {
        self.kind != ListenerKind::Mx
    }
}
