//! The admin endpoint: a small HTTP/1.1 server (hyper on a current-thread tokio runtime)
//! on its own thread, `corecast-admin`, off the shard threads, serving
//! - `GET /metrics`: every per-shard counter in the Prometheus/OpenMetrics text format
//!   (encoded by `prometheus-client`), names prefixed `corecast_`, a `shard` label;
//! - `GET /healthz`: 200 when every shard is running and its heartbeat is fresh, else 503;
//! - `GET /stats`: the same figures as JSON, per shard and in total;
//! - `GET /connections`: the open connections as JSON, paged and sorted (see
//!   [`connections`]).
//!
//! `/metrics` also carries the standard `process_*` series ([`process`]).
//!
//! `HEAD` is served too; other methods get 405, other paths 404, and a request hyper cannot
//! parse gets its automatic 400 (or 431 for an oversize head), each with an empty body.
//!
//! [`crate::run`] binds it with [`bind`] (a std listener, before any shard starts, so a bad
//! address fails start-up) and starts it with [`spawn`] once every shard is accepting. The
//! bodies come from [`report`], which reads the shards'
//! [`ShardStats`](crate::metrics::ShardStats) (relaxed atomics, see [`crate::metrics`]) and
//! never writes anything a shard reads: nothing here can delay a shard.
//!
//! Every connection is its own task, so a slow or silent client holds only its own slot:
//! `/healthz` answers while hundreds of others are stalled. Each is bounded: at most
//! [`Limits::max_connections`] open at once (past it, new ones are closed at once), a head
//! must arrive within [`HEADER_READ_TIMEOUT`] and fit in [`MAX_HEAD_BYTES`], one request
//! per connection (`Connection: close`), and the whole connection, response included, lives
//! at most [`CONNECTION_LIFETIME`]. It has no authentication: bind it to loopback.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;

use crate::shared::Shared;

pub mod connections;
pub mod process;
pub mod report;
use report::{healthz, metrics_text, ShardCollector};
pub use report::{stats_json, ShardHealth, HEARTBEAT_STALE};

/// Largest request head (request line + headers) accepted; a larger one gets hyper's 431.
pub const MAX_HEAD_BYTES: usize = 8 << 10;
/// Largest read buffer per connection, bounding memory for a head that never ends; a
/// buffer full without a complete head also gets 431. hyper's minimum is 8 KiB.
const MAX_BUF_BYTES: usize = 16 << 10;
/// Time from accept to the end of the request head. Past it hyper closes the connection
/// without a response (it sends no 408), which frees the slot of a silent client.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection, reading the head and writing the response included; a
/// client that does not read its response is dropped then.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// Most admin connections open at once (see [`Limits::for_open_files`]).
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections the kernel queues for `accept`: a burst as large as the connection bound
/// waits there instead of having its SYNs dropped (std's 128 costs a 1 s retransmit).
const LISTEN_BACKLOG: i32 = MAX_CONNECTIONS as i32;
/// A failing `accept` (EMFILE and friends) is retried after this pause instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Descriptors the endpoint keeps in reserve for itself ([`FdReserve`]): that many admin
/// connections are served at once even when the relay's clients hold every other one.
pub const RESERVED_FDS: usize = 4;
/// Content type of `/metrics` (the encoder writes OpenMetrics text, which Prometheus reads).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// The bounds the endpoint runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; a connection accepted past it is closed at once, without a
    /// response: answering 503 would mean reading its request (a slot's worth of waiting)
    /// or closing on unread bytes (a reset that destroys the 503 anyway).
    pub max_connections: usize,
}

impl Limits {
    /// [`MAX_CONNECTIONS`], but at most a quarter of the open-file limit `nofile`, so that
    /// admin sockets can never take the descriptors the relay's clients need (at least 16).
    pub fn for_open_files(nofile: u64) -> Self {
        let budget = usize::try_from(nofile / 4).unwrap_or(usize::MAX);
        Limits {
            max_connections: budget.clamp(16, MAX_CONNECTIONS),
        }
    }
}

