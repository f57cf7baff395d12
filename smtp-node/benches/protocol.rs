//! Microbenchmarks of the sans-IO SMTP layer: command line framing and
//! parsing, and end-of-data scanning with dot-unstuffing over whole messages and over a
//! message split into the reads a socket delivers.
//!
//! Run: `cargo bench -p kubemail-smtp-node --bench protocol` (add a filter such as `data/` to
//! run some). Throughput is in bytes of wire input per second; the performance anchors
//! Published figures for comparable parsers aim at 1.5 GB/s for the DATA scanner.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kubemail_smtp_node::protocol::{
    BareEolPolicy, DataProgress, DataReceiver, LineReader, MAX_AUTH_LINE, MAX_TEXT_LINE,
    encode_data, parse_command,
};

/// Message size limit given to the receiver: larger than every body here, so nothing is
/// refused.
const MAX_SIZE: u64 = 64 * 1024 * 1024;

/// What a client sends in one pipelined transaction (RFC 2920), as command lines.
const PIPELINED: &[&[u8]] = &[
    b"EHLO client.example.org",
    b"MAIL FROM:<sender@example.org> SIZE=5120 BODY=8BITMIME",
    b"RCPT TO:<recipient@example.com>",
    b"RCPT TO:<\"quoted local\"@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@example.com",
    b"DATA",
    b"NOOP",
    b"RSET",
    b"QUIT",
];

/// A message of about `size` bytes as it is stored (CRLF lines of 76 characters, some starting
/// with a dot so that unstuffing has work), and the same message as it travels after DATA:
/// dot-stuffed and ending in `<CRLF>.<CRLF>`.
fn message(size: usize) -> (Vec<u8>, Vec<u8>) {
    let mut stored =
        b"From: sender@example.org\r\nTo: recipient@example.com\r\nSubject: bench\r\n\r\n".to_vec();
    let mut n = 0u32;
    while stored.len() < size {
        n += 1;
        if n.is_multiple_of(17) {
            stored.extend_from_slice(b".a line that starts with a dot and needs stuffing\r\n");
        } else {
            stored.extend_from_slice(
                b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod t\r\n",
            );
        }
    }
    let wire = encode_data(&stored);
    (stored, wire)
}

/// `wire` cut into the reads a session would get, `chunk` bytes each.
fn reads(wire: &[u8], chunk: usize) -> Vec<BytesMut> {
    wire.chunks(chunk).map(BytesMut::from).collect()
}

/// Feeds the reads to a fresh receiver and returns the stored size.
fn receive(reads: Vec<BytesMut>) -> usize {
    let mut receiver = DataReceiver::new(BareEolPolicy::Reject, MAX_SIZE, MAX_TEXT_LINE);
    for mut read in reads {
        // `NeedMore` consumed all of the read, so each read can be fed on its own.
        if receiver.feed(&mut read) == DataProgress::Done {
            break;
        }
    }
    match receiver.finish() {
        Ok(body) => body.len(),
        Err(e) => panic!("benchmark message refused: {e}"),
    }
}

fn commands(c: &mut Criterion) {
    let mut group = c.benchmark_group("commands");
    let mut wire = Vec::new();
    for line in PIPELINED {
        wire.extend_from_slice(line);
        wire.extend_from_slice(b"\r\n");
    }
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("frame_and_parse_pipelined_batch", |b| {
        b.iter(|| {
            let mut reader = LineReader::new();
            let mut buf = BytesMut::from(&wire[..]);
            let mut parsed = 0;
            while let Some(event) = reader.next_line(&mut buf, MAX_AUTH_LINE) {
                if let kubemail_smtp_node::protocol::LineEvent::Line(line) = event {
                    parsed += usize::from(parse_command(&line).is_ok());
                }
            }
            black_box(parsed)
        });
    });
    for line in [PIPELINED[1], PIPELINED[3]] {
        let name = String::from_utf8_lossy(&line[..4]).to_lowercase();
        group.throughput(Throughput::Bytes(line.len() as u64));
        group.bench_with_input(BenchmarkId::new("parse", name), line, |b, line| {
            b.iter(|| black_box(parse_command(black_box(line))).is_ok());
        });
    }
    group.finish();
}

fn data(c: &mut Criterion) {
    let mut group = c.benchmark_group("data");
    for size in [5 * 1024, 100 * 1024, 1024 * 1024] {
        let (stored, wire) = message(size);
        assert_eq!(receive(reads(&wire, 1460)), stored.len());
        group.throughput(Throughput::Bytes(wire.len() as u64));
        // The whole message in one buffer: the scanner's own speed. Then the reads a session
        // gets: 16 KiB (its read size) and 1460 bytes (one TCP segment each), so that the
        // state carried across reads is part of the cost. Cutting the input is not timed.
        for (name, chunk) in [
            ("whole", wire.len()),
            ("reads_16384", 16 * 1024),
            ("reads_1460", 1460),
        ] {
            group.bench_with_input(BenchmarkId::new(name, size), &wire, |b, wire| {
                b.iter_batched(
                    || reads(wire, chunk),
                    |r| black_box(receive(r)),
                    BatchSize::LargeInput,
                );
            });
        }
    }
    group.finish();
}

criterion_group!(benches, commands, data);
criterion_main!(benches);
