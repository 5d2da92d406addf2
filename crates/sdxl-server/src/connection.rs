//! One HTTP connection's life: how long it may stay silent, idle or stalled, and what ends it.
//!
//! hyper-util's auto builder reads a connection's first bytes to choose HTTP/1 or HTTP/2 with
//! no timeout of its own (so hyper's HTTP/1 header timeout never starts for a client that
//! sends nothing), HTTP/2 has no idle timeout, and neither protocol bounds a write to a client
//! that stopped reading. So each connection is driven by [`drive`], a watchdog over the
//! connection's [`Activity`], and reads and writes through [`TimedIo`]:
//!
//! - **first request**: a complete request head (HTTP/1 request line and headers; HTTP/2
//!   preface and a HEADERS frame) must arrive within `header_read_timeout` of the accept, or
//!   the socket is closed;
//! - **between requests** (none in flight): after `idle_timeout` the connection is shut down
//!   gracefully (HTTP/2 sends GOAWAY; an idle HTTP/1 connection closes), and dropped if that
//!   takes longer than [`CLOSE_GRACE`]. A client that has begun sending its next request has
//!   until `header_read_timeout` after that first byte, if that is later;
//! - **in flight** (from the call of the service until its response body has ended or been
//!   dropped) none of these timers runs: the request's own deadlines do (body read, queue and
//!   generation);
//! - **stalled writes**: a write or flush that makes no progress for `write_timeout` fails with
//!   `TimedOut`, which ends the connection and drops whatever response it carried (a progress
//!   stream's job ticket with it, which cancels the job).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderValue, Request, Response, Version};
use axum::response::IntoResponse;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;
use crate::metrics::CONNECTIONS_CLOSED;
use crate::ServerConfig;

/// How long a connection that timed out between requests may take to close gracefully (an
/// HTTP/2 GOAWAY and its acknowledgement) before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Connections accepted beyond the cap by default (see [`ConnectionLimits::overflow_connections`]).
pub const OVERFLOW_CONNECTIONS: usize = 16;

/// The life of an overflow connection by default (see [`ConnectionLimits::overflow_deadline`]).
pub const OVERFLOW_DEADLINE: Duration = Duration::from_secs(2);

/// Paths an overflow connection is served; everything else is answered 503.
const PROBES: [&str; 3] = ["/health", "/ready", "/metrics"];

/// How long connections may stay silent, idle or stalled, and how many may be open.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// From the accept to the first complete request head; and from the first byte of a later
    /// request to the rest of its head.
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in flight, between requests.
    pub idle_timeout: Duration,
    /// How long a write may make no progress (the client reads nothing) before the
    /// connection is closed.
    pub write_timeout: Duration,
    /// Connections served in full at once.
    pub max_connections: usize,
    /// Connections accepted beyond `max_connections`, so health checks still get through:
    /// each is served one request, `/health`, `/ready` or `/metrics` (anything else gets 503
    /// with code 3040), within `overflow_deadline`. When all are taken, a new connection
    /// replaces the oldest one with no request in flight; when none can be replaced, it is
    /// closed at once.
    pub overflow_connections: usize,
    /// The whole life of an overflow connection.
    pub overflow_deadline: Duration,
}

impl From<&ServerConfig> for ConnectionLimits {
    fn from(config: &ServerConfig) -> Self {
        Self {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            write_timeout: config.write_timeout,
            max_connections: config.max_connections,
            overflow_connections: OVERFLOW_CONNECTIONS,
            overflow_deadline: OVERFLOW_DEADLINE,
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::from(&ServerConfig::default())
    }
}

/// The connection cap when none is configured: the process's soft open-file limit less a
/// reserve of `max(64, limit / 8)` descriptors for everything else (the listener, stdio, the
/// model's files, the job store's pool, the overflow connections), and at least 8.
pub fn default_max_connections() -> usize {
    max_connections_for(open_file_limit())
}

/// [`default_max_connections`] for a soft open-file limit of `nofile`.
pub fn max_connections_for(nofile: u64) -> usize {
    // RLIM_INFINITY and other huge limits: the kernel's default ceiling on descriptors
    let nofile = nofile.min(1 << 20);
    let reserve = (nofile / 8).max(64);
    nofile.saturating_sub(reserve).max(8) as usize
}

/// The soft RLIMIT_NOFILE; 1024 where it cannot be read.
pub fn open_file_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit only writes the struct it is given, which lives on this stack.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            // (`rlim_t` is u64 on Linux but not on every Unix)
            #[allow(clippy::unnecessary_cast)]
            return limit.rlim_cur as u64;
        }
    }
    1024
}

/// The watchdog's two timeouts (overflow connections get shorter ones than the limits').
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
}