/// Binds the admin listener; called before any shard starts.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    // As std's `TcpListener::bind` does: a restart need not wait out old connections.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Serves `listener` on a new thread, `corecast-admin`, until the process exits. The thread
/// is supervised (`supervisor`): a panic is logged, counted in `shared.admin_thread` and
/// the endpoint restarts after a backoff on a new runtime, with the same listener (it
/// stays open meanwhile, so requests wait in its backlog rather than being refused).
pub fn spawn(listener: TcpListener, shared: Arc<Shared>, limits: Limits) -> io::Result<()> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(process::ProcessCollector));
    let relay = registry.sub_registry_with_prefix("corecast");
    relay.register_collector(Box::new(ShardCollector(shared.clone())));
    if let Some(cluster) = &shared.cluster {
        relay.register_collector(Box::new(crate::cluster::ClusterCollector(cluster.clone())));
    }
    listener.set_nonblocking(true)?;
    // The first runtime and listener are made here, so that a failure is start-up's error.
    let mut first = Some(runtime_for(&listener)?);
    let app = Arc::new(App { shared, registry });
    std::thread::Builder::new()
        .name("corecast-admin".into())
        .spawn(move || {
            let watch = &app.shared.admin_thread;
            crate::supervisor::supervise("admin", watch, std::thread::sleep, || {
                let (runtime, listener) = match first.take() {
                    Some(made) => made,
                    // A failure here is one more death, retried after the next backoff.
                    None => runtime_for(&listener).unwrap_or_else(|e| panic!("cannot restart the admin endpoint: {e}")),
                };
                runtime.block_on(serve(listener, app.clone(), limits));
            });
        })?;
    Ok(())
}

/// A current-thread runtime and, registered with its reactor, a copy of `listener`.
fn runtime_for(listener: &TcpListener) -> io::Result<(tokio::runtime::Runtime, tokio::net::TcpListener)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let copy = listener.try_clone()?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(copy)?
    };
    Ok((runtime, listener))
}

/// What every connection's requests read.
struct App {
    shared: Arc<Shared>,
    registry: Registry,
}

/// The accept loop: one task per connection, up to `limits.max_connections` at once.
async fn serve(listener: tokio::net::TcpListener, app: Arc<App>, limits: Limits) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_BUF_BYTES)
        // One request per connection: nothing idles between requests, and hyper adds
        // `Connection: close` to every response.
        .keep_alive(false);
    let open = Arc::new(AtomicUsize::new(0));
    let reserve = Arc::new(std::sync::Mutex::new(FdReserve::new(RESERVED_FDS)));
    let mut last_warning: Option<Instant> = None;
    let mut warn_at_most_every_second = |message: String| {
        if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!("{message}");
            last_warning = Some(Instant::now());
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                crate::supervisor::test_panic_hook("admin");
                accepted
            }
            // Out of descriptors: one of the reserve makes room for this accept at once.
            Err(e) if is_out_of_fds(&e) && lock(&reserve).release_one() => continue,
            Err(e) => {
                warn_at_most_every_second(format!("admin endpoint: accept failed: {e}"));
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let Some(slot) = Slot::take(&open, limits.max_connections) else {
            warn_at_most_every_second(format!(
                "admin endpoint: {} connections open; closing new ones until one ends",
                limits.max_connections
            ));
            drop(stream);
            lock(&reserve).refill();
            continue;
        };
        // The response goes out in one write; nothing is gained by holding it back.
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(stream), AppService(app.clone()));
        let reserve = reserve.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Whatever this connection's socket was, once it is closed the reserve takes
            // its descriptor back if it was short.
            let _refill = Refill(reserve);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Ok(())) => {}
                // Header timeouts, resets and parse errors: the client's problem, and a port
                // scanner makes plenty of them.
                Ok(Err(e)) => tracing::debug!("admin endpoint: connection from {peer}: {e}"),
                Err(_) => tracing::debug!(
                    "admin endpoint: connection from {peer} dropped after {} s",
                    CONNECTION_LIFETIME.as_secs()
                ),
            }
        });
    }
}

/// Whether an accept failed for want of a descriptor (the process's or the system's).
fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

fn lock(reserve: &std::sync::Mutex<FdReserve>) -> std::sync::MutexGuard<'_, FdReserve> {
    // The reserve is a list of descriptors; a panic while holding it leaves it usable.
    reserve.lock().unwrap_or_else(|p| p.into_inner())
}

/// Descriptors held back for the admin endpoint, so that `/healthz` and `/metrics` answer
/// when the relay's clients have taken every other one (the data port accepts until the
/// open-file limit): each is `/dev/null`, opened at start. When an accept fails with
/// EMFILE, one is closed and the accept retried at once: the kernel hands out the lowest
/// free descriptor, and the shards, backing off after their own EMFILE, are not accepting
/// meanwhile. The reserve takes descriptors back as admin connections end (a shard may win
/// one first; the reserve then stays short until another is free).
struct FdReserve {
    fds: Vec<std::fs::File>,
    want: usize,
}

