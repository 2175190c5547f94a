//! TLS for every Redis connection evictd or an application's subscriber
//! makes: `rediss://` URLs verified against a CA bundle file (a managed
//! service's, or a private CA's) instead of the public roots, optionally
//! with a client certificate. The sink's connections (invalidations,
//! broadcasts, heartbeats) and the subscriber's (commands, pub/sub, the
//! stream reader) are all built here, so one target's settings apply to
//! every connection to it (docs/tls.md).
//!
//! Without a [`RedisTls`], a `rediss://` URL is verified against the
//! Mozilla roots compiled in (webpki-roots); `rediss://…/#insecure` skips
//! the certificate check entirely (test set-ups only). With a CA file, only
//! that file's CAs are trusted. The files are read when connecting, so a
//! renewed certificate is picked up by the next connection.

use std::path::PathBuf;

use redis::cluster::ClusterClientBuilder;
use redis::{ClientTlsConfig, RedisResult, TlsCertificates};

/// A target's CA bundle and client certificate (PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// The CAs that may sign the server's certificate; `None`: the public roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key, for servers that ask for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl RedisTls {
    /// The certificates as the redis crate takes them, read from the files.
    pub fn certificates(&self) -> RedisResult<TlsCertificates> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read a TLS file",
                    format!("{what} `{}`: {e}", path.display()),
                ))
            })
        };
        let root_cert = self.ca_file.as_ref().map(|p| read(p, "CA file")).transpose()?;
        let client_tls = match &self.client_cert {
            Some((cert, key)) => Some(ClientTlsConfig {
                client_cert: read(cert, "client certificate")?,
                client_key: read(key, "client key")?,
            }),
            None => None,
        };
        Ok(TlsCertificates { client_tls, root_cert })
    }
}

/// A client for one standalone URL.
pub fn client(url: &str, tls: Option<&RedisTls>) -> RedisResult<redis::Client> {
    match tls {
        Some(tls) => redis::Client::build_with_tls(url, tls.certificates()?),
        None => redis::Client::open(url),
    }
}

/// A Cluster client builder over the seed URLs.
pub fn cluster<'a>(
    urls: impl IntoIterator<Item = &'a str>,
    tls: Option<&RedisTls>,
) -> RedisResult<ClusterClientBuilder> {
    let builder = ClusterClientBuilder::new(urls);
    Ok(match tls {
        Some(tls) => builder.certs(tls.certificates()?),
        None => builder,
    })
}
