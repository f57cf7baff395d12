//! HAProxy PROXY protocol, versions 1 (text) and 2 (binary), as sent by load balancers in
//! front of the SMTP node so that it sees the real client address.
//!
//! Only the header parser lives here. Whether a header is required, and from which peers it
//! is trusted, is the listener's decision: the spec requires that a listener configured for
//! the protocol accept nothing else, and that only trusted proxies may use it (a spoofed
//! client address must not gain relay rights or escape rate limits).
//!
//! Limits: a v1 line is at most 107 octets including CRLF (spec §2.1); a v2 header is 16
//! octets plus at most [`MAX_V2_PAYLOAD`] octets of addresses and TLVs. TLVs are checked for
//! structure, and a CRC32C TLV, when present, is verified (spec §2.2.3); other TLVs are
//! ignored.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The outcome of a complete, valid PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// v2 LOCAL, v1 UNKNOWN, or an unspecified/unix family: use the socket's own peer address.
    Local,
    /// The original connection's endpoints.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
}

/// Why a PROXY header was refused; the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Not a valid header (the reason is for logs).
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(&'static str),
    /// Longer than the v1 line limit or our v2 payload limit.
    #[error("PROXY protocol header too long")]
    TooLong,
}

/// v1 line limit including CRLF: "PROXY UNKNOWN" + two full IPv6 addresses and ports (spec §2.1).
pub const MAX_V1_LINE: usize = 107;

/// v2 address + TLV octets we accept. Addresses take at most 216 octets (AF_UNIX); the TLVs
/// load balancers add (ALPN, authority up to 255, unique id up to 128, SSL info, cloud
/// vendor ids) fit easily in 4 KiB, which still bounds what an unauthenticated peer can make
/// us buffer before the greeting.
pub const MAX_V2_PAYLOAD: usize = 4096;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_HEADER: usize = 16;
const TLV_CRC32C: u8 = 0x03;

/// Parses a PROXY header at the start of `buf`.
///
/// `Ok(None)`: the bytes so far are a valid beginning, more are needed. `Ok(Some((header,
/// consumed)))`: the header occupies `buf[..consumed]`; what follows is SMTP. `Err`: close the
/// connection.
pub fn parse_proxy_header(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ProxyError::Invalid("no PROXY protocol signature")),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(ProxyError::Invalid("no PROXY protocol signature"));
    }
    let window = &buf[..buf.len().min(MAX_V1_LINE)];
    let Some(end) = memchr::memchr2(b'\r', b'\n', window) else {
        return if buf.len() >= MAX_V1_LINE {
            Err(ProxyError::TooLong)
        } else {
            Ok(None)
        };
    };
    // The spec: "The receiver must not tolerate a single CR or LF character to end the line".
    if buf[end] == b'\n' {
        return Err(ProxyError::Invalid("bare LF in v1 header"));
    }
    if end + 2 > MAX_V1_LINE {
        return Err(ProxyError::TooLong);
    }
    match buf.get(end + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyError::Invalid("bare CR in v1 header")),
    }
    let line =
        std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::Invalid("non-ASCII v1 header"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    let header = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => ProxyHeader::Local,
        ["PROXY", "TCP4", src, dst, sport, dport] => ProxyHeader::Proxied {
            source: SocketAddr::new(IpAddr::V4(v1_ip(src)?), v1_port(sport)?),
            destination: SocketAddr::new(IpAddr::V4(v1_ip(dst)?), v1_port(dport)?),
        },
        ["PROXY", "TCP6", src, dst, sport, dport] => ProxyHeader::Proxied {
            source: SocketAddr::new(IpAddr::V6(v1_ip(src)?), v1_port(sport)?),
            destination: SocketAddr::new(IpAddr::V6(v1_ip(dst)?), v1_port(dport)?),
        },
        ["PROXY", "TCP4" | "TCP6", ..] => {
            return Err(ProxyError::Invalid("wrong number of fields in v1 header"));
        }
        _ => return Err(ProxyError::Invalid("unknown protocol in v1 header")),
    };
    Ok(Some((header, end + 2)))
}

