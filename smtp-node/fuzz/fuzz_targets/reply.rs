//! libFuzzer entry point of the `reply` target (see `kubemail_fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubemail_fuzz::reply(data));
