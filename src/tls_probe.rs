//! (hidden) What the TLS integration tests (tests/it/tls.rs) ask of a
//! connection made exactly as the daemon makes it: did a sqlx pool's
//! connection and the replication stream use TLS, or why did they fail.
//! Nothing in the daemon calls this.

use sqlx::Connection as _;

use crate::pgconn::Conn;
use crate::source::postgres::connect_replication;

/// Connects one sqlx connection as the look-up and setup pools do;
/// whether the server sees it encrypted, or the error's message.
pub async fn pool_uses_tls(url: &str) -> Result<bool, String> {
    let options = crate::pgconn::connect_options(url).await.map_err(|e| e.to_string())?;
    let mut conn = sqlx::PgConnection::connect_with(&options).await.map_err(|e| e.to_string())?;
    let ssl: Option<bool> = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_optional(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.close().await;
    Ok(ssl.unwrap_or(false))
}

/// Starts the replication stream on `slot` (of `publication`) as the
/// source does; whether its walsender's connection is encrypted, read
/// through `admin`, or the error's message.
pub async fn replication_uses_tls(url: &str, slot: &str, publication: &str, admin: &str) -> Result<bool, String> {
    use secrecy::ExposeSecret as _;
    let endpoint = Conn::new(url).map_err(|e| e.to_string())?;
    let started = connect_replication(&endpoint, |tls| {
        pgwire_replication::ReplicationConfig::new(
            endpoint.url.host.clone(),
            endpoint.url.user.clone(),
            endpoint.url.password.as_ref().map(|p| p.expose_secret().to_owned()).unwrap_or_default(),
            endpoint.url.database.clone(),
            slot,
            publication,
        )
        .with_port(endpoint.url.port)
        .with_tls(tls)
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut conn = sqlx::PgConnection::connect(admin).await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let ssl = loop {
        let ssl: Option<bool> = sqlx::query_scalar(
            "SELECT s.ssl FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid WHERE r.slot_name = $1",
        )
        .bind(slot)
        .fetch_optional(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
        match ssl {
            Some(ssl) => break ssl,
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            None => return Err("the slot never became active".into()),
        }
    };
    // Dropping the start aborts the client and frees the slot.
    drop(started);
    let _ = conn.close().await;
    Ok(ssl)
}
