//! One Redis target's connection: standalone through a
//! [`ConnectionManager`] (reconnects by itself), Cluster through the async
//! cluster client (follows `MOVED`/`ASK`, retries `TRYAGAIN`).
//!
//! **Invariants:** every round trip is bounded by the command timeout, so a
//! hung target is a transient error, never a hang; a pipeline is confirmed
//! only when every reply in it was read and none is an error; a `NOSCRIPT`
//! reply loads the scripts and runs the pipeline again (every command
//! evictd sends is idempotent, so a re-run is safe).

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Pipeline, RedisResult, ServerErrorKind, Value};
use secrecy::ExposeSecret;

use super::error::{Class, Errors, RedisCause};
use super::layout::Scripts;
use super::plan::Topology;
use crate::config::RedisTarget;
use crate::sink::SinkError;

/// A connected target; cheap to clone (the clients are shared handles).
#[derive(Clone)]
pub(crate) enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Connects to a target, within `timeout` overall; a reply may take up
    /// to `round_trip` (the timeout plus the durability wait).
    pub(crate) async fn connect(
        target: &RedisTarget,
        timeout: Duration,
        round_trip: Duration,
        errors: &Errors,
    ) -> Result<Conn, SinkError> {
        let urls: Vec<&str> = target.urls.iter().map(|u| u.expose_secret()).collect();
        let connecting = async {
            if target.cluster {
                let client = crate::redis_tls::cluster(urls.iter().copied(), target.tls.as_ref())
                    .map_err(|e| errors.redis("TLS configuration", e))?
                    .connection_timeout(timeout)
                    .response_timeout(round_trip)
                    .retries(2)
                    .build()
                    .map_err(|e| errors.redis("cluster configuration", e))?;
                let conn = client.get_async_connection().await.map_err(|e| errors.redis("connecting", e))?;
                Ok(Conn::Cluster(conn))
            } else {
                let [url] = urls.as_slice() else {
                    return Err(errors.make(Class::Definite, RedisCause::StandaloneUrls(urls.len())));
                };
                let client =
                    crate::redis_tls::client(url, target.tls.as_ref()).map_err(|e| errors.redis("configuration", e))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(round_trip))
                    .set_number_of_retries(1)
                    .set_max_delay(timeout);
                let conn = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(|e| errors.redis("connecting", e))?;
                Ok(Conn::Standalone(conn))
            }
        };
        match tokio::time::timeout(timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(errors.timeout("connecting", timeout)),
        }
    }

    pub(crate) fn topology(&self) -> Topology {
        match self {
            Conn::Standalone(_) => Topology::Standalone,
            Conn::Cluster(_) => Topology::Cluster,
        }
    }

    async fn query(&self, pipe: &Pipeline) -> RedisResult<Vec<RedisResult<Value>>> {
        match self {
            Conn::Standalone(c) => pipe.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => pipe.query_async(&mut c.clone()).await,
        }
    }

    async fn load(&self, scripts: &Scripts) -> RedisResult<()> {
        for script in scripts.all() {
            // On a Cluster, SCRIPT LOAD goes to every node.
            match self {
                Conn::Standalone(c) => script.load_async(&mut c.clone()).await?,
                Conn::Cluster(c) => script.load_async(&mut c.clone()).await?,
            };
        }
        Ok(())
    }
}

/// Runs round trips against one target with its timeout and scripts.
pub(crate) struct Runner<'a> {
    pub(crate) conn: &'a Conn,
    pub(crate) scripts: &'a Scripts,
    pub(crate) errors: &'a Errors,
    pub(crate) timeout: Duration,
    /// The wait that ends every pipeline of a batch's invalidations.
    pub(crate) wait: Option<crate::config::Durability>,
}

impl Runner<'_> {
    /// One round trip, bounded by the timeout.
    async fn bounded<T>(&self, what: &str, f: impl Future<Output = RedisResult<T>>) -> Result<T, SinkError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.errors.redis(what, e)),
            Err(_) => Err(self.errors.timeout(what, self.timeout)),
        }
    }

    /// Sends `pipe` and returns its replies once every one was read and none
    /// is an error. `NOSCRIPT` loads the scripts and re-runs the pipeline.
    pub(crate) async fn pipeline(&self, what: &str, pipe: &mut Pipeline) -> Result<Vec<Value>, SinkError> {
        pipe.ignore_errors();
        // Scripts can vanish between a load and the re-run (a failover to a
        // node that never saw them, a SCRIPT FLUSH): load at most twice.
        let mut loads = 0;
        loop {
            let replies = self.bounded(what, self.conn.query(pipe)).await?;
            if replies.len() != pipe.len() {
                let cause =
                    RedisCause::ReplyCount { what: what.to_owned(), replies: replies.len(), commands: pipe.len() };
                return Err(self.errors.make(Class::Definite, cause));
            }
            let no_script = replies.iter().any(|r| matches!(r, Err(e) if e.kind() == ServerErrorKind::NoScript.into()));
            if no_script && loads < 2 {
                self.bounded("loading scripts", self.conn.load(self.scripts)).await?;
                loads += 1;
                continue;
            }
            let mut values = Vec::with_capacity(replies.len());
            for reply in replies {
                match reply {
                    Ok(v) => values.push(v),
                    Err(e) => return Err(self.errors.redis(what, e)),
                }
            }
            return Ok(values);
        }
    }
}
