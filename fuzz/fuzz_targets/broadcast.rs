//! The broadcast message readers: `Envelope::parse` (daemon side) and
//! `evictd::subscriber::message::parse` (the Rust subscriber).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| evictd::fuzzing::broadcast(data));
