//! The session settings that decide how Postgres prints a value as text,
//! pinned alike on the replication session and on look-up sessions.
//!
//! A key parameter can reach evictd two ways: printed by the walsender in
//! a pgoutput tuple, or returned by a look-up (as `::text` for every type
//! that is not an integer, boolean, float or bytea). Both must print a
//! value the same way, or the same row renders two different keys and one
//! of them is never invalidated. What Postgres prints depends on session
//! settings that a server, a database (`ALTER DATABASE … SET`) or a role
//! may change: `TimeZone` and `DateStyle` (timestamps, dates),
//! `IntervalStyle`, `extra_float_digits`, `bytea_output`. sqlx pins
//! `TimeZone`, `DateStyle` and `extra_float_digits` on every connection; a
//! replication session otherwise takes whatever the server, database and
//! role say.
//!
//! Invariant: [`SETTINGS`] is the one list; the replication session sends
//! all of it as startup `options` ([`replication_options`]), look-up
//! sessions get what sqlx does not already pin ([`pin_lookup`]). Look-ups
//! read `bytea` natively, so `bytea_output` matters only on the stream.

use sqlx::postgres::PgConnectOptions;

/// Every setting that changes how a value prints, with evictd's value.
/// `extra_float_digits = 3` prints every float so that it parses back to
/// the same number on every Postgres version (from 12 on, any positive
/// value prints the shortest exact form).
pub(crate) const SETTINGS: [(&str, &str); 5] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// The startup `options` value (`-c name=value …`) for the replication
/// session, escaped as libpq's `options` is: a backslash before each space
/// and backslash inside a value.
pub(crate) fn replication_options() -> String {
    let mut out = String::new();
    for (name, value) in SETTINGS {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("-c ");
        for c in format!("{name}={value}").chars() {
            if c == ' ' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// `options` with the settings sqlx does not pin on its own: sqlx sends
/// `TimeZone=UTC` and `DateStyle=ISO, MDY` as startup parameters itself;
/// `extra_float_digits` is raised to ours; `IntervalStyle` travels in
/// `options` (a connection pooler in front of the look-up database must
/// pass `options` through).
pub(crate) fn pin_lookup(options: PgConnectOptions) -> PgConnectOptions {
    options.extra_float_digits(3).options([("IntervalStyle", "postgres")])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_options_escape_the_space_in_datestyle() {
        assert_eq!(
            replication_options(),
            "-c TimeZone=UTC -c DateStyle=ISO,\\ MDY -c IntervalStyle=postgres -c extra_float_digits=3 -c bytea_output=hex"
        );
    }

    #[test]
    fn lookup_sessions_pin_what_sqlx_does_not() {
        let options = pin_lookup(PgConnectOptions::new());
        assert_eq!(options.get_options(), Some("-c IntervalStyle=postgres"));
    }
}
