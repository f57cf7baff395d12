//! The HTTPS listener that serves this node's own MTA-STS policies (RFC 8461 3.3):
//! `GET https://mta-sts.<domain>/.well-known/mta-sts.txt` answers `200 text/plain` with the
//! domain's `mtaStsPolicy` exactly as configured (the operator renders it and publishes its id
//! in the `_mta-sts` TXT record). The certificate is the node's own (`tls`, re-read when it
//! changes), which must name `mta-sts.<domain>`; a client asking (SNI) for any other name gets
//! no certificate, and a request whose `Host` is not the SNI name gets `404`, so one listener
//! serves several domains without mixing them up. Connections are bounded in number and time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The policy path (RFC 8461 3.3).
pub const POLICY_PATH: &str = "/.well-known/mta-sts.txt";
/// Longest a client may take for the handshake and its request.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; policy fetches are rare (senders cache for `max_age`).
const MAX_CONNECTIONS: usize = 256;

/// Policies by host name (`mta-sts.<domain>`, lower case).
pub type PolicyHosts = HashMap<String, String>;

/// The policy hosts of `domains` that have a policy.
pub fn policy_hosts(domains: &[crate::config::DomainConfig]) -> PolicyHosts {
    domains
        .iter()
        .filter_map(|d| {
            d.mta_sts_policy.as_ref().map(|p| {
                (
                    format!("mta-sts.{}", d.name.to_ascii_lowercase()),
                    p.clone(),
                )
            })
        })
        .collect()
}

/// Serves `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    hosts: Arc<PolicyHosts>,
    stop: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::debug!(%error, "MTA-STS listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let acceptor = acceptor.clone();
        let hosts = hosts.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let served =
                tokio::time::timeout(CONNECTION_TIMEOUT, connection(acceptor, tcp, peer, hosts))
                    .await;
            if served.is_err() {
                tracing::debug!(%peer, "MTA-STS client timed out");
            }
        });
    }
}

async fn connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    hosts: Arc<PolicyHosts>,
) {
    let tls = match acceptor.accept(tcp).await {
        Ok(t) => t,
        Err(error) => {
            tracing::debug!(%peer, %error, "MTA-STS TLS handshake failed");
            return;
        }
    };
    let sni = tls
        .get_ref()
        .1
        .server_name()
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let response = respond(&hosts, &sni, &req);
        async move { Ok::<_, Infallible>(response) }
    });
    if let Err(error) = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%peer, %error, "MTA-STS request failed");
    }
}

/// The answer to one request that arrived with SNI `sni`.
fn respond<B>(hosts: &PolicyHosts, sni: &str, req: &Request<B>) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(|h| {
            h.rsplit_once(':')
                .map_or(h, |(name, _)| name)
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let policy = hosts.get(&host).filter(|_| host == sni);
    let (status, body) = match policy {
        Some(policy) if req.uri().path() == POLICY_PATH && req.method() == hyper::Method::GET => {
            (StatusCode::OK, policy.clone())
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    tracing::debug!(%host, path = req.uri().path(), status = status.as_u16(), "MTA-STS request");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_policy_only_for_its_own_host_and_path() {
        let hosts = PolicyHosts::from([(
            "mta-sts.example.test".to_owned(),
            "version: STSv1\r\n".to_owned(),
        )]);
        let get = |host: &str, path: &str| {
            Request::builder()
                .uri(path)
                .header("host", host)
                .body(())
                .unwrap()
        };
        let ok = respond(
            &hosts,
            "mta-sts.example.test",
            &get("MTA-STS.example.test:443", POLICY_PATH),
        );
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()["content-type"], "text/plain; charset=utf-8");
        for (sni, host, path) in [
            ("mta-sts.example.test", "mta-sts.example.test", "/"),
            ("mta-sts.other.test", "mta-sts.example.test", POLICY_PATH),
            ("mta-sts.other.test", "mta-sts.other.test", POLICY_PATH),
        ] {
            assert_eq!(
                respond(&hosts, sni, &get(host, path)).status(),
                StatusCode::NOT_FOUND
            );
        }
    }
}
