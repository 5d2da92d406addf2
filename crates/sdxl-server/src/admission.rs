//! What a request may cost before it reaches the queue. Bodies are read within a memory
//! budget shared by every connection (each reserves twice its declared length, or twice the
//! body limit when it declares none: the bytes, and what parsing makes of them, at most as
//! much again), so many large uploads at once wait for each other instead
//! of exhausting memory; small requests reserve one unit and never wait behind a slow
//! client. Input images are decoded off the async runtime (decoding a large PNG takes
//! seconds of CPU, which would stall every connection on that runtime thread, `/health`
//! included), a few at a time, since each decode may take up to 256 MiB.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    _body: OwnedSemaphorePermit,
}

impl Admission {
    /// `body_budget` bytes for bodies being read and parsed at once (at least enough for one),
    /// `decoders` image decodes at once.
    pub fn new(body_budget: usize, body_limit: usize, decoders: usize) -> Self {
        let total_units = body_budget.max(2 * body_limit).div_ceil(UNIT).max(1);
        Self {
            body_units: Arc::new(Semaphore::new(total_units)),
            total_units,
            decoders: Arc::new(Semaphore::new(decoders.max(1))),
        }
    }

    /// Reserves memory for a body of `declared` bytes (`None`: unknown, so the whole
    /// `limit`) and its parsed form, waiting at most `patience`; a server too busy to take it
    /// answers 429.
    pub async fn reserve_body(
        &self,
        declared: Option<usize>,
        limit: usize,
        patience: Duration,
    ) -> Result<Reservation, ApiError> {
        let bytes = 2 * declared.unwrap_or(limit).min(limit);
        let units = bytes.div_ceil(UNIT).clamp(1, self.total_units) as u32;
        let permit = tokio::time::timeout(patience, self.body_units.clone().acquire_many_owned(units))
            .await
            .map_err(|_| ApiError::QueueFull { retry_after_seconds: 5 })?
            .map_err(|_| ApiError::ShuttingDown)?;
        Ok(Reservation { _body: permit })
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

    #[tokio::test]
    async fn large_bodies_wait_for_each_other_and_small_ones_do_not() {
        let admission = Admission::new(20 * UNIT, 8 * UNIT, 1);
        let patience = Duration::from_millis(50);
        let big = admission.reserve_body(Some(8 * UNIT), 8 * UNIT, patience).await.unwrap();
        // a second large body does not fit beside the first: refused after the wait
        let second = admission.reserve_body(Some(8 * UNIT), 8 * UNIT, patience).await;
        assert!(matches!(second, Err(ApiError::QueueFull { .. })));
        // an undeclared length reserves the whole limit
        assert!(admission.reserve_body(None, 8 * UNIT, patience).await.is_err());
        // small bodies still fit beside it
        let small_a = admission.reserve_body(Some(300), 8 * UNIT, patience).await.unwrap();
        let small_b = admission.reserve_body(Some(0), 8 * UNIT, patience).await.unwrap();
        drop(big);
        assert!(admission.reserve_body(Some(8 * UNIT), 8 * UNIT, patience).await.is_ok());
        drop((small_a, small_b));
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
