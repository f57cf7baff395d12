//! Short fuzz runs of every target on stable Rust: each target's seed corpus
//! (known hostile vectors and known crash inputs of mail crates, `e2e/hostile/corpus/`), then
//! seeded mutations for a bounded number of executions and seconds. `make fuzz` runs the same
//! targets under libFuzzer for as long as asked.

use std::time::Duration;

use kubemail_e2e::hostile::fuzz::{Budget, TARGETS, run_target};
use kubemail_e2e::hostile::scale;

fn budget() -> Budget {
    Budget {
        max_executions: scale(20_000, 2_000_000),
        max_time: Duration::from_secs(scale(4, 60)),
    }
}

fn run(name: &str) {
    let (_, target) = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"));
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b75_6265_6d61_696c);
    let stats = run_target(name, *target, budget(), seed);
    println!(
        "fuzz {name}: {} seeds + {} mutations = {} executions in {:.1}s, no failure (seed {seed:#x})",
        stats.seeds,
        stats.executions - stats.seeds as u64,
        stats.executions,
        stats.elapsed.as_secs_f64()
    );
    assert!(
        stats.seeds > 0,
        "no seed corpus for {name} under e2e/hostile/corpus"
    );
}

#[test]
fn fuzz_command_parser() {
    run("command");
}

#[test]
fn fuzz_data_end_of_message_split_invariance() {
    run("data");
}

#[test]
fn fuzz_address_parser() {
    run("address");
}

#[test]
fn fuzz_auth_decoder() {
    run("auth");
}

#[test]
fn fuzz_client_reply_parser() {
    run("reply");
}

#[test]
fn fuzz_config_loader() {
    run("config");
}

#[test]
fn fuzz_message_header_handling() {
    run("message");
}

#[test]
fn every_target_has_a_test_here() {
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "command", "data", "address", "auth", "reply", "config", "message"
        ]
    );
}

/// Was finding F1 (fixed; libFuzzer `message` target, 33,755 executions):
/// `authres::strip_forged`, which removes forged `Authentication-Results: <our hostname>`
/// headers from mail arriving on the MX port, decided where the header section ends by
/// searching for CRLF CRLF only. A message whose header section is empty (it starts with CRLF)
/// was scanned as all headers, and body lines that looked like our Authentication-Results were
/// deleted from the accepted body (changing content and breaking its DKIM body hash). It now
/// uses `message`'s `header_section`, which handles the leading CRLF.
#[test]
fn finding_forged_header_stripping_keeps_the_body() {
    use kubemail_smtp_node::authres::strip_forged;
    let message = b"\r\nAuthentication-Results: mx.example.test; spf=pass\r\n";
    let stripped = strip_forged(message, "mx.example.test");
    println!(
        "sent: {:?}\ngot:  {:?}",
        String::from_utf8_lossy(message),
        String::from_utf8_lossy(&stripped)
    );
    assert_eq!(stripped, message.to_vec(), "the body line was removed");
}
