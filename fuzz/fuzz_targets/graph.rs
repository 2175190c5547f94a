//! The graph loader on one TOML file.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        evictd::fuzzing::graph(text);
    }
});
