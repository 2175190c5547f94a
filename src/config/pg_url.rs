//! A Postgres connection URL read exactly as libpq reads a URI, once, for
//! every connection evictd makes: the replication stream
//! (pgwire-replication) and the sqlx pools (look-ups, dead letters, setup,
//! the slot's lock) take their host, user, password and TLS settings from
//! the one [`PgUrl`], so the same URL behaves the same on both.
//!
//! libpq's rules kept here (<https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS>):
//! - user, password, host, database and every query value are
//!   **percent-decoded only**: `+` stays `+` (it is not a form), `%2B` is
//!   `+`, `%20` a space; a `%` not followed by two hex digits, and `%00`, are
//!   errors;
//! - a query parameter overrides what the URL's parts say (`?password=`,
//!   `?user=`, `?host=`, `?port=`, `?dbname=`), the last one wins;
//! - what neither gives comes from the environment libpq reads (`PGHOST`,
//!   `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`,
//!   `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`), then libpq's defaults
//!   (`sslmode=prefer`, port 5432, the database named as the user);
//! - `sslrootcert=system` makes `verify-full` the default and refuses a
//!   weaker `sslmode`; `ssl=true` is `sslmode=require`.
//!
//! Parsing reads no file; [`PgUrl::settle`] then finds the root
//! certificate that applies (`sslrootcert=FILE`, the system bundle for
//! `system`, else libpq's `~/.postgresql/root.crt` when it exists) and the
//! mode it makes, checking that the files named exist: validation calls it
//! so that `check` names the field, and every connection (`crate::pgconn`)
//! connects with its result. The password is a [`SecretString`], and no
//! error here quotes the URL.

use std::path::PathBuf;

use secrecy::SecretString;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain only.
    Disable,
    /// Plain first; TLS (unverified) if the server refuses the plain connection.
    Allow,
    /// TLS (unverified) if the server offers it, plain if it refuses TLS.
    Prefer,
    /// TLS, the certificate unverified, unless a root certificate is
    /// given: then as `verify-ca` (libpq's rule).
    Require,
    /// TLS, the chain verified against the root certificate.
    VerifyCa,
    /// TLS, the chain and the host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// As libpq spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate chain is checked.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// `sslrootcert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of trusted CA certificates (a provider's bundle).
    File(PathBuf),
    /// `sslrootcert=system`: the system's trusted roots.
    System,
}

/// A Postgres URL as libpq reads it; see the module docs.
#[derive(Debug, Clone)]
pub struct PgUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<SecretString>,
    pub database: String,
    /// As given (or libpq's default): [`PgUrl::effective_mode`] applies
    /// libpq's `require` + root certificate rule.
    pub sslmode: SslMode,
    pub root_cert: Option<RootCert>,
    /// `sslcert` and `sslkey`: a client certificate, both or neither.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub application_name: Option<String>,
    /// `options` (e.g. `-c statement_timeout=5s`).
    pub options: Option<String>,
}

/// Why a URL is not a Postgres URL evictd can use. Never quotes the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgUrlError {
    #[error("expected postgres:// or postgresql://")]
    Scheme,
    #[error("{0}: invalid percent-encoding (a `%` must be followed by two hex digits)")]
    Percent(&'static str),
    #[error("{0}: %00 is not allowed")]
    Nul(&'static str),
    #[error("{0}: not UTF-8 once percent-decoded")]
    Utf8(&'static str),
    #[error("several hosts are not supported: give one host")]
    SeveralHosts,
    #[error("unix-domain sockets are not supported: give a TCP host")]
    Socket,
    #[error("port `{0}` is not a number from 1 to 65535")]
    Port(String),
    #[error("query parameter without `=`")]
    QuerySeparator,
    #[error("unknown sslmode `{0}` (disable, allow, prefer, require, verify-ca or verify-full)")]
    SslMode(String),
    #[error("`{0}` is not a connection parameter libpq knows")]
    UnknownParameter(String),
    #[error("sslcert and sslkey go together: give both or neither")]
    ClientCertHalf,
    #[error(
        "weak sslmode `{0}` may not be used with sslrootcert=system (use verify-full, the default with sslrootcert=system)"
    )]
    WeakWithSystem(&'static str),
    #[error(
        "sslmode={0} verifies the server's certificate but no root certificate is given: set sslrootcert=FILE (your provider's CA bundle), or sslrootcert=system for the system's trusted roots, or use sslmode=require (no verification)"
    )]
    NoRootCert(&'static str),
    #[error(
        "sslrootcert=system: no system CA bundle found (SSL_CERT_FILE, /etc/ssl/certs/ca-certificates.crt, /etc/pki/tls/certs/ca-bundle.crt, /etc/ssl/cert.pem); install ca-certificates or give sslrootcert=FILE"
    )]
    NoSystemBundle,
    #[error("{0} file `{1}` does not exist")]
    MissingFile(&'static str, PathBuf),
}

