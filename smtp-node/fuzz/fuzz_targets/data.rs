//! libFuzzer entry point of the `data` target (see `kubemail_fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubemail_fuzz::data(data));
