//! No-panic tests for every parser on pseudo-random input: a few
//! thousand byte strings per parser, raw and mapped onto an SMTP-ish alphabet so that the
//! generator reaches deep grammar, from a fixed seed so failures reproduce. This is the
//! stable-Rust stand-in for the cargo-fuzz targets, bounded in count and size.

use bytes::{Bytes, BytesMut};

use super::*;

/// Tiny deterministic PRNG (xorshift64*), so the randomized tests need no extra crate.
pub(crate) struct XorShift(pub(crate) u64);

impl XorShift {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        let len = self.below(max_len + 1);
        let alphabet: &[u8] = match self.below(3) {
            0 => &[],
            1 => b"0123456789az:=-<>,;@.\"\\[] \r\n+*/",
            _ => b"MAILFROM:<>RCPT TO:@.\r\n ",
        };
        (0..len)
            .map(|_| {
                let b = self.next() as u8;
                if alphabet.is_empty() {
                    b
                } else {
                    alphabet[usize::from(b) % alphabet.len()]
                }
            })
            .collect()
    }
}

const ROUNDS: usize = 3000;
const MAX_LEN: usize = 300;

/// Seeds from known hostile inputs (null paths, open-relay address forms, smuggling sequences) so that the generator starts near the
/// interesting corners.
const SEEDS: &[&[u8]] = &[
    b"MAIL FROM:<>>>>>",
    b"MAIL FROM:<a@b.com>>>",
    b"RCPT TO:<@[192.0.2.1]:relaytest@d.test>",
    b"RCPT TO:<\"relaytest@d.test\"@[192.0.2.1]>",
    b"RCPT TO:<d.test!relaytest@srv>",
    b"BDAT 18446744073709551615 LAST",
    b"MAIL FROM:<a@b> SIZE=99999999999999999999999",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r\n\x00.\r\n",
    b"\r\r\n.\r\r\n",
    b"PROXY TCP6 ::1 ::1 1 1\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c",
];

fn inputs() -> impl Iterator<Item = Vec<u8>> {
    let mut rng = XorShift(0x243f_6a88_85a3_08d3);
    let seeds = SEEDS.iter().map(|s| s.to_vec());
    let random = (0..ROUNDS).map(move |i| {
        let mut v = rng.bytes(MAX_LEN);
        // Splice a seed into every other input.
        if i % 2 == 0 {
            let seed = SEEDS[i / 2 % SEEDS.len()];
            let at = if v.is_empty() { 0 } else { i % v.len() };
            v.splice(at..at, seed.iter().copied());
        }
        v
    });
    seeds.chain(random)
}

#[test]
fn command_and_address_parsers_never_panic() {
    for input in inputs() {
        let _ = parse_command(&input);
        for prefix in [&b"MAIL FROM:<"[..], b"RCPT TO:<", b"AUTH PLAIN ", b"BDAT "] {
            let _ = parse_command(&[prefix, &input].concat());
        }
        let text = String::from_utf8_lossy(&input);
        for utf8 in [false, true] {
            if let Ok(a) = parse_forward_path(&text, utf8) {
                // FUZZ-08: normalisation is stable: the displayed form parses to the same address.
                if !a.is_bare_postmaster() {
                    assert_eq!(
                        parse_forward_path(&a.to_string(), true).as_ref(),
                        Ok(&a),
                        "{text:?}"
                    );
                }
            }
            let _ = parse_reverse_path(&text, utf8);
        }
    }
}

