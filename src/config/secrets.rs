//! Secrets in messages: database and Redis URLs carry passwords, so they
//! are redacted for logs and `check`, hidden in serde's messages, and a
//! URL's own parse error is never allowed to echo it. librdkafka
//! properties (`source.kafka.properties`) that hold a secret (a SASL
//! password, a key's passphrase, PEM key material, an OAuth client secret)
//! are shown as `****` wherever the config is printed, and their values are
//! cut out of librdkafka's messages ([`hide_property_secrets`]).

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};

use super::issues::Issues;

/// Replaces the password of every `scheme://user:password@` in `text`.
pub(crate) fn hide_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end =
            tail.find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '/' | ',')).unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = userinfo.split(':').next().unwrap_or("");
                out.push_str(user);
                if userinfo.contains(':') {
                    out.push_str(":****");
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    hide_query_passwords(&out)
}

/// Replaces the value of every `password=` (a libpq URL's query may carry
/// the password there) up to the next `&`, space, quote or comma.
fn hide_query_passwords(text: &str) -> String {
    const KEY: &str = "password=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(KEY) {
        out.push_str(&rest[..i + KEY.len()]);
        let tail = &rest[i + KEY.len()..];
        let end =
            tail.find(|c: char| c.is_whitespace() || matches!(c, '&' | '"' | '\'' | '`' | ',')).unwrap_or(tail.len());
        if end > 0 {
            out.push_str("****");
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Pushes an issue when `url` is not a Postgres URL, without quoting it.
pub(crate) fn check_pg_url(issues: &mut Issues<'_>, field: &str, url: &SecretString) {
    let text = url.expose_secret();
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        let scheme = text.split_once("://").map_or("none", |(s, _)| s);
        issues.push(field, format!("not a Postgres URL (scheme `{scheme}`; expected postgres:// or postgresql://)"));
        return;
    }
    // Read as libpq reads it (and as every connection will): the error
    // never contains the URL itself.
    match super::pg_url::PgUrl::parse(url.expose_secret()) {
        Err(e) => issues.push(field, format!("not a Postgres URL ({e})")),
        // The TLS files it names (or needs) exist, as libpq finds them.
        Ok(parsed) => {
            if let Err(e) = parsed.settle() {
                issues.push(field, e.to_string());
            }
        }
    }
}

/// A URL with its password replaced by `****`, for logs and `check`.
pub(crate) fn redact_url(url: &SecretString) -> String {
    let text = url.expose_secret();
    let Some((scheme, rest)) = text.split_once("://") else {
        return "****".to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let shown = if userinfo.contains(':') { format!("{user}:****") } else { user.to_owned() };
            let tail = tail.split('?').next().unwrap_or("");
            format!("{scheme}://{shown}@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{}", tail.split('?').next().unwrap_or("")),
    }
}

/// What a secret property's value is shown as.
pub(crate) const HIDDEN: &str = "****";

/// Whether the librdkafka property `key` holds a secret: a password or
/// passphrase (`sasl.password`, `ssl.key.password`,
/// `ssl.keystore.password`, ...), a secret (`sasl.oauthbearer.client.secret`),
/// key material in PEM (`ssl.key.pem`, or any `*.pem` naming a key), a
/// token, or `sasl.oauthbearer.config`, which carries credentials as text.
/// Matched on the lower-cased name, so a property librdkafka adds later
/// under the same words is hidden too; a certificate (`ssl.ca.pem`,
/// `ssl.certificate.pem`) and a file location are not secrets.
pub(crate) fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "passphrase", "secret", "token"].iter().any(|word| key.contains(word))
        || (key.ends_with(".pem") && key.contains("key"))
        || key == "sasl.oauthbearer.config"
        || key == "sasl.jaas.config"
}

/// `properties` with every secret value replaced by `****`, for printing.
pub(crate) fn redact_properties(properties: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    properties
        .iter()
        .map(|(key, value)| {
            let shown = if is_secret_property(key) { HIDDEN.to_owned() } else { value.clone() };
            (key.clone(), shown)
        })
        .collect()
}

/// `text` (a librdkafka message) with the value of every secret property
/// in `properties` replaced by `****`. librdkafka's own configuration
/// errors quote the value they refused ("Client config error: ... KEY
/// VALUE"), so a message about a secret property would echo it.
pub(crate) fn hide_property_secrets(text: &str, properties: &BTreeMap<String, String>) -> String {
    let mut out = text.to_owned();
    // Longest first, so that a secret containing another is replaced whole.
    let mut secrets: Vec<&str> = properties
        .iter()
        .filter(|(key, value)| is_secret_property(key) && !value.is_empty())
        .map(|(_, value)| value.as_str())
        .collect();
    secrets.sort_by_key(|value| std::cmp::Reverse(value.len()));
    for secret in secrets {
        out = out.replace(secret, HIDDEN);
    }
    out
}
