//! Integration tests: one binary (ripgrep's layout). They run the real
//! `evictd` binary and real services started by `scripts/test.sh`
//! (`EVICTD_TEST_PG_URL` …); run them through that script.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod broadcast;
mod broadcast_sink;
mod broadcast_vectors;
mod check_json;
mod check_live;
mod cli;
mod clients;
mod daemon;
mod dead_letter;
mod fill_guard;
mod fuzz_corpora;
mod invalidate;
mod kafka;
mod kafka_tls;
mod key_vectors;
mod lookup;
mod memory;
mod metrics;
mod ops;
mod outage;
mod pipeline;
mod process;
mod publication;
mod redis_durability;
mod redis_sink;
mod redis_support;
mod restore;
mod server;
mod slot_loss;
mod standby;
mod subscriber;
mod support;
mod tag_race;
mod tls;
mod value_format;
