//! Where each client's running AUTOMATIC1111 request stands, for `GET /sdapi/v1/progress`,
//! and the switch `POST /sdapi/v1/interrupt` flips. AUTOMATIC1111 has one global job; here
//! each owner (API key) sees and interrupts only its own requests, latest first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sdxl_models::pixels::RgbImage;
use tokio::sync::Notify;

/// Every owner's running batches.
#[derive(Default)]
pub struct Board {
    batches: Mutex<HashMap<Arc<str>, Vec<Arc<Batch>>>>,
    next_id: AtomicU64,
}

/// One request's batch of images while it runs.
pub struct Batch {
    id: u64,
    started: Instant,
    state: Mutex<BatchState>,
    interrupted: AtomicBool,
    interrupt: Notify,
}

/// What a progress answer reads of a batch.
#[derive(Debug, Clone, Default)]
pub struct BatchState {
    pub images: usize,
    /// The image being made, 0-based.
    pub image: usize,
    pub step: usize,
    pub steps: usize,
    /// Jobs ahead in the queue while the image waits.
    pub waiting_behind: Option<usize>,
    pub preview: Option<RgbImage>,
}

/// A snapshot of the latest batch of an owner.
pub struct Snapshot {
    pub state: BatchState,
    pub elapsed: Duration,
    pub interrupted: bool,
}

impl Board {
    /// Registers a batch of `images` for `owner`; it leaves the board when the guard drops.
    pub fn start(self: &Arc<Self>, owner: &str, images: usize) -> BatchGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let batch = Arc::new(Batch {
            id,
            started: Instant::now(),
            state: Mutex::new(BatchState { images, ..BatchState::default() }),
            interrupted: AtomicBool::new(false),
            interrupt: Notify::new(),
        });
        self.lock().entry(owner.into()).or_default().push(batch.clone());
        BatchGuard { board: self.clone(), owner: owner.into(), batch }
    }

    /// The latest of `owner`'s running batches.
    pub fn latest(&self, owner: &str) -> Option<Snapshot> {
        let batches = self.lock();
        let batch = batches.get(owner)?.last()?;
        let state = batch.state.lock().unwrap_or_else(PoisonError::into_inner).clone();
        Some(Snapshot {
            state,
            elapsed: batch.started.elapsed(),
            interrupted: batch.interrupted.load(Ordering::SeqCst),
        })
    }

    /// Interrupts every running batch of `owner`; answers how many.
    pub fn interrupt(&self, owner: &str) -> usize {
        let batches = self.lock();
        let running = batches.get(owner).map_or(&[][..], Vec::as_slice);
        for batch in running {
            batch.interrupted.store(true, Ordering::SeqCst);
            batch.interrupt.notify_one();
        }
        running.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Vec<Arc<Batch>>>> {
        self.batches.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A batch on the board; dropping it takes the batch off.
pub struct BatchGuard {
    board: Arc<Board>,
    owner: Arc<str>,
    batch: Arc<Batch>,
}

impl BatchGuard {
    /// Changes what progress answers show.
    pub fn update(&self, change: impl FnOnce(&mut BatchState)) {
        change(&mut self.batch.state.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The latest latent preview of the image being made.
    pub fn preview(&self) -> Option<RgbImage> {
        self.batch.state.lock().unwrap_or_else(PoisonError::into_inner).preview.clone()
    }

    /// Whether the batch was interrupted.
    pub fn interrupted(&self) -> bool {
        self.batch.interrupted.load(Ordering::SeqCst)
    }

    /// Resolves when the batch is interrupted (at once if it already was).
    pub async fn until_interrupted(&self) {
        loop {
            let notified = self.batch.interrupt.notified();
            if self.interrupted() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        let mut batches = self.board.lock();
        if let Some(list) = batches.get_mut(&self.owner) {
            list.retain(|b| b.id != self.batch.id);
            if list.is_empty() {
                batches.remove(&self.owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_sees_and_interrupts_only_its_own_batches() {
        let board = Arc::new(Board::default());
        let alice = board.start("alice", 2);
        alice.update(|s| s.step = 3);
        let bob = board.start("bob", 1);
        assert_eq!(board.latest("alice").unwrap().state.step, 3);
        assert_eq!(board.latest("alice").unwrap().state.images, 2);
        assert_eq!(board.interrupt("bob"), 1);
        assert!(bob.interrupted() && !alice.interrupted());
        assert_eq!(board.interrupt("carol"), 0);
        drop(alice);
        assert!(board.latest("alice").is_none());
        futures_util::FutureExt::now_or_never(bob.until_interrupted()).expect("already interrupted");
    }
}