/// The TLS settings a [`PgUrl`] connects with once its files are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// `require` already turned into `verify-ca` when a root certificate applies.
    pub mode: SslMode,
    pub root: Option<PathBuf>,
}

/// libpq keywords evictd accepts in a URL's query and does not use (its own
/// timeouts and keepalives apply): they are ignored rather than refused,
/// as a URL written for psql may carry them.
const IGNORED: &[&str] = &[
    "connect_timeout",
    "client_encoding",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "target_session_attrs",
    "gssencmode",
    "sslcompression",
    "sslsni",
    "sslcrl",
    "sslcrldir",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslpassword",
    "requirepeer",
    "krbsrvname",
    "channel_binding",
    "passfile",
    "service",
];

impl PgUrl {
    /// Reads `url` with the process environment as libpq's fallback.
    pub fn parse(url: &str) -> Result<PgUrl, PgUrlError> {
        PgUrl::parse_with_env(url, |name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Reads `url` with `env` as the environment (tests pass their own).
    pub fn parse_with_env(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<PgUrl, PgUrlError> {
        let rest =
            url.strip_prefix("postgresql://").or_else(|| url.strip_prefix("postgres://")).ok_or(PgUrlError::Scheme)?;
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], Some(&before_query[i + 1..])),
            None => (before_query, None),
        };
        // libpq: the first `@` ends the user's part (a password's own `@`
        // must be `%40`).
        let (userinfo, hostport) = match authority.find('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let mut user = None;
        let mut password = None;
        if let Some(info) = userinfo {
            let (u, p) = match info.find(':') {
                Some(i) => (&info[..i], Some(&info[i + 1..])),
                None => (info, None),
            };
            if !u.is_empty() {
                user = Some(decode(u, "user")?);
            }
            if let Some(p) = p {
                password = Some(decode(p, "password")?);
            }
        }
        if hostport.contains(',') {
            return Err(PgUrlError::SeveralHosts);
        }
        let (host, port) = split_host_port(hostport)?;
        let mut host = host.map(|h| decode(h, "host")).transpose()?;
        let mut port = port.map(|p| decode(p, "port")).transpose()?;
        let mut database = path.filter(|p| !p.is_empty()).map(|p| decode(p, "database")).transpose()?;
        let mut sslmode = None;
        let mut root_cert = None;
        let mut sslcert = None;
        let mut sslkey = None;
        let mut application_name = None;
        let mut options = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or(PgUrlError::QuerySeparator)?;
            let key = decode(key, "query parameter")?;
            let value = decode(value, "query value")?;
            match key.as_str() {
                "host" | "hostaddr" => host = Some(value),
                "port" => port = Some(value),
                "dbname" => database = Some(value),
                "user" => user = Some(value),
                "password" => password = Some(value),
                "sslmode" => sslmode = Some(value),
                // JDBC's spelling, which libpq accepts in a URI.
                "ssl" if value == "true" => sslmode = Some("require".to_owned()),
                "sslrootcert" => root_cert = Some(value),
                "sslcert" => sslcert = Some(value),
                "sslkey" => sslkey = Some(value),
                "application_name" => application_name = Some(value),
                "options" => options = Some(value),
                other if IGNORED.contains(&other) => {}
                other => return Err(PgUrlError::UnknownParameter(other.to_owned())),
            }
        }
        let host = host.or_else(|| env("PGHOST")).unwrap_or_else(|| "localhost".to_owned());
        if host.starts_with('/') {
            return Err(PgUrlError::Socket);
        }
        if host.contains(',') {
            return Err(PgUrlError::SeveralHosts);
        }
        let port = match port.or_else(|| env("PGPORT")) {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or(PgUrlError::Port(p))?,
            None => 5432,
        };
        let user = user.or_else(|| env("PGUSER")).unwrap_or_else(|| "postgres".to_owned());
        let password = password.or_else(|| env("PGPASSWORD")).map(SecretString::from);
        let database = database.or_else(|| env("PGDATABASE")).unwrap_or_else(|| user.clone());
        let root_cert = root_cert
            .or_else(|| env("PGSSLROOTCERT"))
            .filter(|r| !r.is_empty())
            .map(|r| if r == "system" { RootCert::System } else { RootCert::File(PathBuf::from(r)) });
        let sslmode = match sslmode.or_else(|| env("PGSSLMODE")) {
            Some(m) => SslMode::parse(&m).ok_or(PgUrlError::SslMode(m))?,
            None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if root_cert == Some(RootCert::System) && sslmode != SslMode::VerifyFull {
            return Err(PgUrlError::WeakWithSystem(sslmode.as_str()));
        }
        let client_cert = match (sslcert.or_else(|| env("PGSSLCERT")), sslkey.or_else(|| env("PGSSLKEY"))) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            _ => return Err(PgUrlError::ClientCertHalf),
        };
        Ok(PgUrl { host, port, user, password, database, sslmode, root_cert, client_cert, application_name, options })
    }

