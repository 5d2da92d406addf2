//! What a request may cost before it reaches the queue. Bodies are read within a memory
//! budget shared by every connection, reserved as their bytes arrive: a body holds twice what
//! it has sent so far (the bytes, and what parsing makes of them, at most as much again), so a
//! client that trickles a large upload holds only what it has actually sent, and a small
//! request is served at once beside it. A body that has not started waits for its first
//! unit until its read deadline, then gets 429; a body that needs more than is left gets 429
//! at once and gives back what it held (waiting while holding part of the budget would let
//! bodies that each hold a part wait for one another until their deadlines). Input images are decoded off the async runtime
//! (decoding a large PNG takes seconds of CPU, which would stall every connection on that
//! runtime thread, `/health` included), a few at a time, since each decode may take up to
//! 256 MiB.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::ApiError;

/// The unit of the body budget.
const UNIT: usize = 1024 * 1024;

pub struct Admission {
    body_units: Arc<Semaphore>,
    total_units: usize,
    decoders: Arc<Semaphore>,
}

/// Held while a body is read and validated; returns its share of the budget when dropped.
pub struct Reservation {
    body: OwnedSemaphorePermit,
}

impl Reservation {
    /// Budget units held.
    fn units(&self) -> usize {
        self.body.num_permits()
    }
}

impl Admission {
    /// `body_budget` bytes for bodies being read and parsed at once (at least enough for one
    /// of `body_limit` bytes), `decoders` image decodes at once.
    pub fn new(body_budget: usize, body_limit: usize, decoders: usize) -> Self {
        let total_units = body_budget.max(2 * body_limit).div_ceil(UNIT).max(1);
        Self {
            body_units: Arc::new(Semaphore::new(total_units)),
            total_units,
            decoders: Arc::new(Semaphore::new(decoders.max(1))),
        }
    }

    /// Reads `body` whole within `timeout`: 413 once more than `limit` bytes arrived (read up
    /// to there even when the declared length is larger, so that the client, still sending,
    /// gets to read the answer), 408 when it has not all arrived in time, 429 when the budget
    /// stays spent until then before it starts, or is spent when it needs more. The reservation comes back with the bytes: keep it while they are
    /// parsed.
    pub async fn read_body(
        &self,
        body: Body,
        limit: usize,
        timeout: Duration,
    ) -> Result<(Bytes, Reservation), ApiError> {
        let deadline = Instant::now() + timeout;
        let first = tokio::time::timeout_at(deadline, self.body_units.clone().acquire_owned())
            .await
            .map_err(|_| ApiError::BodiesBusy)?
            .map_err(|_| ApiError::ShuttingDown)?;
        let mut reservation = Reservation { body: first };
        let mut body = body;
        let mut bytes = Vec::new();
        loop {
            let frame = tokio::time::timeout_at(deadline, body.frame()).await.map_err(|_| ApiError::BodyTimeout)?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
            let Ok(data) = frame.into_data() else { continue }; // trailers
            let received = bytes.len() + data.len();
            if received > limit {
                return Err(ApiError::PayloadTooLarge(limit));
            }
            let needed = (2 * received).div_ceil(UNIT).clamp(1, self.total_units);
            if needed > reservation.units() {
                let more = self.body_units.clone().try_acquire_many_owned((needed - reservation.units()) as u32);
                reservation.body.merge(more.map_err(|_| ApiError::BodiesBusy)?);
            }
            bytes.extend_from_slice(&data);
        }
        Ok((Bytes::from(bytes), reservation))
    }