#[test]
fn framing_and_data_receivers_never_panic() {
    let mut rng = XorShift(7);
    for input in inputs() {
        let split = rng.below(input.len() + 1);
        let mut reader = line::LineReader::new();
        let mut buf = BytesMut::from(&input[..split]);
        while reader.next_line(&mut buf, 64).is_some() {}
        buf.extend_from_slice(&input[split..]);
        while reader.next_line(&mut buf, 64).is_some() {}
        assert!(buf.len() < 64);

        for policy in [BareEolPolicy::Reject, BareEolPolicy::Normalize] {
            let mut rx = DataReceiver::new(policy, 100, 20);
            let mut buf = BytesMut::from(&input[..split]);
            rx.feed(&mut buf);
            buf.extend_from_slice(&input[split..]);
            rx.feed(&mut buf);
            let received = rx.bytes_received();
            assert_eq!(received as usize + buf.len(), input.len());
            let _ = rx.finish();

            let _ = check_bdat_message(Bytes::from(input.clone()), policy, 20);
        }

        // FUZZ-03: exactly the declared size is consumed.
        let size = rng.below(input.len() + 10) as u64;
        let mut rx = BdatReceiver::new(size);
        let mut buf = BytesMut::from(&input[..]);
        let mut out = BytesMut::new();
        let done = rx.feed(&mut buf, &mut out) == DataProgress::Done;
        assert_eq!(out.len() as u64, size.min(input.len() as u64));
        assert_eq!(done, size <= input.len() as u64);
    }
}

#[test]
fn auth_and_proxy_parsers_never_panic() {
    for input in inputs() {
        let text = String::from_utf8_lossy(&input);
        let _ = decode_plain(&text);
        let _ = decode_login_step(&text);
        if let Ok(Some((_, consumed))) = parse_proxy_header(&input) {
            assert!(consumed <= input.len());
        }
        // Also behind a valid v1/v2 prefix, to get past the signature checks.
        for prefix in [&b"PROXY TCP4 "[..], b"\r\n\r\n\x00\r\nQUIT\n\x21\x11"] {
            let joined = [prefix, &input].concat();
            if let Ok(Some((_, consumed))) = parse_proxy_header(&joined) {
                assert!(consumed <= joined.len());
            }
        }
    }
}

#[test]
fn replies_never_contain_injected_lines() {
    for input in inputs() {
        let text = String::from_utf8_lossy(&input).into_owned();
        let wire = Reply::syntax_error(text.clone()).to_bytes(true);
        // Exactly one CRLF, at the end.
        assert_eq!(
            wire.windows(2).filter(|w| w == b"\r\n").count(),
            1,
            "{text:?}"
        );
        assert!(
            !wire[..wire.len() - 2].contains(&b'\r') && !wire[..wire.len() - 2].contains(&b'\n')
        );
    }
}

#[test]
fn client_side_never_panics_and_never_injects() {
    let no_mail_params = MailParams::default();
    let no_rcpt_params = RcptParams::default();
    for input in inputs() {
        // Replies: no panic, and what parses used no more than it was given.
        for prefix in [&b""[..], b"250-", b"250 "] {
            let joined = [prefix, &input].concat();
            if let Ok(Some((reply, used))) = parse_reply(&joined) {
                assert!(used <= joined.len());
                let _ = Capabilities::parse(&reply);
            }
        }
        let text = String::from_utf8_lossy(&input);
        // Commands: whatever is written is one line, ending in its only CRLF.
        let commands = [
            ClientCommand::Ehlo(&text),
            ClientCommand::Mail {
                from: &text,
                params: &no_mail_params,
            },
            ClientCommand::Rcpt {
                to: &text,
                params: &no_rcpt_params,
            },
            ClientCommand::AuthPlain {
                username: &text,
                password: &text,
            },
            ClientCommand::AuthLoginResponse(&text),
        ];
        for command in commands {
            if let Ok(wire) = command.to_bytes() {
                let body = &wire[..wire.len() - 2];
                assert!(wire.ends_with(b"\r\n"), "{command:?}");
                assert!(
                    !body.contains(&b'\r') && !body.contains(&b'\n') && !body.contains(&0),
                    "{command:?}: {wire:?}"
                );
            }
        }
        // DATA: the encoded message ends exactly at its end, on a strict receiver.
        let wire = encode_data(&input);
        let mut rx = DataReceiver::new(BareEolPolicy::Reject, u64::MAX, usize::MAX);
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(rx.feed(&mut buf), DataProgress::Done, "{input:?}");
        assert!(buf.is_empty(), "the data ended early: {input:?}");
        assert!(rx.finish().is_ok(), "{input:?}");
    }
}
