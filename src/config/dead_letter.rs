//! `[dead_letter]`: where unresolvable changes go, and evictd's own schema.

use std::path::Path;

use secrecy::SecretString;

use super::issues::{Issues, is_identifier, positive};
use super::raw::RawDeadLetter;
use super::secrets::check_pg_url;
use super::settings::{MigrationMode, OnError};

#[derive(Debug, Clone)]
pub(crate) struct DeadLetterConfig {
    pub(crate) on_error: OnError,
    /// `None` without a Postgres source or `dead_letter.url`: `run` then
    /// has nowhere to write dead letters and refuses to start.
    pub(crate) url: Option<SecretString>,
    pub(crate) schema: String,
    pub(crate) migrations: MigrationMode,
    pub(crate) lookup_attempts: u32,
    /// The dead-letter topic of a Kafka source.
    pub(crate) topic: String,
}

/// Validates `[dead_letter]`; its URL defaults to the Postgres source's.
pub(crate) fn validate_dead_letter(
    raw: RawDeadLetter,
    issues: &mut Issues<'_>,
    base: &Path,
    source_url: Option<SecretString>,
) -> DeadLetterConfig {
    let on_error = match raw.on_error.as_deref().unwrap_or("dead_letter") {
        "dead_letter" => OnError::DeadLetter,
        "stop" => OnError::Stop,
        other => {
            issues.push("dead_letter.on_error", format!("unknown value `{other}` (expected dead_letter or stop)"));
            OnError::DeadLetter
        }
    };
    let own_url = issues.secret("dead_letter.url", raw.url, raw.url_file.as_deref(), base);
    if let Some(url) = &own_url {
        check_pg_url(issues, "dead_letter.url", url);
    }
    let schema = raw.schema.unwrap_or_else(|| "evictd".to_owned());
    if !is_identifier(&schema) {
        issues.push(
            "dead_letter.schema",
            format!("`{schema}` is not a schema name (lowercase letters, digits and `_`, at most 63)"),
        );
    }
    let migrations = match raw.migrations.as_deref().unwrap_or("apply") {
        "apply" => MigrationMode::Apply,
        "verify" => MigrationMode::Verify,
        other => {
            issues.push("dead_letter.migrations", format!("unknown value `{other}` (expected apply or verify)"));
            MigrationMode::Apply
        }
    };
    let lookup_attempts =
        positive(issues, "dead_letter.lookup_attempts", raw.lookup_attempts.map(u64::from), 5).min(1_000) as u32;
    let topic = raw.topic.unwrap_or_else(|| "evictd.dead-letters".to_owned());
    if topic.is_empty() || topic.len() > 249 || !topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        issues
            .push("dead_letter.topic", format!("`{topic}` is not a Kafka topic name (letters, digits, `.`, `_`, `-`)"));
    }
    DeadLetterConfig { on_error, url: own_url.or(source_url), schema, migrations, lookup_attempts, topic }
}
