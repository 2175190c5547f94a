//! Loading: the file alone first (so its errors get a line), then the
//! `EVICTD__SECTION__KEY` environment layered on top with the `config`
//! crate (so a bad override names its variable), then validation.

use std::collections::HashMap;
use std::path::Path;

use super::issues::{ConfigError, ConfigIssue};
use super::raw::RawConfig;
use super::secrets::hide_passwords;
use super::{Config, ENV_PREFIX};
use crate::diagnostic::{SourceFile, plain_serde_message};

/// Loads `path` with overrides from `env` (variables named
/// `EVICTD__SECTION__KEY`; others are ignored).
pub(crate) fn load_with_env(path: &Path, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(vec![ConfigIssue {
            place: path.display().to_string(),
            field: String::new(),
            message: format!("cannot read the config file: {e}"),
        }])
    })?;
    load_text(path, text, env)
}

/// Loads already-read config `text` (named `path` in errors and used as the
/// base of relative paths) with overrides from `env`: everything
/// [`load_with_env`] does after reading the file.
pub(crate) fn load_text(path: &Path, text: String, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let source = SourceFile::new(path, text);
    let overrides: HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The file alone first: its errors get a line. A file that only lacks
    // what the environment gives (a required field such as the brokers, set
    // per environment by a Deployment) is fine once they are layered.
    if let Err(e) = toml::from_str::<RawConfig>(&source.text)
        && (overrides.is_empty() || merge(&source.text, &overrides).is_err())
    {
        let offset = e.span().map_or(0, |s| s.start);
        return Err(ConfigError(vec![ConfigIssue {
            place: source.location(offset).to_string(),
            field: source.field_at(offset).unwrap_or_default(),
            message: plain_message(e.message()),
        }]));
    }
    let raw = match merge(&source.text, &overrides) {
        Ok(raw) => raw,
        Err(e) => {
            // Find the variables that fail on their own, to name them.
            let mut culprits: Vec<&String> =
                overrides.iter().filter(|(k, v)| merge(&source.text, &single(k, v)).is_err()).map(|(k, _)| k).collect();
            culprits.sort();
            let place = if culprits.is_empty() {
                let mut all: Vec<&String> = overrides.keys().collect();
                all.sort();
                format!("environment ({})", all.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
            } else {
                culprits.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            };
            return Err(ConfigError(vec![ConfigIssue {
                place,
                field: String::new(),
                message: format!("override rejected: {}", plain_message(&e.to_string())),
            }]));
        }
    };
    raw.validate(&source, &overrides)
}

fn single(key: &str, value: &str) -> HashMap<String, String> {
    HashMap::from([(key.to_owned(), value.to_owned())])
}

/// The file with the environment layered on top (the `config` crate).
fn merge(text: &str, overrides: &HashMap<String, String>) -> Result<RawConfig, config::ConfigError> {
    let environment = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("graph.paths")
        .with_list_parse_key("source.kafka.topics")
        .source(Some(overrides.clone().into_iter().collect()));
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(environment)
        .build()
        .and_then(|c| c.try_deserialize())
}

/// A serde message in an operator's words, with any URL's password hidden
/// (a URL given where a table belongs is echoed back by serde).
fn plain_message(message: &str) -> String {
    plain_serde_message(&hide_passwords(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const KAFKA_WITHOUT_BROKERS: &str =
        "[redis.primary]\nurl = \"redis://h:6379\"\n[source]\nkind = \"kafka\"\n[source.kafka]\ntopics = [\"t\"]\n";

    /// A required field may come from the environment alone (a Deployment
    /// gives the brokers or the URL per environment, the file the rest).
    #[test]
    fn a_required_field_missing_from_the_file_may_come_from_the_environment() {
        let path = Path::new("evictd.toml");
        let loaded = load_text(
            path,
            KAFKA_WITHOUT_BROKERS.into(),
            &env(&[("EVICTD__SOURCE__KAFKA__BROKERS", "kafka-0:9092,kafka-1:9092")]),
        );
        assert!(loaded.is_ok(), "{:?}", loaded.err().map(|e| e.to_string()));
    }

    /// Without it, the file's own error is reported, with its line.
    #[test]
    fn a_required_field_missing_everywhere_is_reported_at_its_section() {
        let path = Path::new("evictd.toml");
        let Err(e) = load_text(path, KAFKA_WITHOUT_BROKERS.into(), &env(&[("EVICTD__BATCH__MAX_EFFECTS", "7")])) else {
            panic!("a Kafka source without brokers loaded");
        };
        let text = e.to_string();
        assert!(text.contains("evictd.toml:5:1") && text.contains("missing field `brokers`"), "{text}");
    }
}