    /// Runs `work` (validation that may decode images) on the blocking pool, at most
    /// `decoders` at once.
    pub async fn decode<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self.decoders.clone().acquire_owned().await.map_err(|_| ApiError::ShuttingDown)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|_| ApiError::Internal)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that sends `first`, then nothing more until `rest` is sent.
    fn trickled(first: usize) -> (Body, tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.try_send(Ok(Bytes::from(vec![b'x'; first]))).unwrap();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        (Body::from_stream(stream), tx)
    }

    /// What [`Admission::read_body`] answers for an upload, and the sender of its rest.
    type Upload = (
        tokio::task::JoinHandle<Result<(Bytes, Reservation), ApiError>>,
        tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    );

    /// Two uploads that declared nothing and sent 1.5 MiB each, read until each holds its 3
    /// units (twice what it sent) of a budget of 8.
    async fn two_uploads_of_one_and_a_half_units(admission: &Arc<Admission>, long: Duration) -> Vec<Upload> {
        let mut uploads = Vec::new();
        for _ in 0..2 {
            let (body, tx) = trickled(3 * UNIT / 2);
            let admission = admission.clone();
            uploads.push((tokio::spawn(async move { admission.read_body(body, 4 * UNIT, long).await }), tx));
        }
        tokio::time::timeout(long, async {
            while admission.body_units.available_permits() > 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        uploads
    }

    #[tokio::test]
    async fn a_body_holds_what_it_has_sent_and_small_ones_pass_beside_it() {
        let admission = Arc::new(Admission::new(8 * UNIT, 4 * UNIT, 1));
        let long = Duration::from_secs(30);
        let mut uploads = two_uploads_of_one_and_a_half_units(&admission, long).await;
        assert_eq!(admission.body_units.available_permits(), 2, "each holds twice what it sent");
        let started = std::time::Instant::now();
        let (small, held) = admission.read_body(Body::from("{\"prompt\":\"x\"}"), 4 * UNIT, long).await.unwrap();
        assert_eq!(&small[..], b"{\"prompt\":\"x\"}");
        assert!(started.elapsed() < Duration::from_secs(1), "not behind the uploads");
        drop(held);
        // an upload grows while there is budget left
        let (first, first_tx) = uploads.remove(0);
        let (second, second_tx) = uploads.remove(0);
        first_tx.send(Ok(Bytes::from(vec![b'y'; UNIT]))).await.unwrap();
        drop(first_tx);
        drop(second_tx);
        let (bytes, reservation) = first.await.unwrap().unwrap();
        assert_eq!(bytes.len(), 5 * UNIT / 2);
        assert_eq!(reservation.units(), 5);
        let (_, second_held) = second.await.unwrap().unwrap();
        assert_eq!(second_held.units(), 3);
    }

    // regression: bodies that each held part of the budget waited for one another's, all
    // until their deadlines (12 concurrent 100 MB bodies: 408 after 60 s)
    #[tokio::test]
    async fn bodies_that_outgrow_the_budget_are_refused_at_once() {
        let admission = Arc::new(Admission::new(8 * UNIT, 4 * UNIT, 1));
        let long = Duration::from_secs(30);
        let uploads = two_uploads_of_one_and_a_half_units(&admission, long).await;
        // both need 2 more units than is left: neither waits
        let started = std::time::Instant::now();
        let mut outcomes = Vec::new();
        for (upload, tx) in uploads {
            let _ = tx.send(Ok(Bytes::from(vec![b'y'; 2 * UNIT]))).await;
            drop(tx);
            outcomes.push(upload.await.unwrap());
        }
        assert!(started.elapsed() < Duration::from_secs(5), "refused at once, not at the deadline");
        assert!(outcomes.iter().any(|o| matches!(o, Err(ApiError::BodiesBusy))));
        drop(outcomes);
        assert_eq!(admission.body_units.available_permits(), 8, "every unit comes back");
    }

    #[tokio::test]
    async fn limits_and_deadlines() {
        let admission = Admission::new(4 * UNIT, 2 * UNIT, 1);
        let short = Duration::from_millis(100);
        let undeclared = admission.read_body(Body::from(vec![0; 2 * UNIT + 1]), 2 * UNIT, short).await;
        assert!(matches!(undeclared, Err(ApiError::PayloadTooLarge(_))));
        let (stalled, _tx) = trickled(10);
        let late = admission.read_body(stalled, 2 * UNIT, short).await;
        assert!(matches!(late, Err(ApiError::BodyTimeout)));
        // the budget spent by one body: another gets 429 at its deadline
        let admission = Arc::new(admission);
        let (held_body, held_tx) = trickled(2 * UNIT - 10);
        let holder = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.read_body(held_body, 2 * UNIT, Duration::from_secs(30)).await })
        };
        tokio::time::timeout(Duration::from_secs(30), async {
            while admission.body_units.available_permits() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let busy = admission.read_body(Body::from("{}"), 2 * UNIT, short).await;
        assert!(matches!(busy, Err(ApiError::BodiesBusy)));
        drop(held_tx);
        let (_, reservation) = holder.await.unwrap().unwrap();
        drop(reservation);
        assert_eq!(admission.body_units.available_permits(), 4, "every unit comes back");
    }

    #[tokio::test]
    async fn decoding_runs_off_the_runtime_and_returns_its_result() {
        let admission = Admission::new(UNIT, UNIT, 1);
        let value = admission.decode(|| Ok(41 + 1)).await.unwrap();
        assert_eq!(value, 42);
        let err = admission.decode(|| Err::<(), _>(ApiError::BadRequest("no".into()))).await.unwrap_err();
        assert!(matches!(err, ApiError::BadRequest(_)));
    }
}
