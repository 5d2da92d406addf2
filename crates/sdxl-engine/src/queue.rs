//! The job queue and the worker thread that owns the model.
//!
//! Async front ends never run the model: they [`Queue::submit`] a validated request and
//! await the [`Ticket`]. One plain std thread (`sdxl-worker`) owns the [`Backend`] and runs
//! one job at a time, first come first served, blocking on a `Mutex<VecDeque>` + `Condvar`;
//! no async runtime runs inside the engine. Replies travel on a `tokio::sync::oneshot`
//! channel, progress [`Event`]s (queue position, each step, previews on request) on an
//! unbounded `tokio::sync::mpsc` channel, so a handler can await both. The channel is bounded
//! in practice: a job sends at most one event per step and one per change of its position.
//!
//! Life of a job:
//! - `submit` refuses at once with [`Error::QueueFull`] when `capacity` jobs already wait,
//!   with [`Error::ShareFull`] when the job's owner already has `owner_share` jobs waiting
//!   (so one client cannot take every slot), and with [`Error::ShuttingDown`] after
//!   [`Queue::shutdown`].
//! - A job submitted [`Placement::Ahead`] (the durable job runner's) waits in front of the
//!   others, at most one such job at a time and outside `capacity`: when stored and
//!   synchronous work both wait, they alternate.
//! - Dropping the [`Ticket`] (the client went away) withdraws a waiting job from the queue,
//!   freeing its slot at once; a running job stops at its next denoising step.
//! - A job whose deadline passes while it waits is answered [`Error::Timeout`] without
//!   running, at the latest one denoising step (of the running job) later; a running job
//!   whose deadline passes stops with [`Error::Timeout`] at its next step.
//! - A backend error answers that job; a backend panic answers it [`Error::Internal`]; the
//!   worker goes on with the next job either way.
//!
//! Queue time is submission → start of generation; inference time is start → end.

use std::any::Any;
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use sdxl_models::pipeline::Pipeline;
use sdxl_models::pixels::RgbImage;
use tokio::sync::{mpsc, oneshot};

use crate::metric_names::{self, count_job, Outcome};
use crate::{Error, GenerateRequest, Result};

/// What the worker runs: a model that turns one request into an image.
pub trait Backend: Send + 'static {
    /// Runs one request; calls `on_step` after each denoising step and stops (returning
    /// `Err(Error::Cancelled)`) when it answers [`ControlFlow::Break`].
    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(&Step) -> ControlFlow<()>,
    ) -> Result<RgbImage>;
}

/// A denoising step a [`Backend`] has finished.
pub struct Step<'a> {
    /// Steps done, 1-based.
    pub done: usize,
    pub total: usize,
    /// The latents after this step, `[1, 4, h, w]`, and the pipeline that made them (whose
    /// decoders make the previews), when the backend has them.
    pub latents: Option<(&'a Tensor, &'a Pipeline)>,
}

/// The real backend: a loaded [`Pipeline`], running [`crate::generate::generate`].
pub struct PipelineBackend(pub Pipeline);

impl Backend for PipelineBackend {
    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(&Step) -> ControlFlow<()>,
    ) -> Result<RgbImage> {
        let pipeline = &self.0;
        crate::generate::generate(pipeline, request, &mut |progress| {
            on_step(&Step { done: progress.step, total: progress.total, latents: Some((progress.latents, pipeline)) })
        })
    }
}

/// How many jobs the queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Jobs that may wait; the running job is not counted. With 0, a job is accepted only
    /// when the worker is free.
    pub capacity: usize,
    /// Jobs one owner may have waiting (see [`Submission::owner`]); jobs without an owner
    /// are limited by `capacity` only.
    pub owner_share: usize,
}

impl QueueConfig {
    /// `capacity` waiting jobs, with no owner limited below it.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { capacity, owner_share: capacity }
    }
}

/// Where a submitted job waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// Behind every waiting job (first come, first served).
    #[default]
    Back,
    /// In front of the waiting jobs: refused with [`Error::QueueFull`] only while another
    /// job placed ahead still waits, and not counted against the capacity.
    Ahead,
}

/// How to queue a request: see [`Queue::submit_with`].
#[derive(Debug, Clone, Default)]
pub struct Submission {
    /// Who the job is for (an opaque name, e.g. a hash of the client's key): their waiting
    /// jobs count against [`QueueConfig::owner_share`].
    pub owner: Option<Arc<str>>,
    /// Whether step events carry previews.
    pub previews: bool,
    pub placement: Placement,
}

