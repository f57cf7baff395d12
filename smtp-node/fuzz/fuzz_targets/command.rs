//! libFuzzer entry point of the `command` target (see `kubemail_fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubemail_fuzz::command(data));
