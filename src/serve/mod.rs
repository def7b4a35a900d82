//! Inbound HTTP (axum): the webhook receiver ([`webhooks`]) and whatever else
//! the daemon listens for. [`serve`] runs any `Router` on a bound listener
//! with a header-read timeout and a bounded graceful shutdown, so every
//! listener of the daemon behaves the same way.

pub mod admin;
pub mod webhooks;

use anyhow::{Context, Result};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// A client that has not sent its request headers in this time is cut off.
    pub header_read_timeout: Duration,
    /// After shutdown: how long in-flight requests may finish.
    pub shutdown_grace: Duration,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            max_connections: 128,
        }
    }
}

/// Binds a TCP listener, naming the address and what it is for on failure.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))
}

/// Serves `router` on `listener` until `shutdown` is cancelled; then stops
/// accepting, lets requests in flight finish (up to `shutdown_grace`) and
/// returns. HTTP/1.1 with keep-alive.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    options: ServeOptions,
) {
    let connections = TaskTracker::new();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(options.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(options.header_read_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    // Finish the request in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                }
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(options.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        warn!("connections still open after the shutdown grace period were closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A keep-alive connection left idle after its answer holds one of the
    /// `max_connections` slots: it must be closed, or a client that opens
    /// that many and sends nothing more shuts everyone else out.
    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let stop = CancellationToken::new();
        let options = ServeOptions {
            header_read_timeout: Duration::from_millis(300),
            ..ServeOptions::default()
        };
        tokio::spawn(serve(listener, router, stop.clone(), options));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // Idle now: the server must close it (read returns 0) within a bound.
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        stop.cancel();
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "an idle keep-alive connection was kept open: {closed:?}"
        );
    }
}
