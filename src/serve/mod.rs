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
    /// A client that has not sent its request headers in this time is cut
    /// off; so is a keep-alive connection idle this long between requests.
    pub header_read_timeout: Duration,
    /// A client that takes no byte of its answer for this long is cut off
    /// (one that never reads would otherwise keep its connection forever).
    pub write_timeout: Duration,
    /// After shutdown: how long in-flight requests may finish.
    pub shutdown_grace: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// While `max_connections` are served, up to this many more connections
    /// wait for a slot, first come first served, for up to `slot_wait`, and
    /// are then answered `503` with `Retry-After` (a sender retries, instead
    /// of waiting unseen in the kernel's backlog); beyond that, connections
    /// are not accepted until the waiting room has a place (they wait in the
    /// kernel's backlog).
    pub max_waiting_connections: usize,
    /// How long a connection over the limit waits for a slot. Longer than
    /// `header_read_timeout`: a slot held by a slow or idle client is free
    /// by then.
    pub slot_wait: Duration,
    /// The time a connection refused for want of a slot has to send its
    /// request headers before it is closed without its 503.
    pub refused_header_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            max_connections: 128,
            max_waiting_connections: 128,
            slot_wait: Duration::from_secs(11),
            refused_header_timeout: Duration::from_secs(2),
        }
    }
}

/// The answer of a connection over the limit.
fn busy_router() -> Router {
    use axum::http::{StatusCode, header};
    Router::new().fallback(|| async {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [
                (header::RETRY_AFTER, "5"),
                (header::CONNECTION, "close"),
                (header::CONTENT_TYPE, "application/json"),
            ],
            r#"{"error":"too many connections; try again"}"#,
        )
    })
}

