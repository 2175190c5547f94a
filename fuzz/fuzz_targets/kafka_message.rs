//! The Kafka source's decoding of message values (the Debezium envelope
//! split without re-parsing a schema seen before), on arbitrary bytes read
//! as lines: one value each, of one topic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    evictd::fuzzing::kafka_messages(data);
});
