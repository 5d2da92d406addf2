//! The accept loop: caps the connections served at once, keeps a few overflow connections
//! for health checks beyond the cap, drives each connection under the timeouts of
//! [`crate::connection`], and shuts down gracefully: stop accepting, then let every open
//! connection finish its request.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::{Builder, UpgradeableConnection};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::connection::{self, Activity, ConnectionLimits, TimedIo, Timeouts, Tracked, Watch};
use crate::metrics::CONNECTIONS_OPEN;

/// HTTP/2 PING interval on a connection, and how long its answer may take before the
/// connection is closed: finds clients that vanished without closing their socket.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How often, at most, reaching the connection cap is logged.
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then waits for
/// the open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    // No hyper header timeout: the watchdog times every request head (hyper's would start
    // only once the auto builder has seen which protocol the client speaks, and it would
    // also cut a keep-alive connection after the header timeout instead of the idle one).
    builder.http1().timer(TokioTimer::new()).header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    let main_timeouts = Timeouts { header_read: limits.header_read_timeout, idle: limits.idle_timeout };
    // an overflow connection gets one request, so it closes once that is answered
    let overflow_timeouts =
        Timeouts { header_read: limits.header_read_timeout.min(limits.overflow_deadline), idle: Duration::ZERO };
    let pools = Arc::new(Pools::new(&limits));
    tracing::info!(
        max_connections = limits.max_connections,
        overflow = limits.overflow_connections,
        open_file_limit = connection::open_file_limit(),
        "connection limits"
    );
    // like hyper-util's GracefulShutdown, but the watchdog also starts a graceful close
    let (closing, _) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // e.g. too many open files: back off instead of spinning
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = pools.admit() else {
                    // beyond the cap and every overflow connection busy: close at once
                    drop(stream);
                    connection::closed("refused");
                    continue;
                };
                let overflow = slot.is_overflow();
                let activity = slot.activity.clone();
                let io = TokioIo::new(TimedIo::new(stream, limits.write_timeout, activity.clone()));
                let service = TowerToHyperService::new(Tracked::new(router.clone(), activity.clone(), overflow));
                let connection = builder.serve_connection_with_upgrades(io, service).into_owned();
                let timeouts = if overflow { overflow_timeouts } else { main_timeouts };
                let watch = Watch { activity, timeouts, shutdown: closing.subscribe() };
                let deadline = limits.overflow_deadline;
                tokio::spawn(async move {
                    let driven = connection::drive(connection, UpgradeableConnection::graceful_shutdown, watch);
                    if overflow {
                        if tokio::time::timeout(deadline, driven).await.is_err() {
                            connection::closed("overflow_deadline");
                        }
                    } else {
                        driven.await;
                    }
                    drop(slot);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = closing.send(());
    closing.closed().await;
    Ok(())
}

/// The connections open: up to the cap in the main pool, then a few in overflow.
struct Pools {
    open: AtomicUsize,
    max: usize,
    /// Overflow connections, oldest first.
    overflow: Mutex<VecDeque<Arc<Activity>>>,
    overflow_max: usize,
    last_warning: Mutex<Option<Instant>>,
}

/// A connection's place in [`Pools`], given back when dropped.
struct Slot {
    pools: Arc<Pools>,
    activity: Arc<Activity>,
    overflow: bool,
}

impl Pools {
    fn new(limits: &ConnectionLimits) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max: limits.max_connections,
            overflow: Mutex::new(VecDeque::new()),
            overflow_max: limits.overflow_connections,
            last_warning: Mutex::new(None),
        }
    }

    /// A place for a new connection: in the main pool below the cap, else in overflow
    /// (replacing the oldest overflow connection with no request in flight, when all are
    /// taken); `None` when neither has room. Only the accept loop calls it, so the check
    /// and the increment need not be atomic together.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let activity = Activity::new();
        if self.open.load(Ordering::SeqCst) < self.max {
            self.open.fetch_add(1, Ordering::SeqCst);
            metrics::gauge!(CONNECTIONS_OPEN, "pool" => "main").increment(1.0);
            return Some(Slot { pools: self.clone(), activity, overflow: false });
        }
        self.warn_at_cap();
        let mut overflow = self.overflow.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if overflow.len() >= self.overflow_max {
            let replaced = overflow.iter().position(|a| a.is_idle())?;
            if let Some(oldest) = overflow.remove(replaced) {
                oldest.evict();
            }
        }
        overflow.push_back(activity.clone());
        metrics::gauge!(CONNECTIONS_OPEN, "pool" => "overflow").increment(1.0);
        Some(Slot { pools: self.clone(), activity, overflow: true })
    }

    fn warn_at_cap(&self) {
        let mut last = self.last_warning.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.is_none_or(|at| at.elapsed() >= CAP_WARNING_INTERVAL) {
            *last = Some(Instant::now());
            tracing::warn!(
                max_connections = self.max,
                "connection limit reached: new connections get only /health, /ready and /metrics"
            );
        }
    }
}

impl Slot {
    fn is_overflow(&self) -> bool {
        self.overflow
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.overflow {
            let mut overflow = self.pools.overflow.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            // an evicted connection has already left the list
            if let Some(at) = overflow.iter().position(|a| Arc::ptr_eq(a, &self.activity)) {
                overflow.remove(at);
            }
            metrics::gauge!(CONNECTIONS_OPEN, "pool" => "overflow").decrement(1.0);
        } else {
            self.pools.open.fetch_sub(1, Ordering::SeqCst);
            metrics::gauge!(CONNECTIONS_OPEN, "pool" => "main").decrement(1.0);
        }
    }
}
