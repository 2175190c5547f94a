//! The issue collector: every problem in a configuration is gathered, each
//! with its place (`file:line:col` of the field, the `EVICTD__…` variable
//! that overrode it, or the file alone), so that one run of `check` shows
//! them all. Also the small checks several sections share.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use secrecy::SecretString;

use super::ENV_PREFIX;
use crate::diagnostic::{SourceFile, write_lines};

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigIssue {
    /// `file:line:col`, an environment variable, or the file alone.
    pub(crate) place: String,
    pub(crate) field: String,
    pub(crate) message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.place, self.message)
        } else {
            write!(f, "{}: {}: {}", self.place, self.field, self.message)
        }
    }
}

/// Every problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) struct ConfigError(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_lines(f, &self.0)
    }
}

/// The environment variable that overrides dotted `field`.
pub(crate) fn env_name(field: &str) -> String {
    let parts: Vec<String> = field.split('.').map(|p| p.to_uppercase()).collect();
    format!("{ENV_PREFIX}__{}", parts.join("__"))
}

/// The problems found so far, and what is needed to place them.
pub(crate) struct Issues<'a> {
    pub(crate) source: &'a SourceFile,
    pub(crate) overrides: &'a HashMap<String, String>,
    pub(crate) list: Vec<ConfigIssue>,
}

impl Issues<'_> {
    pub(crate) fn push(&mut self, field: &str, message: impl Into<String>) {
        let var = env_name(field);
        let place = if self.overrides.contains_key(&var) {
            var
        } else {
            match self.source.span_of(field) {
                Some(span) => self.source.location(span.start).to_string(),
                None => self.source.path.display().to_string(),
            }
        };
        self.list.push(ConfigIssue { place, field: field.to_owned(), message: message.into() });
    }

    /// A secret given inline or through a file; never both.
    pub(crate) fn secret(
        &mut self,
        field: &str,
        inline: Option<SecretString>,
        file: Option<&str>,
        base: &Path,
    ) -> Option<SecretString> {
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.push(&format!("{field}_file"), format!("set either `{field}` or `{field}_file`, not both"));
                None
            }
            (Some(s), None) => Some(s),
            (None, Some(f)) => {
                let path = base.join(f);
                match std::fs::read_to_string(&path) {
                    Ok(text) => Some(SecretString::from(text.trim().to_owned())),
                    Err(e) => {
                        self.push(&format!("{field}_file"), format!("cannot read {}: {e}", path.display()));
                        None
                    }
                }
            }
            (None, None) => None,
        }
    }
}

/// A Postgres-style identifier: lowercase letters, digits and `_`, at most 63.
pub(crate) fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `value`, or `default` when unset; 0 is an issue (and gives `default`).
pub(crate) fn positive(issues: &mut Issues<'_>, field: &str, value: Option<u64>, default: u64) -> u64 {
    match value {
        Some(0) => {
            issues.push(field, "must be greater than 0");
            default
        }
        Some(v) => v,
        None => default,
    }
}