/// Rust's address parsers are as strict as the spec: exactly four decimal octets without
/// leading zeros for IPv4, and no zone ids for IPv6.
fn v1_ip<T: std::str::FromStr>(s: &str) -> Result<T, ProxyError> {
    s.parse()
        .map_err(|_| ProxyError::Invalid("bad address in v1 header"))
}

/// Decimal 0..=65535 without leading zeros (spec §2.1).
fn v1_port(s: &str) -> Result<u16, ProxyError> {
    let canonical = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    canonical
        .then(|| s.parse().ok())
        .flatten()
        .ok_or(ProxyError::Invalid("bad port in v1 header"))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyError::Invalid("no PROXY protocol signature"));
    }
    if buf.len() < V2_HEADER {
        return Ok(None);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(ProxyError::Invalid("unsupported v2 version"));
    }
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_V2_PAYLOAD {
        return Err(ProxyError::TooLong);
    }
    let total = V2_HEADER + len;
    let Some(header) = buf.get(..total) else {
        return Ok(None);
    };
    let payload = &header[V2_HEADER..];
    match command {
        // LOCAL: health checks etc.; the family and addresses are ignored (spec §2.2).
        0x0 => return Ok(Some((ProxyHeader::Local, total))),
        0x1 => {}
        _ => return Err(ProxyError::Invalid("unsupported v2 command")),
    }
    if family > 3 || transport > 2 {
        return Err(ProxyError::Invalid(
            "unsupported v2 address family or protocol",
        ));
    }
    if transport == 2 {
        return Err(ProxyError::Invalid("datagram connection in v2 header"));
    }
    let (proxied, tlvs) = match (family, transport) {
        // UNSPEC: "the receiver is free to accept the connection anyway and use the real
        // endpoint addresses"; nothing to trust, so it is Local.
        (0, _) | (_, 0) => return Ok(Some((ProxyHeader::Local, total))),
        (1, 1) => {
            let a = payload
                .get(..12)
                .ok_or(ProxyError::Invalid("short IPv4 address block"))?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            let header = ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            };
            (header, &payload[12..])
        }
        (2, 1) => {
            let a = payload
                .get(..36)
                .ok_or(ProxyError::Invalid("short IPv6 address block"))?;
            let ip = |o: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            let header = ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            };
            (header, &payload[36..])
        }
        // AF_UNIX stream: a local proxy; no IP to take over.
        _ => {
            let tlvs = payload
                .get(216..)
                .ok_or(ProxyError::Invalid("short unix address block"))?;
            (ProxyHeader::Local, tlvs)
        }
    };
    check_tlvs(header, V2_HEADER + payload.len() - tlvs.len())?;
    Ok(Some((proxied, total)))
}