/// What one connection's requests are doing; shared by its service, its IO and its watchdog.
pub(crate) struct Activity {
    opened: Instant,
    state: Mutex<State>,
    /// Wakes the watchdog when its deadline may have come earlier (or appeared).
    changed: Notify,
    write_timed_out: AtomicBool,
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    requests: u64,
    /// When the last request in flight ended (the accept, before any).
    idle_since: Instant,
    /// When the first byte arrived after `idle_since`.
    read_while_idle: Option<Instant>,
    evicted: bool,
    /// Set once a graceful close has begun: when to drop the connection anyway.
    closing_until: Option<Instant>,
}

/// Why the watchdog acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// No complete request within the header timeout of the accept.
    FirstRequest,
    /// No request in flight for the idle timeout: close gracefully.
    Idle,
    /// A graceful close took longer than [`CLOSE_GRACE`].
    CloseGrace,
    /// Another connection took this one's overflow slot.
    Evicted,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        let now = Instant::now();
        let state = State {
            in_flight: 0,
            requests: 0,
            idle_since: now,
            read_while_idle: None,
            evicted: false,
            closing_until: None,
        };
        Arc::new(Self {
            opened: now,
            state: Mutex::new(state),
            changed: Notify::new(),
            write_timed_out: AtomicBool::new(false),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // the critical sections only assign fields; a poisoned lock still holds a usable state
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a request in flight until the returned guard is dropped.
    fn request_started(self: &Arc<Self>) -> InFlight {
        let mut state = self.state();
        state.in_flight += 1;
        state.requests += 1;
        state.read_while_idle = None;
        InFlight(self.clone())
    }

    fn request_finished(&self) {
        let mut state = self.state();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
            state.read_while_idle = None;
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Bytes arrived.
    fn on_read(&self) {
        let mut state = self.state();
        if state.in_flight == 0 && state.read_while_idle.is_none() {
            // only ever moves the deadline later, so the watchdog need not wake
            state.read_while_idle = Some(Instant::now());
        }
    }

    /// Whether no request is in flight (an overflow connection that may be replaced).
    pub(crate) fn is_idle(&self) -> bool {
        self.state().in_flight == 0
    }

    /// Closes the connection at once (its overflow slot was given to another).
    pub(crate) fn evict(&self) {
        self.state().evicted = true;
        self.changed.notify_one();
    }

    fn start_closing(&self) {
        self.state().closing_until = Some(Instant::now() + CLOSE_GRACE);
    }

    /// When the watchdog must act next, and why; `None` while a request is in flight.
    fn deadline(&self, timeouts: Timeouts) -> Option<(Instant, Expiry)> {
        let state = self.state();
        if state.evicted {
            return Some((Instant::now(), Expiry::Evicted));
        }
        if state.in_flight > 0 {
            return None;
        }
        if let Some(until) = state.closing_until {
            return Some((until, Expiry::CloseGrace));
        }
        if state.requests == 0 {
            return Some((self.opened + timeouts.header_read, Expiry::FirstRequest));
        }
        let idle = state.idle_since + timeouts.idle;
        let head = state.read_while_idle.map_or(idle, |first_byte| first_byte + timeouts.header_read);
        Some((idle.max(head), Expiry::Idle))
    }
}

/// A request in flight on a connection; dropping it ends the request.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// The router, counting each request in flight on its connection until its response body
/// ends or is dropped. On an overflow connection it serves only the probes.
#[derive(Clone)]
pub(crate) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    probes_only: bool,
}

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>, probes_only: bool) -> Self {
        Self { inner, activity, probes_only }
    }
}

impl<S, B> tower::Service<Request<B>> for Tracked<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let in_flight = self.activity.request_started();
        // one request per overflow connection (HTTP/2 has no Connection header; its
        // connection is closed by the idle timeout of zero)
        let close = self.probes_only && request.version() < Version::HTTP_2;
        let served = !self.probes_only || PROBES.contains(&request.uri().path());
        let future = served.then(|| self.inner.call(request));
        Box::pin(async move {
            let mut response = match future {
                Some(future) => future.await?,
                None => ApiError::TooManyConnections.into_response(),
            };
            if close {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response.map(|body| TrackedBody { body, in_flight: Some(in_flight) }))
        })
    }
}

/// A response body that ends its request's time in flight when it ends or is dropped.
pub(crate) struct TrackedBody {
    body: Body,
    in_flight: Option<InFlight>,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A socket whose writes and flushes fail with `TimedOut` once they have made no progress
/// for the write timeout, and whose reads are reported to the connection's [`Activity`].
pub(crate) struct TimedIo<T> {
    inner: T,
    write_timeout: Duration,
    /// Armed while a write is pending (allocated at the first stall, then reset).
    stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
    activity: Arc<Activity>,
}

impl<T> TimedIo<T> {
    pub(crate) fn new(inner: T, write_timeout: Duration, activity: Arc<Activity>) -> Self {
        Self { inner, write_timeout, stall: None, stalled: false, activity }
    }