/// What a job reports while it waits and runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Waiting, with `position` jobs ahead of it (0: it runs next). Sent when it changes.
    Queued { position: usize },
    /// Denoising step `step` of `total` finished, `elapsed` after the job started; with a
    /// [`crate::preview`] of the latents if the job was submitted with previews.
    Step { step: usize, total: usize, elapsed: Duration, preview: Option<RgbImage> },
}

/// What [`Ticket::next`] answers: an event, or the job's result, which comes last.
#[derive(Debug)]
pub enum Update {
    Event(Event),
    Done(Result<Completed>),
}

/// A finished job.
#[derive(Debug)]
pub struct Completed {
    /// Exactly the requested `width × height`.
    pub image: RgbImage,
    /// Submission → start of generation.
    pub queue_time: Duration,
    /// Start → end of generation.
    pub inference_time: Duration,
}

/// Handle to the queue and its worker; clones share them. When the last clone is dropped
/// the queue shuts down as by [`Queue::shutdown`] (the worker finishes its job and exits).
#[derive(Clone)]
pub struct Queue {
    handle: Arc<Handle>,
}

/// Shuts the queue down when the last [`Queue`] clone goes; the worker and the tickets hold
/// [`Shared`] directly, so they do not keep it open.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

/// The state the queue handles, the tickets and the worker share.
struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued or the queue shuts down; the worker waits on it.
    work: Condvar,
    /// Signalled when the worker finishes a job or the waiting list shrinks.
    idle: Condvar,
    capacity: usize,
    owner_share: usize,
}

struct State {
    waiting: VecDeque<Job>,
    running: bool,
    accepting: bool,
    next_id: u64,
}

struct Job {
    id: u64,
    request: GenerateRequest,
    deadline: Instant,
    submitted: Instant,
    reply: oneshot::Sender<Result<Completed>>,
    events: mpsc::UnboundedSender<Event>,
    /// Whether step events carry previews.
    previews: bool,
    owner: Option<Arc<str>>,
    placement: Placement,
    /// The queue position last sent, to send only changes.
    position: Option<usize>,
}

impl Queue {
    /// Spawns the worker thread (named `sdxl-worker`) that owns `backend` and runs one job
    /// at a time.
    ///
    /// # Panics
    /// If the operating system cannot start a thread.
    pub fn start<B: Backend>(backend: B, config: QueueConfig) -> Queue {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { waiting: VecDeque::new(), running: false, accepting: true, next_id: 0 }),
            work: Condvar::new(),
            idle: Condvar::new(),
            capacity: config.capacity,
            owner_share: config.owner_share,
        });
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("sdxl-worker".into())
            .spawn(move || work(backend, &worker))
            .expect("the operating system must start the worker thread");
        metrics::gauge!(metric_names::QUEUE_DEPTH).set(0.0);
        Queue { handle: Arc::new(Handle { shared }) }
    }

    /// Queues `request`, to be answered `Err(Error::Timeout)` if it has not finished by
    /// `deadline` (checked while it waits and between denoising steps). Refuses at once with
    /// [`Error::QueueFull`] when `capacity` jobs already wait, and with
    /// [`Error::ShuttingDown`] after [`Queue::shutdown`].
    pub fn submit(&self, request: GenerateRequest, deadline: Instant) -> Result<Ticket> {
        self.submit_with(request, deadline, Submission::default())
    }

    /// [`Queue::submit`], with a preview of the latents in every [`Event::Step`].
    pub fn submit_with_previews(&self, request: GenerateRequest, deadline: Instant) -> Result<Ticket> {
        self.submit_with(request, deadline, Submission { previews: true, ..Submission::default() })
    }

    /// [`Queue::submit`] for an owner, with previews or placed ahead as `how` says. Refuses
    /// with [`Error::ShareFull`] when the owner already has its share of the queue waiting.
    pub fn submit_with(&self, request: GenerateRequest, deadline: Instant, how: Submission) -> Result<Ticket> {
        let shared = &self.handle.shared;
        let mut state = shared.lock();
        if !state.accepting {
            return Err(Error::ShuttingDown);
        }
        // A free worker takes the next job at once, so it does not count as waiting.
        let free_worker = usize::from(!state.running);
        let position = match how.placement {
            Placement::Ahead => {
                let ahead = state.waiting.iter().take_while(|job| job.placement == Placement::Ahead).count();
                if ahead > 0 {
                    return Err(Error::QueueFull);
                }
                0
            }
            Placement::Back => {
                let counted = state.waiting.iter().filter(|job| job.placement == Placement::Back).count();
                if counted >= shared.capacity + free_worker {
                    return Err(Error::QueueFull);
                }
                if let Some(owner) = &how.owner {
                    let theirs = state.waiting.iter().filter(|job| job.owner.as_ref() == Some(owner)).count();
                    if theirs >= shared.owner_share + free_worker {
                        return Err(Error::ShareFull { share: shared.owner_share });
                    }
                }
                state.waiting.len()
            }
        };
        let id = state.next_id;
        state.next_id += 1;
        let (reply, reply_rx) = oneshot::channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let submitted = Instant::now();
        let Submission { owner, previews, placement } = how;
        let job = Job { id, request, deadline, submitted, reply, events, previews, owner, placement, position: None };
        state.waiting.insert(position, job);
        publish_queue(&mut state);
        drop(state);
        shared.work.notify_one();
        Ok(Ticket { id, shared: Arc::clone(shared), reply: Some(reply_rx), events: events_rx })
    }

    /// Jobs waiting to start (the queue depth; the running job not counted).
    pub fn waiting(&self) -> usize {
        self.handle.shared.lock().waiting.len()
    }

    /// Whether a job is running.
    pub fn busy(&self) -> bool {
        self.handle.shared.lock().running
    }

    /// How many jobs may wait ([`QueueConfig::capacity`]).
    pub fn capacity(&self) -> usize {
        self.handle.shared.capacity
    }

    /// Stops accepting jobs; jobs still waiting are answered `Err(Error::ShuttingDown)`.
    /// The running job continues (unless its deadline passes or its ticket is dropped);
    /// then the worker exits, dropping the backend. Calling it again does nothing.
    pub fn shutdown(&self) {
        self.handle.shared.shutdown();
    }

    /// Blocks until no job runs or waits, at most `timeout`; `true` if the queue went idle
    /// in time. After [`Queue::shutdown`] this waits for the running job only.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let shared = &self.handle.shared;
        let state = shared.lock();
        let (state, _) = shared
            .idle
            .wait_timeout_while(state, timeout, |s| s.running || !s.waiting.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        !state.running && state.waiting.is_empty()
    }
}

