//! Connecting to Postgres as libpq would: the one place a source, look-up
//! or dead-letter URL becomes sqlx's connect options and the replication
//! stream's TLS settings, from one [`PgUrl`] (`config::pg_url`), so that
//! the replication connection and every pool treat the same URL the same
//! way (docs/tls.md).
//!
//! The root certificate and the mode it makes (libpq's file rules) come
//! from [`PgUrl::settle`]; what libpq decides while connecting is decided
//! here the same way:
//! - `prefer`: TLS when the server offers it, plain when it answers the
//!   TLS request with "N"; `allow`: plain, then TLS if the server refused
//!   the plain connection (for the replication stream at every start; for
//!   a pool connected at once, by one probe when it is built; the pools
//!   connected lazily, look-ups and dead letters, take `prefer`'s rule,
//!   which connects wherever `allow` does).
//!
//! Invariants: the sqlx options never read `~/.pgpass` (the replication
//! client cannot), and every field they take is set from the [`PgUrl`],
//! so sqlx's own reading of the environment cannot make the two differ.
//! Under `prefer` and `allow` the certificate is never verified (sqlx
//! cannot); verification needs `require` with a root certificate or a
//! `verify-*` mode.

use std::path::PathBuf;

use pgwire_replication::TlsConfig;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::config::pg_url::{PgUrl, PgUrlError, Settled, SslMode};

/// Why a URL cannot be connected with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgConnError {
    #[error("not a usable Postgres URL: {0}")]
    Url(#[from] PgUrlError),
}

impl From<PgConnError> for sqlx::Error {
    fn from(e: PgConnError) -> sqlx::Error {
        sqlx::Error::Configuration(Box::new(e))
    }
}

/// A URL with its TLS settings settled: what both clients are given.
#[derive(Debug, Clone)]
pub(crate) struct Conn {
    pub(crate) url: PgUrl,
    /// `require` already turned into `verify-ca` when a root certificate applies.
    pub(crate) mode: SslMode,
    pub(crate) root: Option<PathBuf>,
}

impl Conn {
    /// Parses `url` and settles its TLS files (reads the file system).
    pub(crate) fn new(url: &str) -> Result<Conn, PgConnError> {
        let url = PgUrl::parse(url)?;
        let Settled { mode, root } = url.settle()?;
        Ok(Conn { url, mode, root })
    }

    /// sqlx's options for `mode` (the URL's, or `allow`'s second try).
    fn sqlx_options(&self, mode: SslMode) -> PgConnectOptions {
        let url = &self.url;
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(&url.host)
            .port(url.port)
            .username(&url.user)
            .database(&url.database)
            .ssl_mode(match mode {
                SslMode::Disable | SslMode::Allow => PgSslMode::Disable,
                SslMode::Prefer => PgSslMode::Prefer,
                SslMode::Require => PgSslMode::Require,
                SslMode::VerifyCa => PgSslMode::VerifyCa,
                SslMode::VerifyFull => PgSslMode::VerifyFull,
            });
        if let Some(password) = &url.password {
            options = options.password(password.expose_secret());
        }
        if let Some(root) = &self.root {
            options = options.ssl_root_cert(root);
        }
        if let Some((cert, key)) = &url.client_cert {
            options = options.ssl_client_cert(cert).ssl_client_key(key);
        }
        if let Some(name) = &url.application_name {
            options = options.application_name(name);
        }
        if let Some(extra) = &url.options {
            // libpq's `options` is a command line of `-c name=value`.
            let pairs: Vec<(&str, &str)> = extra
                .split_whitespace()
                .filter(|w| *w != "-c")
                .filter_map(|w| w.strip_prefix("-c").unwrap_or(w).split_once('='))
                .collect();
            options = options.options(pairs);
        }
        options
    }

    /// The replication stream's TLS settings for `mode`.
    pub(crate) fn replication_tls(&self, mode: SslMode) -> TlsConfig {
        let mut tls = match mode {
            SslMode::Disable | SslMode::Allow => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig { mode: pgwire_replication::SslMode::Prefer, ..TlsConfig::default() },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(self.root.clone()),
            SslMode::VerifyFull => TlsConfig::verify_full(self.root.clone()),
        };
        if let Some((cert, key)) = &self.url.client_cert {
            tls = tls.with_client_cert(cert, key);
        }
        // An IP address is checked against the certificate's IP
        // addresses, as libpq does; pgwire-replication only does that when
        // the name to check is given explicitly.
        if self.url.host.parse::<std::net::IpAddr>().is_ok() {
            tls = tls.with_sni_hostname(self.url.host.clone());
        }
        tls
    }

