//! Key templates: parse the first line, render with the values of the next.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        evictd::fuzzing::key_template(text);
    }
});
