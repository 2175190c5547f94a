//! Secrets in messages: database and Redis URLs carry passwords, so they
//! are redacted for logs and `check`, hidden in serde's messages, and a
//! URL's own parse error is never allowed to echo it.

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