    /// The replication stream's TLS settings for `mode`, with
    /// pgwire-replication 0.5's `verify-ca` worked around: its chain-only
    /// verifier lets a host name mismatch through only as rustls'
    /// `NotValidForName`, and rustls 0.23 reports `NotValidForNameContext`,
    /// so every certificate whose names leave out the host was refused.
    /// Around it, one handshake verifies the chain against the root
    /// certificate and learns a DNS name the certificate carries; the
    /// stream is then verified in full (chain and that name), which is
    /// what `verify-ca` asks of it.
    pub(crate) async fn replication_tls_for(
        &self,
        mode: SslMode,
    ) -> Result<TlsConfig, pgwire_replication::PgWireError> {
        let tls = self.replication_tls(mode);
        if mode != SslMode::VerifyCa {
            return Ok(tls);
        }
        let mut check = TlsConfig { mode: pgwire_replication::SslMode::VerifyFull, ..tls.clone() };
        check.sni_hostname = Some(self.url.host.clone());
        let tcp = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port)).await?;
        let name = match pgwire_replication::tls::rustls::maybe_upgrade_to_tls(tcp, &check, &self.url.host).await {
            // The host is one of the certificate's names.
            Ok(_) => self.url.host.clone(),
            Err(pgwire_replication::PgWireError::Tls(message)) if message.contains("not valid for name") => {
                presented_dns_name(&message).ok_or_else(|| {
                    pgwire_replication::PgWireError::Tls(format!(
                        "{message} (sslmode=verify-ca: the certificate names no DNS name to verify it against)"
                    ))
                })?
            }
            Err(e) => return Err(e),
        };
        Ok(TlsConfig { mode: pgwire_replication::SslMode::VerifyFull, sni_hostname: Some(name), ..tls })
    }

    /// The modes to try in turn: `allow` tries plain, then TLS.
    pub(crate) fn attempts(&self) -> &'static [SslMode] {
        match self.mode {
            SslMode::Allow => &[SslMode::Allow, SslMode::Require],
            SslMode::Disable => &[SslMode::Disable],
            SslMode::Prefer => &[SslMode::Prefer],
            SslMode::Require => &[SslMode::Require],
            SslMode::VerifyCa => &[SslMode::VerifyCa],
            SslMode::VerifyFull => &[SslMode::VerifyFull],
        }
    }

    /// sqlx's options without a probe, for the pools connected lazily
    /// (look-ups, dead letters), built where nothing can be awaited: there
    /// `allow` takes `prefer`'s rule, the one that connects wherever
    /// `allow` would (TLS when offered, else plain), rather than plain,
    /// which a server requiring TLS refuses.
    pub(crate) fn options_now(&self) -> PgConnectOptions {
        self.sqlx_options(if self.mode == SslMode::Allow { SslMode::Prefer } else { self.mode })
    }

    /// sqlx's options; under `allow`, a plain connection is tried first and
    /// TLS chosen when the server refuses it (an unreachable server keeps
    /// plain: the pool's own retries meet the same server later).
    pub(crate) async fn options(&self) -> PgConnectOptions {
        use sqlx::Connection as _;
        if self.mode != SslMode::Allow {
            return self.sqlx_options(self.mode);
        }
        let plain = self.sqlx_options(SslMode::Allow);
        let probe = tokio::time::timeout(std::time::Duration::from_secs(10), sqlx::PgConnection::connect_with(&plain));
        match probe.await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                plain
            }
            Ok(Err(sqlx::Error::Database(_))) => self.sqlx_options(SslMode::Require),
            _ => plain,
        }
    }
}

/// The first `DnsName("…")` of rustls' "certificate is only valid for …".
fn presented_dns_name(message: &str) -> Option<String> {
    let (_, after) = message.split_once("only valid for")?;
    let (_, name) = after.split_once("DnsName(\"")?;
    let (name, _) = name.split_once('"')?;
    (!name.is_empty() && !name.starts_with('*')).then(|| name.to_owned())
}

/// sqlx's connect options for `url`, as libpq would connect.
pub(crate) async fn connect_options(url: &str) -> Result<PgConnectOptions, PgConnError> {
    Ok(Conn::new(url)?.options().await)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn settle(url: &str) -> Conn {
        let url = PgUrl::parse_with_env(url, |_| None).unwrap();
        let Settled { mode, root } = url.settle_in(None, None).unwrap();
        Conn { url, mode, root }
    }

    #[test]
    fn both_clients_get_the_same_mode_and_files() {
        let conn = settle("postgres://u:p%2Bw@127.0.0.1:5/db?sslmode=verify-full&sslrootcert=/dev/null");
        let tls = conn.replication_tls(conn.mode);
        assert_eq!(tls.mode, pgwire_replication::SslMode::VerifyFull);
        assert_eq!(tls.ca_pem_path.as_deref(), Some(Path::new("/dev/null")));
        assert_eq!(tls.sni_hostname.as_deref(), Some("127.0.0.1"), "an IP host is checked as an IP");
        let options = conn.sqlx_options(conn.mode);
        assert!(matches!(options.get_ssl_mode(), PgSslMode::VerifyFull));
        assert_eq!((options.get_host(), options.get_port(), options.get_username()), ("127.0.0.1", 5, "u"));
    }

    #[test]
    fn a_dns_name_is_read_from_rustls_name_mismatch() {
        let message = "TLS handshake failed: invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only valid for DnsName(\"localhost\")";
        assert_eq!(presented_dns_name(message).as_deref(), Some("localhost"));
        assert_eq!(presented_dns_name("certificate is only valid for DnsName(\"*.example.com\")"), None);
        assert_eq!(presented_dns_name("UnknownIssuer"), None);
    }

    #[test]
    fn allow_tries_plain_then_tls() {
        let conn = settle("postgres://h/db?sslmode=allow");
        assert_eq!(conn.attempts(), &[SslMode::Allow, SslMode::Require]);
        assert_eq!(conn.replication_tls(SslMode::Allow).mode, pgwire_replication::SslMode::Disable);
        assert_eq!(conn.replication_tls(SslMode::Require).mode, pgwire_replication::SslMode::Require);
    }
}