/// A submitted job, held by the request handler. Dropping it (the client disconnected)
/// cancels the job: a waiting job leaves the queue and never starts, a running one stops
/// at its next denoising step.
pub struct Ticket {
    id: u64,
    shared: Arc<Shared>,
    /// `None` once the result has been taken by [`Ticket::next`].
    reply: Option<oneshot::Receiver<Result<Completed>>>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Ticket {
    /// The job's result, its events unread. Dropping this future drops the ticket, which
    /// cancels the job.
    pub async fn wait(mut self) -> Result<Completed> {
        match self.reply.take() {
            Some(reply) => answer(reply.await),
            None => Err(Error::Internal("the result was already taken".into())),
        }
    }

    /// The job's next event in order, then its result (after every event it sent); after
    /// the result, `Done(Err(Error::Internal))`. Dropping the ticket cancels the job.
    pub async fn next(&mut self) -> Update {
        let Some(reply) = &mut self.reply else {
            return Update::Done(Err(Error::Internal("the result was already taken".into())));
        };
        // The worker sends a job's events before its result, so preferring events keeps the
        // order.
        tokio::select! {
            biased;
            Some(event) = self.events.recv() => Update::Event(event),
            result = reply => {
                self.reply = None;
                Update::Done(answer(result))
            }
        }
    }
}

fn answer(received: std::result::Result<Result<Completed>, oneshot::error::RecvError>) -> Result<Completed> {
    // Only a worker that died outside the backend call drops a job unanswered.
    received.unwrap_or_else(|_| Err(Error::Internal("the worker stopped without answering".into())))
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.shared.withdraw(self.id);
    }
}

