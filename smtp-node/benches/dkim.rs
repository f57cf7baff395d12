//! DKIM signing microbenchmarks: the node's [`DkimSigner`] signing a
//! 10 KiB message (relaxed/relaxed, the node's header list) with the Ed25519 and the
//! RSA-2048 development keys in `smtp-node/examples/`.
//!
//! Run: `cargo bench -p kubemail-smtp-node --bench dkim`. The performance anchors
//! Published figures for comparable signers aim at 50,000 Ed25519 and 4,200 RSA-2048
//! signatures per second and core, 10 KiB body hash included.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kubemail_smtp_node::config::{DkimConfig, DkimKeyConfig};
use kubemail_smtp_node::dkim::DkimSigner;

/// The signing domain of the development keys.
const DOMAIN: &str = "example.test";
/// Message size of anchor B6.
const MESSAGE_SIZE: usize = 10 * 1024;

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file)
}

fn signer(selector: &str, file: &str) -> DkimSigner {
    let config = DkimConfig {
        keys: vec![DkimKeyConfig {
            selector: selector.to_owned(),
            key_file: example(file),
        }],
    };
    match DkimSigner::load([(DOMAIN, &config)]) {
        Ok(s) => s,
        Err(e) => panic!("cannot load {file}: {e}"),
    }
}

/// A submitted message of about `size` bytes from our domain.
fn message(size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Alice <alice@{DOMAIN}>\r\nTo: bob@example.org\r\nSubject: benchmark\r\n\
         Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@{DOMAIN}>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    .into_bytes();
    while m.len() < size {
        m.extend_from_slice(b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.  \r\n");
    }
    m
}

fn sign(c: &mut Criterion) {
    let msg = message(MESSAGE_SIZE);
    let mut group = c.benchmark_group("dkim_sign");
    group.throughput(Throughput::Elements(1));
    for (name, selector, file) in [
        ("ed25519", "dev-ed", "dev-dkim-ed25519.pem"),
        ("rsa2048", "dev-rsa", "dev-dkim-rsa.pem"),
    ] {
        let signer = signer(selector, file);
        match signer.sign_for(&msg, DOMAIN) {
            Ok(Some(h)) if h.starts_with("DKIM-Signature:") => {}
            other => panic!("{name}: no signature: {other:?}"),
        }
        group.bench_with_input(BenchmarkId::new(name, MESSAGE_SIZE), &msg, |b, msg| {
            b.iter(|| black_box(signer.sign_for(black_box(msg), DOMAIN)).is_ok());
        });
    }
    group.finish();
}

criterion_group!(benches, sign);
criterion_main!(benches);