impl FdReserve {
    fn new(want: usize) -> Self {
        let mut reserve = FdReserve { fds: Vec::new(), want };
        reserve.refill();
        reserve
    }

    /// Closes one reserved descriptor; false if none is left.
    fn release_one(&mut self) -> bool {
        self.fds.pop().is_some()
    }

    /// Opens descriptors until the reserve is full or none is free.
    fn refill(&mut self) {
        while self.fds.len() < self.want {
            match std::fs::File::open("/dev/null") {
                Ok(f) => self.fds.push(f),
                Err(_) => break,
            }
        }
    }
}

/// Refills the reserve when dropped, after the connection task's socket is closed.
struct Refill(Arc<std::sync::Mutex<FdReserve>>);

impl Drop for Refill {
    fn drop(&mut self) {
        lock(&self.0).refill();
    }
}

/// One of the `max_connections` places, given back when its connection task ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Only the accept loop takes slots, so the check and the increment cannot race with
    /// another taker; tasks ending only make room.
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        if open.load(Ordering::Relaxed) >= max {
            return None;
        }
        open.fetch_add(1, Ordering::Relaxed);
        Some(Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The service hyper calls for each request: answers from the shards' counters at once.
#[derive(Clone)]
struct AppService(Arc<App>);

impl hyper::service::Service<Request<hyper::body::Incoming>> for AppService {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn call(&self, request: Request<hyper::body::Incoming>) -> Self::Future {
        let uri = request.uri();
        std::future::ready(Ok(route(request.method(), uri.path(), uri.query(), &self.0)))
    }
}

fn response(status: u16, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    // Every status used here is a valid code.
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Picks the response for a request; hyper leaves the body out for `HEAD`.
fn route(method: &Method, path: &str, query: Option<&str>, app: &App) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = response(405, TEXT, "only GET and HEAD are served\n".into());
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => response(200, METRICS_CONTENT_TYPE, metrics_text(&app.registry)),
        "/healthz" => {
            let (status, body) = healthz(&app.shared);
            response(status, TEXT, body)
        }
        "/stats" => {
            let mut body = stats_json(&app.shared).to_string();
            body.push('\n');
            response(200, "application/json", body)
        }
        "/connections" => match connections::Page::parse(query.unwrap_or("")) {
            Ok(page) => {
                let mut body = connections::connections_json(&app.shared, &page).to_string();
                body.push('\n');
                response(200, "application/json", body)
            }
            Err(e) => response(400, TEXT, format!("{e}\n")),
        },
        _ => response(
            404,
            TEXT,
            "not found; try /metrics, /healthz, /stats or /connections\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_connection_bound_is_1024_within_a_quarter_of_the_open_file_limit() {
        assert_eq!(Limits::for_open_files(1 << 20).max_connections, 1024);
        assert_eq!(Limits::for_open_files(20_000).max_connections, 1024);
        assert_eq!(Limits::for_open_files(1024).max_connections, 256);
        assert_eq!(Limits::for_open_files(10).max_connections, 16);
    }

    #[test]
    fn slots_run_out_at_the_bound_and_come_back_when_dropped() {
        let open = Arc::new(AtomicUsize::new(0));
        let a = Slot::take(&open, 2).expect("first slot");
        let _b = Slot::take(&open, 2).expect("second slot");
        assert!(Slot::take(&open, 2).is_none());
        drop(a);
        let _c = Slot::take(&open, 2).expect("the freed slot");
        assert_eq!(open.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn routes_answer_by_method_and_path() {
        let shared = Arc::new(Shared::new(Config::defaults_for(&crate::machine::Machine::detect())));
        let app = App {
            registry: Registry::default(),
            shared,
        };
        let status = |m: Method, p: &str| route(&m, p, None, &app).status().as_u16();
        assert_eq!(status(Method::GET, "/stats"), 200);
        assert_eq!(status(Method::HEAD, "/metrics"), 200);
        assert_eq!(status(Method::GET, "/nope"), 404);
        assert_eq!(status(Method::GET, "/healthz/"), 404);
        let post = route(&Method::POST, "/metrics", None, &app);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[ALLOW], "GET, HEAD");
        // No shard has started: not healthy.
        assert_eq!(status(Method::GET, "/healthz"), 503);
    }
}
