//! Issue 11, item 12: a value renders to the same key whether it arrives on
//! the replication stream (pgoutput prints it in the walsender's session)
//! or comes back from a look-up (sqlx's session), even on a database whose
//! defaults (`TimeZone`, `DateStyle`, `extra_float_digits`, `bytea_output`)
//! are not the ones evictd pins.

use std::time::Duration;

use super::daemon::{Daemon, fill, redis, redis_url, wait_gone};
use super::support::pg_url;

/// Defaults a user's database may well have: every one of them changes how
/// Postgres prints a timestamptz, a float or a bytea.
const SCHEMA: &str = "
DO $$ BEGIN
  EXECUTE format('ALTER DATABASE %I SET timezone = %L', current_database(), 'Asia/Kolkata');
  EXECUTE format('ALTER DATABASE %I SET datestyle = %L', current_database(), 'SQL, DMY');
  EXECUTE format('ALTER DATABASE %I SET extra_float_digits = 0', current_database());
  EXECUTE format('ALTER DATABASE %I SET bytea_output = %L', current_database(), 'escape');
  EXECUTE format('ALTER DATABASE %I SET intervalstyle = %L', current_database(), 'iso_8601');
END $$;
CREATE SCHEMA app;
CREATE TABLE app.slots (id bigint PRIMARY KEY, at timestamptz NOT NULL, score float8 NOT NULL, tag bytea NOT NULL, span interval NOT NULL);
CREATE TABLE app.bookings (id bigint PRIMARY KEY, slot_id bigint NOT NULL);
ALTER TABLE app.slots REPLICA IDENTITY FULL;
ALTER TABLE app.bookings REPLICA IDENTITY FULL;
";

/// One cache keyed by the slot's values, fed both directly (values from
/// pgoutput) and through a look-up from a booking (values from sqlx).
fn graph(p: &str) -> String {
    format!(
        r#"
[tables."app.slots"]
key = ["id"]
columns = ["id", "at", "score", "tag", "span"]

[tables."app.bookings"]
key = ["id"]
columns = ["id", "slot_id"]

[caches.{p}_slot]
key = "{p}:slot:{{at}}:{{score}}:{{tag}}:{{span}}"
[[caches.{p}_slot.depends]]
table = "app.slots"
[[caches.{p}_slot.depends]]
table = "app.bookings"
lookup = {{ arg = "slot_id", query = "SELECT at, score, tag, span FROM app.slots WHERE id = ANY($1)" }}
"#
    )
}

#[tokio::test]
async fn a_timestamptz_float_bytea_and_interval_render_the_same_key_through_pgoutput_and_a_lookup() {
    let url = redis_url();
    let mut d = Daemon::custom(&pg_url(), &url, SCHEMA, graph, "").await;
    d.sql(
        "INSERT INTO app.slots VALUES (1, '2024-03-05 10:20:30.123456+00', 0.1::float8 + 0.2::float8, '\\x0a0b'::bytea, '1 day 02:03:04')",
    )
    .await;
    d.start().await;
    let mut r = redis(&url).await;
    // UTC, ISO, every float digit, bytes as hex, the `postgres` interval style.
    let key = d.key("slot:2024-03-05 10%3A20%3A30.123456+00:0.30000000000000004:0a0b:1 day 02%3A03%3A04");

    // Through a look-up.
    fill(&mut r, std::slice::from_ref(&key)).await;
    d.sql("INSERT INTO app.bookings VALUES (1, 1)").await;
    wait_gone(&d, &r, std::slice::from_ref(&key), Duration::from_secs(30)).await;

    // Through pgoutput: the same row's values, printed by the walsender.
    fill(&mut r, std::slice::from_ref(&key)).await;
    d.sql("UPDATE app.slots SET id = id WHERE id = 1").await;
    wait_gone(&d, &r, std::slice::from_ref(&key), Duration::from_secs(15)).await;
    d.finish().await;
}