impl Shared {
    /// The state; a poisoned lock is taken over (no code panics while holding it, and the
    /// state stays consistent between statements).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until there is a job to run (marking it running) or the queue has shut down.
    fn next_job(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.waiting.pop_front() {
                state.running = true;
                publish_queue(&mut state);
                return Some(job);
            }
            if !state.accepting {
                return None;
            }
            state = self.work.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn finish_job(&self) {
        self.lock().running = false;
        self.idle.notify_all();
    }

    /// Removes the waiting job `id`, if it is still waiting (its ticket was dropped).
    fn withdraw(&self, id: u64) {
        let mut state = self.lock();
        let Some(position) = state.waiting.iter().position(|job| job.id == id) else {
            return;
        };
        state.waiting.remove(position);
        publish_queue(&mut state);
        drop(state);
        self.idle.notify_all();
        count_job(Outcome::Cancelled);
    }

    /// Answers `Err(Error::Timeout)` to every waiting job whose deadline is past.
    fn expire_waiting(&self, now: Instant) {
        let mut state = self.lock();
        if state.waiting.iter().all(|job| job.deadline > now) {
            return;
        }
        let (expired, kept): (VecDeque<Job>, VecDeque<Job>) =
            std::mem::take(&mut state.waiting).into_iter().partition(|job| job.deadline <= now);
        state.waiting = kept;
        publish_queue(&mut state);
        drop(state);
        self.idle.notify_all();
        for job in expired {
            count_job(Outcome::Timeout);
            // The requester may be gone already; then there is no one to tell.
            let _ = job.reply.send(Err(Error::Timeout));
        }
    }

    fn shutdown(&self) {
        let mut state = self.lock();
        state.accepting = false;
        let drained = std::mem::take(&mut state.waiting);
        publish_queue(&mut state);
        drop(state);
        self.work.notify_all();
        self.idle.notify_all();
        for job in drained {
            count_job(Outcome::Cancelled);
            let _ = job.reply.send(Err(Error::ShuttingDown));
        }
    }
}

/// Publishes the queue depth, and each waiting job's position where it changed.
fn publish_queue(state: &mut State) {
    metrics::gauge!(metric_names::QUEUE_DEPTH).set(state.waiting.len() as f64);
    for (position, job) in state.waiting.iter_mut().enumerate() {
        if job.position != Some(position) {
            job.position = Some(position);
            // the requester may be gone already; its ticket's drop withdraws the job
            let _ = job.events.send(Event::Queued { position });
        }
    }
}

/// The worker thread: runs jobs until the queue shuts down and empties.
fn work<B: Backend>(mut backend: B, shared: &Shared) {
    while let Some(job) = shared.next_job() {
        run(&mut backend, shared, job);
        shared.finish_job();
    }
}

/// Runs one job and answers it.
fn run<B: Backend>(backend: &mut B, shared: &Shared, job: Job) {
    let Job { request, deadline, submitted, reply, events, previews, .. } = job;
    let start = Instant::now();
    if reply.is_closed() {
        count_job(Outcome::Cancelled);
        return;
    }
    if start >= deadline {
        count_job(Outcome::Timeout);
        let _ = reply.send(Err(Error::Timeout));
        return;
    }
    let queue_time = start - submitted;
    metrics::histogram!(metric_names::QUEUE_WAIT_SECONDS).record(queue_time.as_secs_f64());

    // Why the step callback stopped the run, if it did.
    let mut stopped: Option<Outcome> = None;
    let mut last_step: Option<Instant> = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        backend.generate(&request, &mut |step| {
            let now = Instant::now();
            if let Some(last) = last_step {
                metrics::histogram!(metric_names::STEP_SECONDS).record((now - last).as_secs_f64());
            }
            last_step = Some(now);
            let preview = match step.latents {
                // a preview that cannot be made (another latent layout) is left out
                Some((latents, pipeline)) if previews => {
                    crate::preview::preview(pipeline, latents, request.width, request.height).ok()
                }
                _ => None,
            };
            let _ = events.send(Event::Step { step: step.done, total: step.total, elapsed: now - start, preview });
            // Waiting jobs time out within one step of their deadline, not when they reach
            // the front of the queue.
            shared.expire_waiting(now);
            if reply.is_closed() {
                stopped = Some(Outcome::Cancelled);
                ControlFlow::Break(())
            } else if now >= deadline {
                stopped = Some(Outcome::Timeout);
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
    }));
    let inference_time = start.elapsed();

    let answer = match result {
        Ok(Ok(image)) => Ok(Completed { image, queue_time, inference_time }),
        Ok(Err(Error::Cancelled)) if stopped == Some(Outcome::Timeout) => Err(Error::Timeout),
        Ok(Err(e)) => Err(e),
        Err(payload) => Err(Error::Internal(format!("the model panicked: {}", panic_message(&*payload)))),
    };
    let outcome = match &answer {
        Ok(_) => Outcome::Ok,
        Err(Error::Timeout) => Outcome::Timeout,
        Err(Error::Cancelled) => Outcome::Cancelled,
        Err(_) => Outcome::Error,
    };
    if outcome == Outcome::Ok {
        metrics::histogram!(metric_names::GENERATION_SECONDS).record(inference_time.as_secs_f64());
    }
    count_job(outcome);
    let _ = reply.send(answer);
}

/// The text of a panic payload (`panic!` with a literal or with a format string).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "a panic without a message"
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::future::Future;
    use std::path::PathBuf;
    use std::sync::mpsc;

