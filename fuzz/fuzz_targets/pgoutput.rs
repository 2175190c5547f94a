//! The pgoutput decoder, its relation cache seeded; the input is a sequence
//! of length-framed XLogData payloads (`evictd::fuzzing::pgoutput`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    evictd::fuzzing::pgoutput(data);
});