/// Checks that the TLVs starting at `header[start..]` exactly fill the header, and verifies a
/// CRC32C TLV over the whole header with the checksum field zeroed (spec §2.2.3).
fn check_tlvs(header: &[u8], start: usize) -> Result<(), ProxyError> {
    let mut pos = start;
    let mut crc: Option<(usize, u32)> = None;
    while pos < header.len() {
        let Some(&[kind, hi, lo]) = header.get(pos..pos + 3) else {
            return Err(ProxyError::Invalid("truncated TLV in v2 header"));
        };
        let value_len = usize::from(u16::from_be_bytes([hi, lo]));
        let value_start = pos + 3;
        let value = header
            .get(value_start..value_start + value_len)
            .ok_or(ProxyError::Invalid("TLV overruns v2 header"))?;
        if kind == TLV_CRC32C {
            let bytes: [u8; 4] = value
                .try_into()
                .map_err(|_| ProxyError::Invalid("bad CRC32C TLV length"))?;
            if crc
                .replace((value_start, u32::from_be_bytes(bytes)))
                .is_some()
            {
                return Err(ProxyError::Invalid("duplicate CRC32C TLV"));
            }
        }
        pos = value_start + value_len;
    }
    if let Some((at, expected)) = crc {
        let mut zeroed = header.to_vec();
        zeroed[at..at + 4].fill(0);
        if crc32c(&zeroed) != expected {
            return Err(ProxyError::Invalid("CRC32C mismatch in v2 header"));
        }
    }
    Ok(())
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise: headers are at most a few
/// KiB and arrive once per connection, so a table buys nothing.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    type Parsed = Result<Option<(ProxyHeader, usize)>, ProxyError>;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxied(src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader::Proxied {
            source: sa(src),
            destination: sa(dst),
        }
    }

    #[test]
    fn v1_vectors() {
        let max_tcp6 = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        let max_unknown = "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!((max_tcp6.len(), max_unknown.len()), (104, 107));
        let cases: Vec<(String, Parsed)> = vec![
            // Spec §2.1 example, followed by protocol data.
            (
                "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n".into(),
                Ok(Some((proxied("192.168.0.1:56324", "192.168.0.11:443"), 47))),
            ),
            (
                "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n".into(),
                Ok(Some((
                    proxied("255.255.255.255:65535", "255.255.255.255:65535"),
                    56,
                ))),
            ),
            (
                "PROXY TCP6 2001:db8::1 2001:db8::2 1234 25\r\nEHLO x\r\n".into(),
                Ok(Some((
                    proxied("[2001:db8::1]:1234", "[2001:db8::2]:25"),
                    44,
                ))),
            ),
            (
                max_tcp6.into(),
                Ok(Some((
                    proxied(
                        "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                        "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                    ),
                    104,
                ))),
            ),
            (
                "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n".into(),
                Ok(Some((proxied("0.0.0.0:0", "0.0.0.0:0"), 32))),
            ),
            (
                "PROXY UNKNOWN\r\n".into(),
                Ok(Some((ProxyHeader::Local, 15))),
            ),
            (max_unknown.into(), Ok(Some((ProxyHeader::Local, 107)))),
            (
                "PROXY UNKNOWN whatever junk\r\n".into(),
                Ok(Some((ProxyHeader::Local, 29))),
            ),
            // Truncated: need more.
            ("".into(), Ok(None)),
            ("P".into(), Ok(None)),
            ("PROXY".into(), Ok(None)),
            ("PROXY TCP4 1.2.3.4".into(), Ok(None)),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r".into(), Ok(None)),
            // Too long.
            (
                format!("PROXY UNKNOWN {}", "x".repeat(100)),
                Err(ProxyError::TooLong),
            ),
            (
                format!("PROXY UNKNOWN {}\r\n", "x".repeat(92)),
                Err(ProxyError::TooLong),
            ),
            (format!("{}\r", &max_unknown[..105]), Ok(None)),
            (
                format!("{}x\r", &max_unknown[..105]),
                Err(ProxyError::TooLong),
            ),
            // Malformed.
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".into(),
                Err(ProxyError::Invalid("bare LF in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX".into(),
                Err(ProxyError::Invalid("bare CR in v1 header")),
            ),
            (
                "PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".into(),
                Err(ProxyError::Invalid("unknown protocol in v1 header")),
            ),
            (
                "PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n".into(),
                Err(ProxyError::Invalid("unknown protocol in v1 header")),
            ),
            (
                "PROXY\r\n".into(),
                Err(ProxyError::Invalid("no PROXY protocol signature")),
            ),
            (
                "PROXY \r\n".into(),
                Err(ProxyError::Invalid("unknown protocol in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".into(),
                Err(ProxyError::Invalid("wrong number of fields in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n".into(),
                Err(ProxyError::Invalid("wrong number of fields in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n".into(),
                Err(ProxyError::Invalid("wrong number of fields in v1 header")),
            ),
            (
                "PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n".into(),
                Err(ProxyError::Invalid("bad address in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n".into(),
                Err(ProxyError::Invalid("bad address in v1 header")),
            ),
            (
                "PROXY TCP4 ::1 5.6.7.8 1 2\r\n".into(),
                Err(ProxyError::Invalid("bad address in v1 header")),
            ),
            (
                "PROXY TCP6 1.2.3.4 ::1 1 2\r\n".into(),
                Err(ProxyError::Invalid("bad address in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 025 2\r\n".into(),
                Err(ProxyError::Invalid("bad port in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".into(),
                Err(ProxyError::Invalid("bad port in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n".into(),
                Err(ProxyError::Invalid("bad port in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n".into(),
                Err(ProxyError::Invalid("bad port in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n".into(),
                Err(ProxyError::Invalid("bad port in v1 header")),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\u{e9}\r\n".into(),
                Err(ProxyError::Invalid("bad port in v1 header")),
            ),
            (
                "proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n".into(),
                Err(ProxyError::Invalid("no PROXY protocol signature")),
            ),
            (
                "EHLO client\r\n".into(),
                Err(ProxyError::Invalid("no PROXY protocol signature")),
            ),
            (
                "PRIX".into(),
                Err(ProxyError::Invalid("no PROXY protocol signature")),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_proxy_header(input.as_bytes()), want, "{input:?}");
        }
    }

    fn v2(ver_cmd: u8, fam: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(fam);
        out.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        out.extend_from_slice(value);
        out
    }

    fn tcp4_block() -> Vec<u8> {
        let mut a = vec![192, 0, 2, 1, 198, 51, 100, 7];
        a.extend_from_slice(&40000u16.to_be_bytes());
        a.extend_from_slice(&25u16.to_be_bytes());
        a
    }

    fn tcp6_block() -> Vec<u8> {
        let mut a = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        a.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        a.extend_from_slice(&40000u16.to_be_bytes());
        a.extend_from_slice(&587u16.to_be_bytes());
        a
    }

    /// A TCP4 header with TLVs and a valid CRC32C, computed as the spec describes.
    fn with_crc(tlvs_before: &[u8]) -> Vec<u8> {
        let payload = [tcp4_block(), tlvs_before.to_vec(), tlv(TLV_CRC32C, &[0; 4])].concat();
        let mut header = v2(0x21, 0x11, &payload);
        let crc = crc32c(&header);
        let at = header.len() - 4;
        header[at..].copy_from_slice(&crc.to_be_bytes());
        header
    }

    #[test]
    fn crc32c_known_answer() {
        // RFC 3720 §B.4 / the usual "123456789" check value.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn v2_vectors() {
        let p4 = proxied("192.0.2.1:40000", "198.51.100.7:25");
        let p6 = proxied("[2001:db8::1]:40000", "[2001:db8::2]:587");
        let ssl = [
            vec![0x01],
            vec![0, 0, 0, 0],
            tlv(0x21, b"TLSv1.3"),
            tlv(0x22, b"client.example"),
        ]
        .concat();
        let tlvs = [
            tlv(0x01, b"smtp"),
            tlv(0x02, b"mx.example.test"),
            tlv(0x04, &[0; 3]),
            tlv(0x05, &[7; 128]),
            tlv(0x20, &ssl),
            tlv(0xe0, b"vpce-123"),
        ]
        .concat();
        let good_crc = with_crc(&tlv(0x02, b"mx.example.test"));
        let mut bad_crc = good_crc.clone();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 1;
        let cases: Vec<(Vec<u8>, Parsed)> = vec![
            (v2(0x20, 0x00, &[]), Ok(Some((ProxyHeader::Local, 16)))),
            // LOCAL must skip whatever length is announced.
            (
                v2(0x20, 0x11, &tcp4_block()),
                Ok(Some((ProxyHeader::Local, 28))),
            ),
            (v2(0x21, 0x11, &tcp4_block()), Ok(Some((p4, 28)))),
            (v2(0x21, 0x21, &tcp6_block()), Ok(Some((p6, 52)))),
            (
                [v2(0x21, 0x11, &tcp4_block()), b"EHLO x\r\n".to_vec()].concat(),
                Ok(Some((p4, 28))),
            ),
            (
                v2(0x21, 0x11, &[tcp4_block(), tlvs.clone()].concat()),
                Ok(Some((p4, 28 + tlvs.len()))),
            ),
            (
                v2(0x21, 0x21, &[tcp6_block(), tlvs.clone()].concat()),
                Ok(Some((p6, 52 + tlvs.len()))),
            ),
            (good_crc.clone(), Ok(Some((p4, good_crc.len())))),
            (
                bad_crc,
                Err(ProxyError::Invalid("CRC32C mismatch in v2 header")),
            ),
            // UNSPEC family or protocol with PROXY: use the real endpoints.
            (v2(0x21, 0x00, &[]), Ok(Some((ProxyHeader::Local, 16)))),
            (
                v2(0x21, 0x10, &tcp4_block()),
                Ok(Some((ProxyHeader::Local, 28))),
            ),
            (
                v2(0x21, 0x31, &[0; 216]),
                Ok(Some((ProxyHeader::Local, 232))),
            ),
            // Malformed.
            (
                v2(0x11, 0x11, &tcp4_block()),
                Err(ProxyError::Invalid("unsupported v2 version")),
            ),
            (
                v2(0x22, 0x11, &tcp4_block()),
                Err(ProxyError::Invalid("unsupported v2 command")),
            ),
            (
                v2(0x21, 0x41, &tcp4_block()),
                Err(ProxyError::Invalid(
                    "unsupported v2 address family or protocol",
                )),
            ),
            (
                v2(0x21, 0x13, &tcp4_block()),
                Err(ProxyError::Invalid(
                    "unsupported v2 address family or protocol",
                )),
            ),
            (
                v2(0x21, 0x12, &tcp4_block()),
                Err(ProxyError::Invalid("datagram connection in v2 header")),
            ),
            (
                v2(0x21, 0x11, &tcp4_block()[..11]),
                Err(ProxyError::Invalid("short IPv4 address block")),
            ),
            (
                v2(0x21, 0x21, &tcp4_block()),
                Err(ProxyError::Invalid("short IPv6 address block")),
            ),
            (
                v2(0x21, 0x31, &[0; 100]),
                Err(ProxyError::Invalid("short unix address block")),
            ),
            (
                v2(0x21, 0x11, &[tcp4_block(), vec![0x01, 0x00]].concat()),
                Err(ProxyError::Invalid("truncated TLV in v2 header")),
            ),
            (
                v2(
                    0x21,
                    0x11,
                    &[tcp4_block(), vec![0x01, 0x00, 0x05, b'a']].concat(),
                ),
                Err(ProxyError::Invalid("TLV overruns v2 header")),
            ),
            (
                v2(
                    0x21,
                    0x11,
                    &[tcp4_block(), tlv(TLV_CRC32C, &[0; 3])].concat(),
                ),
                Err(ProxyError::Invalid("bad CRC32C TLV length")),
            ),
            (
                v2(0x21, 0x11, &vec![0; MAX_V2_PAYLOAD + 1])[..20].to_vec(),
                Err(ProxyError::TooLong),
            ),
            (
                b"\r\n\r\n\0\r\nQUIX\n".to_vec(),
                Err(ProxyError::Invalid("no PROXY protocol signature")),
            ),
            (
                b"\r\nEHLO".to_vec(),
                Err(ProxyError::Invalid("no PROXY protocol signature")),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_proxy_header(&input), want, "{input:?}");
        }
        // The largest accepted payload.
        let big = v2(
            0x21,
            0x11,
            &[tcp4_block(), tlv(0x04, &vec![0; MAX_V2_PAYLOAD - 12 - 3])].concat(),
        );
        assert_eq!(
            parse_proxy_header(&big),
            Ok(Some((p4, V2_HEADER + MAX_V2_PAYLOAD)))
        );
    }

    /// Every proper prefix of a valid header asks for more bytes; none is accepted early.
    #[test]
    fn truncated_headers_need_more() {
        let headers: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2(0x20, 0x00, &[]),
            v2(0x21, 0x11, &[tcp4_block(), tlv(0x01, b"smtp")].concat()),
            v2(0x21, 0x21, &tcp6_block()),
            with_crc(&[]),
        ];
        for header in headers {
            for cut in 0..header.len() {
                assert_eq!(
                    parse_proxy_header(&header[..cut]),
                    Ok(None),
                    "{header:?} cut at {cut}"
                );
            }
            assert!(matches!(parse_proxy_header(&header), Ok(Some((_, n))) if n == header.len()));
        }
    }
}