    /// Finds the files the URL's TLS uses, as libpq does, in the process's
    /// environment (`HOME`, `SSL_CERT_FILE`).
    pub fn settle(&self) -> Result<Settled, PgUrlError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        self.settle_in(home.as_deref(), std::env::var_os("SSL_CERT_FILE").map(PathBuf::from))
    }

    /// [`PgUrl::settle`] with the home directory and `SSL_CERT_FILE` given.
    pub fn settle_in(
        &self,
        home: Option<&std::path::Path>,
        ssl_cert_file: Option<PathBuf>,
    ) -> Result<Settled, PgUrlError> {
        let root = match &self.root_cert {
            Some(RootCert::File(path)) => {
                if !path.exists() {
                    return Err(PgUrlError::MissingFile("sslrootcert", path.clone()));
                }
                Some(path.clone())
            }
            Some(RootCert::System) => Some(system_bundle(ssl_cert_file)?),
            // libpq's default root certificate file, when it exists.
            None => home.map(|h| h.join(".postgresql/root.crt")).filter(|p| p.exists()),
        };
        if let Some((cert, key)) = &self.client_cert {
            for (what, path) in [("sslcert", cert), ("sslkey", key)] {
                if !path.exists() {
                    return Err(PgUrlError::MissingFile(what, path.clone()));
                }
            }
        }
        let mode = self.effective_mode(root.is_some());
        if mode.verifies() && root.is_none() {
            return Err(PgUrlError::NoRootCert(mode.as_str()));
        }
        Ok(Settled { mode, root })
    }

    /// The mode connections use given the root certificate that applies
    /// (`has_root`: given, or libpq's default file exists): libpq treats
    /// `require` with a root certificate as `verify-ca`.
    pub fn effective_mode(&self, has_root: bool) -> SslMode {
        match self.sslmode {
            SslMode::Require if has_root => SslMode::VerifyCa,
            mode => mode,
        }
    }
}

/// The system's CA bundle, where OpenSSL (libpq's) would find it.
fn system_bundle(ssl_cert_file: Option<PathBuf>) -> Result<PathBuf, PgUrlError> {
    ssl_cert_file
        .into_iter()
        .chain(
            ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
                .map(PathBuf::from),
        )
        .find(|p| p.exists())
        .ok_or(PgUrlError::NoSystemBundle)
}