    /// Passes `polled` through, failing it once writes have been pending for the timeout.
    fn watch<R>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        let deadline = Instant::now() + self.write_timeout;
        let timer = match &mut self.stall {
            Some(timer) => {
                if !self.stalled {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self.stall.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.stalled = true;
        if timer.as_mut().poll(cx).is_ready() {
            self.activity.write_timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing within the write timeout",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

/// What [`drive`] watches besides the connection itself.
pub(crate) struct Watch {
    pub activity: Arc<Activity>,
    pub timeouts: Timeouts,
    /// Changes (or closes) when the server shuts down.
    pub shutdown: watch::Receiver<()>,
}

/// Runs `connection` to its end, or until the watchdog closes it; `graceful` starts its
/// graceful shutdown (on server shutdown, and on the idle timeout).
pub(crate) async fn drive<C, E>(connection: C, graceful: fn(Pin<&mut C>), watch: Watch)
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let Watch { activity, timeouts, mut shutdown } = watch;
    tokio::pin!(connection);
    let mut shutting_down = false;
    loop {
        let deadline = activity.deadline(timeouts);
        tokio::select! {
            ended = connection.as_mut() => {
                if activity.write_timed_out.load(Ordering::Relaxed) {
                    closed("write_timeout");
                } else if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed(), if !shutting_down => {
                shutting_down = true;
                graceful(connection.as_mut());
            }
            () = sleep_until(deadline.map(|(at, _)| at)) => {
                // a request may have started since the deadline was read
                let due = activity.deadline(timeouts).filter(|(at, _)| *at <= Instant::now());
                match due.map(|(_, why)| why) {
                    None => {}
                    Some(Expiry::Idle) => {
                        closed("idle_timeout");
                        activity.start_closing();
                        graceful(connection.as_mut());
                    }
                    Some(Expiry::FirstRequest) => return closed("first_request_timeout"),
                    Some(Expiry::Evicted) => return closed("evicted"),
                    Some(Expiry::CloseGrace) => return,
                }
            }
            () = activity.changed.notified() => {}
        }
    }
}

/// Counts a connection the server closed by `reason`.
pub(crate) fn closed(reason: &'static str) {
    tracing::debug!(reason, "closing a connection");
    metrics::counter!(CONNECTIONS_CLOSED, "reason" => reason).increment(1);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_a_reserve_of_descriptors() {
        assert_eq!(max_connections_for(256), 192); // 256 - 64
        assert_eq!(max_connections_for(1024), 896); // 1024 - 128
        assert_eq!(max_connections_for(65_536), 57_344); // 65536 - 8192
        assert_eq!(max_connections_for(16), 8); // never below 8
        assert_eq!(max_connections_for(u64::MAX), (1 << 20) - (1 << 17));
    }

    #[test]
    fn deadlines_follow_the_connections_requests() {
        // a header timeout longer than the idle one, so a late first byte visibly extends
        let timeouts = Timeouts { header_read: Duration::from_secs(10), idle: Duration::from_secs(1) };
        let activity = Activity::new();
        let opened = activity.opened;
        assert_eq!(activity.deadline(timeouts), Some((opened + timeouts.header_read, Expiry::FirstRequest)));
        // bytes of the first request do not extend the first deadline
        activity.on_read();
        assert_eq!(activity.deadline(timeouts), Some((opened + timeouts.header_read, Expiry::FirstRequest)));
        let request = activity.request_started();
        let second = activity.request_started();
        assert_eq!(activity.deadline(timeouts), None);
        assert!(!activity.is_idle());
        drop(request);
        assert_eq!(activity.deadline(timeouts), None, "one request is still in flight");
        let before = Instant::now();
        drop(second);
        let (at, why) = activity.deadline(timeouts).unwrap();
        assert_eq!(why, Expiry::Idle);
        assert!(at >= before + timeouts.idle && at <= Instant::now() + timeouts.idle);
        // a next request begun gets the header timeout from its first byte, if later
        let before = Instant::now();
        activity.on_read();
        let (at, why) = activity.deadline(timeouts).unwrap();
        assert_eq!(why, Expiry::Idle);
        assert!(at >= before + timeouts.header_read && at <= Instant::now() + timeouts.header_read);
        activity.evict();
        assert_eq!(activity.deadline(timeouts).unwrap().1, Expiry::Evicted);
    }
}