    use candle_core::{DType, Device};

    use super::*;
    use crate::request::{Limits, NoiseSource, RawRequest};

    /// Long enough that only a broken queue takes it: every wait below has an answer coming.
    const PATIENCE: Duration = Duration::from_secs(60);

    /// What the fake backend saw.
    #[derive(Default)]
    struct Seen {
        /// Prompts of the jobs it started, in order.
        started: Vec<String>,
        /// Steps it ran, by prompt.
        steps: HashMap<String, usize>,
    }

    /// A test backend: before each step it takes one permit from `permits` (or runs free
    /// once the test drops the sender), so the test decides when each step happens. The
    /// prompt `panic` panics in its first step.
    struct Fake {
        seen: Arc<Mutex<Seen>>,
        permits: mpsc::Receiver<()>,
        started: mpsc::Sender<String>,
    }

    impl Backend for Fake {
        fn generate(
            &mut self,
            request: &GenerateRequest,
            on_step: &mut dyn FnMut(&Step) -> ControlFlow<()>,
        ) -> Result<RgbImage> {
            let prompt = request.prompt.clone();
            self.seen.lock().unwrap().started.push(prompt.clone());
            let _ = self.started.send(prompt.clone());
            for step in 1..=request.steps {
                // Err: the test dropped the sender, every step runs at once
                let _ = self.permits.recv();
                if prompt == "panic" {
                    panic!("fake backend panics on request");
                }
                *self.seen.lock().unwrap().steps.entry(prompt.clone()).or_default() += 1;
                if on_step(&Step { done: step, total: request.steps, latents: None }).is_break() {
                    return Err(Error::Cancelled);
                }
            }
            Ok(RgbImage { width: 1, height: 1, pixels: vec![request.steps as u8; 3] })
        }
    }

    /// A queue over [`Fake`], with the controls of its steps.
    struct Harness {
        queue: Queue,
        permits: Option<mpsc::Sender<()>>,
        started: mpsc::Receiver<String>,
        seen: Arc<Mutex<Seen>>,
    }

    impl Harness {
        fn new(capacity: usize) -> Self {
            let (permit_tx, permits) = mpsc::channel();
            let (started_tx, started) = mpsc::channel();
            let seen = Arc::new(Mutex::new(Seen::default()));
            let fake = Fake { seen: Arc::clone(&seen), permits, started: started_tx };
            let queue = Queue::start(fake, QueueConfig::with_capacity(capacity));
            Harness { queue, permits: Some(permit_tx), started, seen }
        }

        fn submit(&self, prompt: &str, steps: usize) -> Result<Ticket> {
            self.queue.submit(request(prompt, steps), Instant::now() + PATIENCE)
        }

        /// Lets the backend run `n` more steps.
        fn permit(&self, n: usize) {
            for _ in 0..n {
                self.permits.as_ref().expect("steps are still gated").send(()).expect("the worker is alive");
            }
        }

        /// Lets every step from now on run at once.
        fn open(&mut self) {
            self.permits = None;
        }

        /// Blocks until the backend starts the job `prompt`.
        fn await_start(&self, prompt: &str) {
            let started = self.started.recv_timeout(PATIENCE).expect("a job starts");
            assert_eq!(started, prompt, "the job that started");
        }

        fn started(&self) -> Vec<String> {
            self.seen.lock().unwrap().started.clone()
        }

        fn steps_run(&self, prompt: &str) -> usize {
            self.seen.lock().unwrap().steps.get(prompt).copied().unwrap_or(0)
        }
    }