/// A connection whose writes fail once one has made no progress for
/// `timeout`: hyper has no write timeout of its own.
struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        WriteDeadline {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// Called with the inner write's poll: arms the deadline while it is
    /// pending, disarms it on progress, fails once it passes.
    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took no byte of its answer in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
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
/// returns. HTTP/1.1 with keep-alive. Connections over `max_connections`
/// wait for a slot, then are answered 503 (see [`ServeOptions`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    options: ServeOptions,
) {
    use std::sync::Arc;
    let connections = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(options.max_connections.max(1)));
    let waiting = Arc::new(tokio::sync::Semaphore::new(options.max_waiting_connections));
    let busy = busy_router();
    // Said once each time the limit is reached, not per connection.
    let mut full = false;
    loop {
        // A place for the next connection before it is accepted: a slot, or
        // else one in the waiting room. While there is neither, connections
        // stay in the kernel's backlog, as before there was a waiting room
        // (accepted only to be closed, a burst of deliveries got resets).
        let place = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => Place::Slot(slot),
                Err(_) => break,
            },
            turn = waiting.clone().acquire_owned() => match turn {
                Ok(turn) => Place::Waiting(turn),
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
        let stop = shutdown.clone();
        let router = router.clone();
        let slot = match place {
            Place::Slot(slot) => Ok(slot),
            // One may have been freed while waiting for the connection.
            Place::Waiting(turn) => slots.clone().try_acquire_owned().map_err(|_| turn),
        };
        let turn = match slot {
            Ok(slot) => {
                full = false;
                connections.spawn(async move {
                    let _slot = slot;
                    serve_connection(stream, peer, router, &options, false, stop).await;
                });
                continue;
            }
            Err(turn) => turn,
        };
        if !full {
            full = true;
            warn!(
                max_connections = options.max_connections,
                "every connection slot is taken (slow or idle clients?): new connections wait \
                 for one, and are answered 503 with Retry-After if none is free in time"
            );
        }
        let (slots, busy) = (slots.clone(), busy.clone());
        connections.spawn(async move {
            let slot = tokio::select! {
                slot = tokio::time::timeout(options.slot_wait, slots.acquire_owned()) => slot,
                _ = stop.cancelled() => return,
            };
            drop(turn);
            match slot {
                Ok(Ok(slot)) => {
                    let _slot = slot;
                    serve_connection(stream, peer, router, &options, false, stop).await;
                }
                _ => {
                    debug!(%peer, "no connection slot free in time: answered 503");
                    serve_connection(stream, peer, busy, &options, true, stop).await;
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

/// What a connection is accepted with.
enum Place {
    /// A connection slot: served at once.
    Slot(tokio::sync::OwnedSemaphorePermit),
    /// A place in the waiting room: waits for a slot.
    Waiting(tokio::sync::OwnedSemaphorePermit),
}

/// One connection, until it ends or the listener stops (its request in
/// flight finishes first). `refused`: the busy answer, one request, with
/// the refusal's short header timeout.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    options: &ServeOptions,
    refused: bool,
    stop: CancellationToken,
) {
    let header_timeout = if refused {
        options
            .refused_header_timeout
            .min(options.header_read_timeout)
    } else {
        options.header_read_timeout
    };
    let io = TokioIo::new(WriteDeadline::new(stream, options.write_timeout));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(!refused);
    let conn = builder.serve_connection(io, TowerToHyperService::new(router));
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

    use tokio::net::TcpStream;

    /// Asks `addr` until it answers 200 (a 503, or a connection closed at
    /// once while the refusals are many, meanwhile), failing with `why`
    /// after 60 s.
    async fn asked_until_200(addr: SocketAddr, why: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let answer = tokio::time::timeout(Duration::from_secs(60), ask(addr))
                .await
                .expect("no answer at all");
            if answer.starts_with("HTTP/1.1 200") {
                return;
            }
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
                "{answer}"
            );
            assert!(tokio::time::Instant::now() < deadline, "{why}");
            tokio::task::yield_now().await;
        }
    }

    /// A listener serving `router` with `options`; stopped on drop of the token.
    async fn start(router: Router, options: ServeOptions) -> (SocketAddr, CancellationToken) {
        let listener = bind("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, router, stop.clone(), options));
        (addr, stop)
    }

    fn ok_router() -> Router {
        Router::new().route("/", axum::routing::get(|| async { "ok" }))
    }

    /// One request on a new connection (`connection: close`): the whole
    /// answer, or what came before the server closed.
    async fn ask(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Until the connection is closed by the server: the bytes read.
    async fn until_closed(s: &mut TcpStream) -> usize {
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k,
            }
        }
    }

    /// Slowloris: clients holding every connection slot (headers a byte a
    /// minute, or nothing) kept a delivery waiting unseen in the kernel's
    /// backlog until one was cut off by its header timeout, and again behind
    /// every new slow client. Over the limit a connection waits `slot_wait`
    /// for a slot, then is answered 503 with Retry-After (the sender
    /// retries); a slow one over the limit is closed after the short
    /// refusal timeout; once the slow clients go, requests are served again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_limit_get_a_503_not_an_endless_wait() {
        let options = ServeOptions {
            header_read_timeout: Duration::from_secs(600),
            max_connections: 2,
            max_waiting_connections: 4,
            slot_wait: Duration::from_millis(100),
            refused_header_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let (addr, stop) = start(ok_router(), options).await;
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HT").await.unwrap();
            slow.push(s);
        }
        let answer = tokio::time::timeout(Duration::from_secs(60), ask(addr))
            .await
            .expect("a request over the limit waited for a slot instead of a 503");
        let lower = answer.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 503"), "{answer}");
        assert!(lower.contains("retry-after: 5"), "{answer}");
        // A slow client over the limit gets no more time than that.
        let mut quiet = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), until_closed(&mut quiet))
            .await
            .expect("a slow client over the limit was kept");
        drop(slow);
        asked_until_200(addr, "the slots of closed connections were never freed").await;
        stop.cancel();
    }

    /// With every slot taken and the waiting room full, a further
    /// connection was accepted and closed at once: a burst of deliveries
    /// (redelivery after an outage, a proxy opening one connection per
    /// request) got resets where it used to wait in the kernel's backlog.
    /// It stays there now, unaccepted, until the waiting room has a place,
    /// and is then served like the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_waiting_room_stay_in_the_backlog() {
        let options = ServeOptions {
            header_read_timeout: Duration::from_secs(600),
            max_connections: 1,
            max_waiting_connections: 1,
            slot_wait: Duration::from_secs(600),
            ..Default::default()
        };
        let (addr, stop) = start(ok_router(), options).await;
        const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
        // One holds the slot (its headers half sent), one waits for it.
        let mut holder = TcpStream::connect(addr).await.unwrap();
        holder.write_all(&REQUEST[..8]).await.unwrap();
        let mut waiter = TcpStream::connect(addr).await.unwrap();
        waiter.write_all(REQUEST).await.unwrap();
        let mut beyond = TcpStream::connect(addr).await.unwrap();
        beyond.write_all(REQUEST).await.unwrap();
        // Not closed (nor answered) while there is no place for it.
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_secs(1), beyond.read(&mut byte)).await;
        assert!(
            early.is_err(),
            "a connection beyond the waiting room was closed or answered at once: {early:?}"
        );
        holder.write_all(&REQUEST[8..]).await.unwrap();
        for (who, s) in [
            ("holder", &mut holder),
            ("waiter", &mut waiter),
            ("beyond", &mut beyond),
        ] {
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut answer))
                .await
                .expect("no answer")
                .unwrap();
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 200"), "{who}: {answer}");
        }
        stop.cancel();
    }

    /// A client that sends its request and never reads the answer (a large
    /// one: metrics of many businesses) kept its connection slot forever:
    /// hyper has no write timeout. It is cut off once its answer makes no
    /// progress for `write_timeout`, and its slot serves others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_does_not_read_its_answer_is_cut_off() {
        const BIG: usize = 64 << 20;
        let body = bytes::Bytes::from(vec![b'x'; BIG]);
        let router = Router::new()
            .route(
                "/big",
                axum::routing::get(move || async move { body.clone() }),
            )
            .route("/", axum::routing::get(|| async { "ok" }));
        let options = ServeOptions {
            write_timeout: Duration::from_millis(200),
            max_connections: 1,
            slot_wait: Duration::from_millis(50),
            ..Default::default()
        };
        let (addr, stop) = start(router, options).await;
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // Its slot is free again once it is cut off: asked until then.
        asked_until_200(addr, "a client that does not read kept its slot").await;
        let got = until_closed(&mut stalled).await;
        assert!(got < BIG, "the whole answer was sent: {got} bytes");
        stop.cancel();
    }
}
