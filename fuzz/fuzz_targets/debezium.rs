//! The Debezium decoder on arbitrary bytes, read as JSON lines.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| evictd::fuzzing::debezium(data));
