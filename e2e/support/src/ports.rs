//! Free loopback ports for test servers, chosen *below* the kernel's ephemeral port range.
//!
//! The usual trick (bind port 0, read the port, close, hand it to a child process) races with
//! every outgoing connection on the machine: `connect()` takes its local port from the same
//! ephemeral range, so between the close and the child's `bind()` a client socket of another
//! test (or of the child's own NATS connection) can take the port and the child fails with
//! `EADDRINUSE`. Ports below the ephemeral range are never handed out implicitly, so the only
//! users are other explicit binds: threads of one process share a counter, and processes start
//! at different offsets derived from their pid. A candidate is still checked by binding it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port handed out: above the fixed ports of the local cluster (NATS 4222, mailpit
/// 1025/8025, Knot 15353, OTLP 4317/4318, apiserver 16443, jaeger 16686, etcd 2379/2380,
/// controller-manager 10257), so a test never takes one of them.
const FIRST: u16 = 17_000;

/// Upper bound when `/proc` cannot be read: Linux's default ephemeral range starts at 32768.
const DEFAULT_EPHEMERAL_START: u16 = 32_768;

/// Ports reserved per process before the next process's offset: a test binary starts a few
/// hundred servers at most, and offsets of different processes rarely overlap.
const STRIDE: u32 = 512;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

/// The next candidate port of this process, cycling through `[FIRST, ephemeral start)`.
fn candidate(span: u32) -> u16 {
    let offset = (std::process::id().wrapping_mul(STRIDE)) % span;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let port = u32::from(FIRST) + (offset + n) % span;
    u16::try_from(port).unwrap_or(FIRST)
}

/// A port free on every address in `ips` (held by `bind` while chosen), or `None` when the
/// explicit range is exhausted or unusable.
fn held_on(ips: &[IpAddr], taken: &[u16]) -> Option<(u16, Vec<TcpListener>)> {
    let end = ephemeral_start();
    // A machine whose ephemeral range starts low leaves no explicit range: fall back to port 0.
    let span = u32::from(end.checked_sub(FIRST)?);
    if span < STRIDE {
        return None;
    }
    for _ in 0..span {
        let port = candidate(span);
        if taken.contains(&port) {
            continue;
        }
        let held: Result<Vec<_>, _> = ips
            .iter()
            .map(|ip| TcpListener::bind(SocketAddr::new(*ip, port)))
            .collect();
        if let Ok(held) = held {
            return Some((port, held));
        }
    }
    None
}

/// `N` distinct loopback ports that are free now; all are held together while being chosen.
///
/// # Panics
/// When no loopback port can be bound at all.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let ips = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for i in 0..N {
        ports[i] = match held_on(&ips, &ports[..i]) {
            Some((port, listeners)) => {
                held.push(listeners);
                port
            }
            None => {
                let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
                let port = l.local_addr().expect("local address").port();
                held.push(vec![l]);
                port
            }
        };
    }
    ports
}

/// One free loopback port.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// A port free on every one of `ips` (several fake hosts listening on one port).
///
/// # Panics
/// When no such port is found.
pub fn free_port_on(ips: &[IpAddr]) -> u16 {
    if let Some((port, _held)) = held_on(ips, &[]) {
        return port;
    }
    for _ in 0..50 {
        let port = free_port();
        let held: Result<Vec<_>, _> = ips
            .iter()
            .map(|ip| TcpListener::bind(SocketAddr::new(*ip, port)))
            .collect();
        if held.is_ok() {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_below_the_ephemeral_range() {
        let ports = free_ports::<64>();
        let mut sorted = ports.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 64, "duplicates in {ports:?}");
        let end = ephemeral_start();
        if end > FIRST + STRIDE as u16 {
            assert!(
                ports.iter().all(|p| (FIRST..end).contains(p)),
                "{ports:?} not in {FIRST}..{end}"
            );
        }
    }

    #[test]
    fn a_port_on_several_addresses() {
        let ips: Vec<IpAddr> = vec![
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        ];
        let port = free_port_on(&ips);
        for ip in ips {
            TcpListener::bind(SocketAddr::new(ip, port)).expect("free on every address");
        }
    }
}