/// `host[:port]` or `[v6][:port]`, each possibly empty.
fn split_host_port(hostport: &str) -> Result<(Option<&str>, Option<&str>), PgUrlError> {
    if hostport.is_empty() {
        return Ok((None, None));
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let end = v6.find(']').ok_or(PgUrlError::Port(String::new()))?;
        let after = &v6[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(PgUrlError::Port(String::new())),
        };
        (&v6[..end], port)
    } else {
        match hostport.rfind(':') {
            Some(i) => (&hostport[..i], Some(&hostport[i + 1..])),
            None => (hostport, None),
        }
    };
    Ok(((!host.is_empty()).then_some(host), port.filter(|p| !p.is_empty())))
}

/// libpq's `conninfo_uri_decode`: `%XX` only, never `+`.
fn decode(text: &str, what: &'static str) -> Result<String, PgUrlError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PgUrlError::Percent(what))?;
            let hex = std::str::from_utf8(hex).map_err(|_| PgUrlError::Percent(what))?;
            let byte = u8::from_str_radix(hex, 16).map_err(|_| PgUrlError::Percent(what))?;
            if byte == 0 {
                return Err(PgUrlError::Nul(what));
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PgUrlError::Utf8(what))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn parse(url: &str) -> Result<PgUrl, PgUrlError> {
        PgUrl::parse_with_env(url, |_| None)
    }

    fn password(url: &str) -> String {
        parse(url).unwrap().password.map(|p| p.expose_secret().to_owned()).unwrap_or_default()
    }

    #[test]
    fn password_plus_stays_a_plus_as_in_libpq() {
        assert_eq!(password("postgres://u:a+b@h/db"), "a+b");
        assert_eq!(password("postgres://u:a%2Bb@h/db"), "a+b");
        assert_eq!(password("postgres://u:p%2Bw%25d%40x%2Fy%20z@h/db"), "p+w%d@x/y z");
    }

    #[test]
    fn user_and_database_are_percent_decoded() {
        let url = parse("postgresql://us%40er:pw@db.example.com:6432/my%20db").unwrap();
        assert_eq!(
            (url.user.as_str(), url.host.as_str(), url.port, url.database.as_str()),
            ("us@er", "db.example.com", 6432, "my db")
        );
    }

    #[test]
    fn query_password_overrides_the_userinfo_one_and_keeps_its_plus() {
        assert_eq!(password("postgres://u:old@h/db?password=new+one"), "new+one");
        assert_eq!(password("postgres://u@h/db?password=a%26b"), "a&b");
    }

    #[test]
    fn bad_percent_encoding_and_nul_are_refused() {
        assert_eq!(parse("postgres://u:a%zz@h/db").unwrap_err(), PgUrlError::Percent("password"));
        assert_eq!(parse("postgres://u:a%2@h/db").unwrap_err(), PgUrlError::Percent("password"));
        assert_eq!(parse("postgres://u:a%00@h/db").unwrap_err(), PgUrlError::Nul("password"));
    }

    #[test]
    fn defaults_are_libpq_ones() {
        let url = parse("postgres://h").unwrap();
        assert_eq!(
            (url.port, url.user.as_str(), url.database.as_str(), url.sslmode),
            (5432, "postgres", "postgres", SslMode::Prefer)
        );
        let url = parse("postgres://alice@h").unwrap();
        assert_eq!(url.database, "alice", "the database defaults to the user's name");
    }

    #[test]
    fn environment_fills_only_what_the_url_leaves_out() {
        let env = |k: &str| match k {
            "PGPASSWORD" => Some("from env".to_owned()),
            "PGSSLMODE" => Some("verify-full".to_owned()),
            "PGSSLROOTCERT" => Some("/ca.pem".to_owned()),
            _ => None,
        };
        let url = PgUrl::parse_with_env("postgres://u@h/db", env).unwrap();
        assert_eq!(url.password.unwrap().expose_secret(), "from env");
        assert_eq!(url.sslmode, SslMode::VerifyFull);
        assert_eq!(url.root_cert, Some(RootCert::File("/ca.pem".into())));
        let url = PgUrl::parse_with_env("postgres://u:pw@h/db?sslmode=disable", env).unwrap();
        assert_eq!(url.password.unwrap().expose_secret(), "pw");
        assert_eq!(url.sslmode, SslMode::Disable);
    }

    #[test]
    fn require_with_a_root_certificate_is_verify_ca() {
        let url = parse("postgres://h/db?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(url.effective_mode(true), SslMode::VerifyCa);
        assert_eq!(parse("postgres://h/db?sslmode=require").unwrap().effective_mode(false), SslMode::Require);
    }

    #[test]
    fn sslrootcert_system_defaults_to_verify_full_and_refuses_weaker_modes() {
        assert_eq!(parse("postgres://h/db?sslrootcert=system").unwrap().sslmode, SslMode::VerifyFull);
        assert_eq!(
            parse("postgres://h/db?sslrootcert=system&sslmode=require").unwrap_err(),
            PgUrlError::WeakWithSystem("require")
        );
    }

    #[test]
    fn unknown_modes_parameters_and_half_client_certs_are_refused() {
        assert!(matches!(parse("postgres://h/db?sslmode=on"), Err(PgUrlError::SslMode(_))));
        assert!(matches!(parse("postgres://h/db?sslmod=require"), Err(PgUrlError::UnknownParameter(_))));
        assert_eq!(parse("postgres://h/db?sslcert=/c.pem").unwrap_err(), PgUrlError::ClientCertHalf);
        assert!(parse("postgres://h/db?connect_timeout=10&application_name=x").is_ok());
        assert_eq!(parse("postgres://h1,h2/db").unwrap_err(), PgUrlError::SeveralHosts);
        assert_eq!(parse("mysql://h/db").unwrap_err(), PgUrlError::Scheme);
    }

    fn settle(url: &str, home: Option<&std::path::Path>) -> Result<Settled, PgUrlError> {
        parse(url).unwrap().settle_in(home, None)
    }

    #[test]
    fn verify_modes_without_a_root_certificate_name_the_fix() {
        let e = settle("postgres://h/db?sslmode=verify-full", None).unwrap_err().to_string();
        assert!(e.contains("sslrootcert=FILE") && e.contains("sslrootcert=system"), "{e}");
    }

    #[test]
    fn missing_tls_files_are_named() {
        let e = settle("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem", None).unwrap_err();
        assert_eq!(e, PgUrlError::MissingFile("sslrootcert", "/nonexistent/ca.pem".into()));
        let e = settle("postgres://h/db?sslcert=/nonexistent/c.pem&sslkey=/dev/null", None).unwrap_err();
        assert_eq!(e, PgUrlError::MissingFile("sslcert", "/nonexistent/c.pem".into()));
    }

    #[test]
    fn libpq_default_root_certificate_makes_require_verify() {
        let home = std::env::temp_dir().join(format!("evictd-pg-url-{}", std::process::id()));
        std::fs::create_dir_all(home.join(".postgresql")).unwrap();
        std::fs::write(home.join(".postgresql/root.crt"), "").unwrap();
        let settled = settle("postgres://h/db?sslmode=require", Some(&home)).unwrap();
        assert_eq!(settled.mode, SslMode::VerifyCa);
        assert_eq!(settled.root, Some(home.join(".postgresql/root.crt")));
        assert_eq!(settle("postgres://h/db?sslmode=require", None).unwrap().mode, SslMode::Require);
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn sslrootcert_system_is_the_ssl_cert_file_first_as_in_openssl() {
        let settled =
            parse("postgres://h/db?sslrootcert=system").unwrap().settle_in(None, Some("/dev/null".into())).unwrap();
        assert_eq!(settled, Settled { mode: SslMode::VerifyFull, root: Some("/dev/null".into()) });
    }

    #[test]
    fn ipv6_hosts_and_ssl_true() {
        let url = parse("postgres://[::1]:5433/db?ssl=true").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.sslmode), ("::1", 5433, SslMode::Require));
    }
}