    fn request(prompt: &str, steps: usize) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            negative_prompt: None,
            width: 8,
            height: 8,
            steps,
            guidance: 0.0,
            noise: NoiseSource::Seed(0),
            source: None,
            sampling: Default::default(),
        }
    }

    /// Runs `future` on a small runtime; panics instead of hanging if it never finishes.
    fn block_on<F: Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a test runtime");
        runtime.block_on(async { tokio::time::timeout(PATIENCE, future).await.expect("the queue answered in time") })
    }

    /// Blocks until `ticket`'s job has reported step `step`; answers its events until then.
    fn await_step(ticket: &mut Ticket, step: usize) -> Vec<Event> {
        let mut events = Vec::new();
        block_on(async {
            loop {
                match ticket.next().await {
                    Update::Event(event) => {
                        let reached = matches!(event, Event::Step { step: done, .. } if done >= step);
                        events.push(event);
                        if reached {
                            return;
                        }
                    }
                    Update::Done(result) => panic!("the job ended before step {step}: {result:?}"),
                }
            }
        });
        events
    }

    /// The `(step, total)` of each step event.
    fn steps_of(events: &[Event]) -> Vec<(usize, usize)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Step { step, total, .. } => Some((*step, *total)),
                Event::Queued { .. } => None,
            })
            .collect()
    }

    #[test]
    fn the_handles_cross_threads_and_awaits() {
        fn send_sync<T: Send + Sync + Clone + 'static>() {}
        fn send<T: Send + 'static>(_: &T) {}
        send_sync::<Queue>();
        let mut h = Harness::new(1);
        let ticket = h.submit("a", 1).unwrap();
        h.open();
        let wait = ticket.wait();
        send(&wait); // an axum handler holds it across an await
        assert!(block_on(wait).is_ok());
    }

    #[test]
    fn jobs_run_in_submission_order() {
        let mut h = Harness::new(8);
        let a = h.submit("a", 1).unwrap();
        h.await_start("a");
        let b = h.submit("b", 2).unwrap();
        let b_submitted = Instant::now();
        let c = h.submit("c", 3).unwrap();
        assert_eq!(h.queue.waiting(), 2);
        assert!(h.queue.busy());
        let released = Instant::now();
        h.open();
        let (a, b, c) = (block_on(a.wait()).unwrap(), block_on(b.wait()).unwrap(), block_on(c.wait()).unwrap());
        assert_eq!(h.started(), ["a", "b", "c"]);
        assert_eq!(
            [a.image.pixels[0], b.image.pixels[0], c.image.pixels[0]],
            [1, 2, 3],
            "each ticket gets its own image"
        );
        // b could not start before a finished, which was after the release
        assert!(b.queue_time >= released - b_submitted, "queue time {:?}", b.queue_time);
        assert!(h.queue.wait_idle(PATIENCE));
        assert!(!h.queue.busy());
    }

    #[test]
    fn capacity_counts_only_waiting_jobs() {
        let mut h = Harness::new(1);
        let a = h.submit("a", 1).unwrap();
        h.await_start("a");
        let b = h.submit("b", 1).expect("one job may wait beside the running one");
        assert!(matches!(h.submit("c", 1), Err(Error::QueueFull)));
        assert_eq!(h.queue.waiting(), 1);
        h.open();
        block_on(a.wait()).unwrap();
        block_on(b.wait()).unwrap();
        assert_eq!(h.started(), ["a", "b"]);
    }

    #[test]
    fn one_owner_cannot_take_every_slot() {
        let (permit_tx, permits) = mpsc::channel();
        let (started_tx, started) = mpsc::channel();
        let fake = Fake { seen: Arc::default(), permits, started: started_tx };
        let queue = Queue::start(fake, QueueConfig { capacity: 4, owner_share: 2 });
        let as_owner = |prompt: &str, owner: &str| {
            let how = Submission { owner: Some(owner.into()), ..Submission::default() };
            queue.submit_with(request(prompt, 1), Instant::now() + PATIENCE, how)
        };
        let running = as_owner("a0", "a").unwrap();
        assert_eq!(started.recv_timeout(PATIENCE).unwrap(), "a0");
        let mut tickets = vec![running, as_owner("a1", "a").unwrap(), as_owner("a2", "a").unwrap()];
        assert!(matches!(as_owner("a3", "a"), Err(Error::ShareFull { share: 2 })), "a's share is used");
        tickets.push(as_owner("b1", "b").expect("another owner still gets a slot"));
        tickets.push(as_owner("b2", "b").unwrap());
        assert!(matches!(as_owner("c1", "c"), Err(Error::QueueFull)), "the queue itself is full");
        drop(permit_tx);
        for ticket in tickets {
            block_on(ticket.wait()).unwrap();
        }
    }

    #[test]
    fn a_job_placed_ahead_runs_next_and_only_one_waits_there() {
        let mut h = Harness::new(2);
        let a = h.submit("a", 1).unwrap();
        h.await_start("a");
        let b = h.submit("b", 1).unwrap();
        let c = h.submit("c", 1).unwrap();
        let ahead = Submission { placement: Placement::Ahead, ..Submission::default() };
        let stored = h.queue.submit_with(request("stored", 1), Instant::now() + PATIENCE, ahead.clone());
        let stored = stored.expect("outside the capacity, which b and c fill");
        assert_eq!(h.queue.waiting(), 3);
        let second = h.queue.submit_with(request("stored2", 1), Instant::now() + PATIENCE, ahead);
        assert!(matches!(second, Err(Error::QueueFull)), "one job ahead at a time");
        h.open();
        for ticket in [a, stored, b, c] {
            block_on(ticket.wait()).unwrap();
        }
        assert_eq!(h.started(), ["a", "stored", "b", "c"]);
    }

    #[test]
    fn capacity_zero_accepts_only_when_the_worker_is_free() {
        let h = Harness::new(0);
        let _a = h.submit("a", 1).expect("the worker is free");
        h.await_start("a");
        assert!(matches!(h.submit("b", 1), Err(Error::QueueFull)));
    }

    #[test]
    fn a_dropped_waiting_ticket_never_runs_and_frees_its_slot() {
        let mut h = Harness::new(1);
        let a = h.submit("a", 1).unwrap();
        h.await_start("a");
        let b = h.submit("b", 1).unwrap();
        assert_eq!(h.queue.waiting(), 1);
        drop(b);
        assert_eq!(h.queue.waiting(), 0);
        let c = h.submit("c", 1).expect("b's slot is free again");
        h.open();
        block_on(a.wait()).unwrap();
        block_on(c.wait()).unwrap();
        assert_eq!(h.started(), ["a", "c"]);
    }

    #[test]
    fn a_dropped_running_ticket_stops_at_the_next_step() {
        let mut h = Harness::new(1);
        let mut a = h.submit("a", 10).unwrap();
        h.permit(1);
        await_step(&mut a, 1);
        drop(a);
        h.permit(1);
        // without cancellation the worker would wait for a third permit and never go idle
        assert!(h.queue.wait_idle(PATIENCE), "the worker let go of the job");
        // step 1 publishes its progress before it looks at the ticket, so the drop may
        // already stop it there; otherwise step 2 does
        assert!((1..=2).contains(&h.steps_run("a")), "ran {} steps", h.steps_run("a"));
        h.open();
        let b = h.submit("b", 1).unwrap();
        assert!(block_on(b.wait()).is_ok(), "the worker serves the next job");
    }

    #[test]
    fn a_deadline_passing_in_the_queue_times_out_without_running() {
        let mut h = Harness::new(4);
        let a = h.submit("a", 3).unwrap();
        h.await_start("a");
        let b = h.queue.submit(request("b", 1), Instant::now()).unwrap();
        // the running job's next step finds b expired, long before b would start
        h.permit(1);
        assert!(matches!(block_on(b.wait()), Err(Error::Timeout)));
        assert_eq!(h.queue.waiting(), 0);
        h.open();
        block_on(a.wait()).unwrap();
        // an idle worker refuses an expired job when it takes it
        let c = h.queue.submit(request("c", 1), Instant::now()).unwrap();
        assert!(matches!(block_on(c.wait()), Err(Error::Timeout)));
        assert_eq!(h.started(), ["a"]);
    }

    #[test]
    fn a_deadline_passing_mid_run_times_out_at_the_next_step() {
        let h = Harness::new(1);
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut a = h.queue.submit(request("a", 10), deadline).unwrap();
        h.permit(1);
        await_step(&mut a, 1);
        // waiting for the clock itself, the thing under test
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        h.permit(1);
        assert!(matches!(block_on(a.wait()), Err(Error::Timeout)));
        // step 1 if it came after the deadline already (a slow machine), else step 2
        assert!((1..=2).contains(&h.steps_run("a")), "ran {} steps", h.steps_run("a"));
    }

    #[test]
    fn shutdown_refuses_new_jobs_and_answers_waiting_ones_while_the_running_one_finishes() {
        let mut h = Harness::new(4);
        let a = h.submit("a", 2).unwrap();
        h.await_start("a");
        let (b, c) = (h.submit("b", 1).unwrap(), h.submit("c", 1).unwrap());
        h.queue.shutdown();
        assert!(matches!(block_on(b.wait()), Err(Error::ShuttingDown)));
        assert!(matches!(block_on(c.wait()), Err(Error::ShuttingDown)));
        assert!(matches!(h.submit("d", 1), Err(Error::ShuttingDown)));
        assert!(h.queue.busy());
        assert!(!h.queue.wait_idle(Duration::from_millis(20)), "a is still running");
        h.open();
        let a = block_on(a.wait()).expect("the running job completes");
        assert_eq!(a.image.pixels[0], 2);
        assert!(h.queue.wait_idle(PATIENCE));
        assert_eq!(h.started(), ["a"]);
    }

    #[test]
    fn dropping_every_queue_handle_shuts_down() {
        let h = Harness::new(4);
        let a = h.submit("a", 1).unwrap();
        h.await_start("a");
        let b = h.submit("b", 1).unwrap();
        let Harness { queue, permits, .. } = h;
        drop(queue);
        assert!(matches!(block_on(b.wait()), Err(Error::ShuttingDown)));
        drop(permits);
        assert!(block_on(a.wait()).is_ok());
    }

    #[test]
    fn a_backend_panic_fails_only_that_job() {
        let mut h = Harness::new(4);
        h.open();
        let panicking = h.submit("panic", 1).unwrap();
        match block_on(panicking.wait()) {
            Err(Error::Internal(message)) => assert!(message.contains("fake backend panics"), "{message}"),
            other => panic!("expected an internal error, got {other:?}"),
        }
        let next = h.submit("b", 1).unwrap();
        assert!(block_on(next.wait()).is_ok());
        assert_eq!(h.started(), ["panic", "b"]);
    }

    #[test]
    fn events_report_the_position_then_each_step_then_the_result() {
        let h = Harness::new(1);
        let mut a = h.submit("a", 3).unwrap();
        let mut seen = Vec::new();
        for step in 1..=3 {
            h.permit(1);
            // the backend waits for the next permit, so the events cannot run ahead
            seen.extend(await_step(&mut a, step));
        }
        assert_eq!(seen[0], Event::Queued { position: 0 });
        assert_eq!(steps_of(&seen), [(1, 3), (2, 3), (3, 3)]);
        let elapsed: Vec<Duration> = seen
            .iter()
            .filter_map(|e| if let Event::Step { elapsed, .. } = e { Some(*elapsed) } else { None })
            .collect();
        assert!(elapsed.windows(2).all(|w| w[0] <= w[1]), "{elapsed:?}");
        assert!(matches!(block_on(a.next()), Update::Done(Ok(_))));
        assert!(matches!(block_on(a.next()), Update::Done(Err(Error::Internal(_)))), "the result comes once");
    }

    #[test]
    fn waiting_jobs_hear_their_position_as_it_changes() {
        let mut h = Harness::new(4);
        let a = h.submit("a", 1).unwrap();
        h.await_start("a");
        let mut b = h.submit("b", 1).unwrap();
        let mut c = h.submit("c", 1).unwrap();
        let mut d = h.submit("d", 1).unwrap();
        let next = |t: &mut Ticket| match block_on(t.next()) {
            Update::Event(event) => event,
            Update::Done(result) => panic!("expected an event, got {result:?}"),
        };
        assert_eq!(next(&mut b), Event::Queued { position: 0 });
        assert_eq!(next(&mut c), Event::Queued { position: 1 });
        assert_eq!(next(&mut d), Event::Queued { position: 2 });
        drop(b);
        assert_eq!(next(&mut c), Event::Queued { position: 0 });
        assert_eq!(next(&mut d), Event::Queued { position: 1 });
        h.open();
        block_on(a.wait()).unwrap();
        // c starts: d moves up; c's next event is its step
        assert_eq!(next(&mut d), Event::Queued { position: 0 });
        assert_eq!(steps_of(&[next(&mut c)]), [(1, 1)]);
    }

    #[test]
    fn the_pipeline_backend_matches_a_direct_generation() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures/tiny-sdxl");
        let load = || crate::model::load(&dir, DType::F32, &Device::Cpu).expect("the tiny model loads");
        let raw = RawRequest {
            prompt: "a red bicycle".into(),
            negative_prompt: None,
            width: Some(64),
            height: Some(64),
            steps: 2,
            guidance: 0.0,
            noise: NoiseSource::Seed(42),
            image: None,
            mask: None,
            strength: None,
            sampling: Default::default(),
        };
        let request = GenerateRequest::parse(raw, &Limits::CLI).unwrap();
        let direct = crate::generate::generate(&load(), &request, &mut |_| ControlFlow::Continue(())).unwrap();

        let queue = Queue::start(PipelineBackend(load()), QueueConfig::with_capacity(1));
        let mut ticket = queue.submit_with_previews(request, Instant::now() + PATIENCE).unwrap();
        let events = await_step(&mut ticket, 2);
        assert_eq!(steps_of(&events), [(1, 2), (2, 2)]);
        for event in &events {
            if let Event::Step { preview, .. } = event {
                let preview = preview.as_ref().expect("a preview with every step");
                assert_eq!((preview.width, preview.height), (8, 8), "one pixel per 8×8 cell");
            }
        }
        let queued = block_on(ticket.wait()).unwrap();
        assert_eq!((queued.image.width, queued.image.height), (64, 64));
        assert_eq!(queued.image, direct);
        assert_eq!(crate::png::encode(&queued.image).unwrap(), crate::png::encode(&direct).unwrap());
    }
}
