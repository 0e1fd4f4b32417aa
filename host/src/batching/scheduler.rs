//! The threads around the batching policy: one worker thread per ONNX Runtime session,
//! a mutex-guarded [`Batcher`], and a condition variable to wake workers.
//!
//! Requests come from async front doors and are answered over a oneshot channel, so the
//! async side never waits on a long inference and the workers never touch the async runtime.
//! One exception, measured to pay: a model with an idle session and nothing queued runs a
//! request right on the caller's thread ([`Scheduler::claim_inline`]) when its recent runs are
//! short: under `inline_max_us` (50 µs by default) at once, and under `inline_blocking_max_us`
//! (2 ms) after the caller's async runtime moves its other tasks away (the caller decides
//! how; [`InlineRun::blocks`]). The run then costs no wake-up of a worker thread and of the
//! waiting task (two futex round trips and two context switches: the largest item in the
//! node's profile at batch-1 load, and about 45 µs of a 100 µs model's latency at low load on
//! the development VM). Under load requests queue and batch as before: when requests are
//! queued, when every session is busy, and when they often arrive while others are in
//! progress (at any mean gap under `inline_min_gap_us`, 1 ms), even to an idle session: then
//! the front door's threads are what limits throughput, and the model's work is better done
//! on its worker, in batches (fraud at concurrency 64, no config.toml, on a 2-core VM:
//! 69-75k req/s against 55-60k when a 30 µs gap let clumps of requests run inline, one row
//! per run). One caller alone,
//! however fast, stays inline: each of its requests ends before the next arrives
//! ([`Arrivals`]). The prediction is the larger of a recent run (batched runs included, so
//! a model under load, whose batches take long, stays on its workers) and a recent row's time
//! times the request's rows (so a large request does not run inline on the strength of small
//! ones).

use crate::batching::arrivals::Arrivals;
use crate::batching::idle::{self, Submissions};
use crate::batching::policy::{BatchLimits, Batchable, Batcher, Refused, Step};
use crate::batching::stack::{same_inner_shapes, split, stack};
use crate::metrics::ModelMetrics;
use crate::model::session::{OnnxSession, RunError};
use crate::request::StageTimings;
use crate::tensor::Tensor;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A request in progress ([`Scheduler::enter`]).
pub struct Active(Arc<Shared>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.arrivals.leave();
    }
}

/// Why a queued request was not answered with outputs.
#[derive(Debug)]
pub enum JobError {
    /// Its deadline passed in the queue.
    Expired {
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// The model failed on its batch.
    Run(String),
    /// The inputs were accepted by validation but rejected by ONNX Runtime.
    BadInput(String),
}

/// Outputs of one request (every model output, in signature order) and its timings.
pub type JobResult = Result<(Vec<Tensor>, StageTimings), JobError>;

/// One request waiting for a session.
pub struct Job {
    /// Inputs in the model's signature order, validated.
    pub inputs: Vec<Tensor>,
    /// Rows along dimension 0 (1 for models that do not batch).
    pub rows: usize,
    /// When it was queued.
    pub enqueued_at: Instant,
    /// When it stops being worth running.
    pub deadline: Option<Instant>,
    /// The queue wait admission predicted for it (set by [`Scheduler::submit`]): compared with
    /// the real one when it runs, to calibrate the next predictions.
    pub predicted_wait: Option<Duration>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<JobResult>,
    /// Whether a worker took it, or its waiter gave up first: exactly one of them wins.
    pub claim: Arc<Claim>,
}

/// Decides, once, whether a queued request runs or is abandoned by its waiter (deadline): the
/// waiter can then say truthfully whether the request ran.
#[derive(Debug, Default)]
pub struct Claim(std::sync::atomic::AtomicU8);

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const ABANDONED: u8 = 2;

impl Claim {
    /// The worker takes the request; false if its waiter already gave up.
    fn run(&self) -> bool {
        self.swap_from_queued(RUNNING)
    }

    /// The waiter gives up; false if a worker already took the request (it ran, or runs).
    pub fn abandon(&self) -> bool {
        self.swap_from_queued(ABANDONED)
    }

    fn swap_from_queued(&self, to: u8) -> bool {
        use std::sync::atomic::Ordering;
        self.0
            .compare_exchange(QUEUED, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl Batchable for Job {
    fn rows(&self) -> usize {
        self.rows
    }
    fn enqueued_at(&self) -> Instant {
        self.enqueued_at
    }
    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
    fn compatible(&self, other: &Self) -> bool {
        same_inner_shapes(&self.inputs, &other.inputs)
    }
}

/// When a model's requests may run inline on the caller's thread: how long their runs may
/// take, and how close together they may arrive.
#[derive(Debug, Clone, Copy)]
pub struct InlineLimits {
    /// Runs shorter than this run inline at once (a front-door thread busy this long costs
    /// less than the two hand-offs it saves); zero: never.
    pub direct: Duration,
    /// Runs shorter than this run inline when the caller can first hand its other work to
    /// another thread; zero: never.
    pub blocking: Duration,
    /// Requests that arrive closer together than this, on average, while others are often in
    /// progress, queue even for an idle session: the front-door threads are then busy, and
    /// the model's work moved to its worker (in batches) leaves them free for the next
    /// request ([`Arrivals`]); zero: any rate may run inline.
    pub min_gap: Duration,
}

struct Shared {
    label: String,
    batcher: Mutex<Batcher<Job>>,
    wake: Condvar,
    /// Workers blocked on `wake`: a submit with none waiting needs no notify (a syscall).
    waiting: AtomicUsize,
    /// Jobs ever submitted, which an idle worker watches before it sleeps.
    submissions: Submissions,
    /// One per worker; a worker holds its own while it runs, an inline run any free one.
    sessions: Vec<Mutex<OnnxSession>>,
    /// Recent inference time per run, ns (an exponential average), and per row, which decide
    /// inline runs and predict waits; unmeasured, a model runs on its workers.
    recent_run_ns: AtomicU64,
    row_time: RowTime,
    /// Runs measured so far.
    runs: AtomicU64,
    /// How much longer queue waits turn out than run times predict, in thousandths (at least
    /// 1,000): the hand-offs between runs, and a machine that preempts the workers.
    wait_calibration: AtomicU64,
    /// Runs shorter than these may be inline: at once, or when the caller may block.
    inline: InlineLimits,
    /// Whether requests crowd the front door, so that even a fast model's go to its workers.
    arrivals: Arrivals,
    /// How long a request without a deadline may expect to wait.
    wait_bound: WaitBound,
    /// The queue's depth as last published ([`Shared::publish_depth`]), read without the lock.
    /// The model's depth gauge cannot serve: every loaded version of a model sets it.
    published_depth: AtomicUsize,
    metrics: ModelMetrics,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Batcher<Job>> {
        // A worker that panicked mid-batch leaves the queue itself consistent.
        self.batcher.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_one(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.wake.notify_one();
        }
    }

    fn wake_all(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.wake.notify_all();
        }
    }

    /// Until when a worker about to sleep should first watch for the next job, if at all:
    /// about one arrival gap while arrivals come close together, once per idle stretch
    /// (`watched`), never past `deadline` (see [`idle`]).
    fn watch_until(
        &self,
        now: Instant,
        deadline: Option<Instant>,
        watched: &mut bool,
    ) -> Option<Instant> {
        if *watched {
            return None;
        }
        let budget = idle::watch_budget(self.arrivals.recent_gap())?;
        *watched = true;
        Some(deadline.map_or(now + budget, |at| at.min(now + budget)))
    }

    fn observe_run(&self, took: Duration, rows: usize) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let rows = u64::try_from(rows.max(1)).unwrap_or(u64::MAX);
        average_into(&self.recent_run_ns, took);
        self.row_time.observe(took, rows);
        self.runs.fetch_add(1, Ordering::Relaxed);
    }

    /// Moves the wait calibration toward what `waited` says of `predicted`. Waits predicted
    /// under a millisecond are left out: there scheduling noise is most of the figure.
    fn calibrate(&self, predicted: Duration, waited: Duration) {
        if predicted < Duration::from_millis(1) {
            return;
        }
        let ratio = (waited.as_secs_f64() / predicted.as_secs_f64() * CALIBRATION_UNIT as f64)
            .clamp(CALIBRATION_UNIT as f64, MAX_CALIBRATION as f64) as u64;
        let old = self.wait_calibration.load(Ordering::Relaxed);
        self.wait_calibration
            .store(calibration_step(old, ratio), Ordering::Relaxed);
    }

    /// `wait` as the calibration stretches it.
    fn calibrated(&self, wait: Duration) -> Duration {
        let factor = self.wait_calibration.load(Ordering::Relaxed);
        Duration::from_nanos(
            u64::try_from(wait.as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_mul(factor)
                / CALIBRATION_UNIT,
        )
    }

    /// Publishes the queue's depth after it changed: to the metrics, and for
    /// [`Scheduler::over_wait_bound`]'s lock-free look.
    fn publish_depth(&self, batcher: &Batcher<Job>) {
        let depth = batcher.depth();
        self.published_depth.store(depth, Ordering::Relaxed);
        self.metrics.queue_depth.set(depth as i64);
    }

    /// What a request joining `batcher`'s queue now would have ahead of it.
    fn ahead(&self, batcher: &Batcher<Job>) -> Ahead {
        Ahead {
            rows: batcher.queued_rows(),
            every_session_busy: batcher.busy_sessions() >= self.sessions.len(),
        }
    }

    /// The wait bound a request predicted to wait `wait` behind `batcher`'s queue would
    /// exceed. The bound is on the wait, not on the request's own run (a large request alone
    /// on an idle model is never refused), and only for a queue it applies to.
    fn exceeded_bound(
        &self,
        batcher: &Batcher<Job>,
        wait: Duration,
        recent: Option<RunTimes>,
    ) -> Option<Duration> {
        let runs = self.runs.load(Ordering::Relaxed);
        let bound = self.wait_bound.limit(recent, runs)?;
        let shape = QueueShape {
            requests: batcher.depth(),
            rows: batcher.queued_rows(),
        };
        (wait > bound
            && self
                .wait_bound
                .applies(shape, self.sessions.len(), batcher.full_batch_rows()))
        .then_some(bound)
    }

    /// Recent run times, once the model has run.
    fn measured(&self) -> Option<RunTimes> {
        let run_ns = self.recent_run_ns.load(Ordering::Relaxed);
        let row_ns = self.row_time.per_row_ns()?;
        (run_ns != u64::MAX).then_some(RunTimes { run_ns, row_ns })
    }

    /// How long a run of `rows` rows would take, from recent runs: at least a recent run,
    /// and a large request in proportion to its rows.
    fn predicted_ns(&self, rows: usize) -> u64 {
        let per_row = self.row_time.per_row_ns().unwrap_or(u64::MAX);
        let per_run = self.recent_run_ns.load(Ordering::Relaxed);
        per_run.max(per_row.saturating_mul(u64::try_from(rows).unwrap_or(u64::MAX)))
    }
}

/// The next wait calibration after a wait `ratio` times its prediction (both in
/// [`CALIBRATION_UNIT`]s): a streaming estimate of the [`CALIBRATION_QUANTILE`] of the ratios
/// (Robbins–Monro: a fixed step up when a wait was longer than the factor allows, a
/// hundredth of it down otherwise, so it settles where one wait in a hundred is longer). The
/// bound is for nearly every admitted request, so the factor must cover nearly every
/// prediction's error, not the average one (an average-seeking factor left admitted waits'
/// p99 at 1.2x the bound under 2,000 clients). Steps of 2% of a unit: up by 0.3 in 15 long
/// waits, back down by 0.3 in 1,500 ordinary ones, about a second under the overloads where
/// it matters.
fn calibration_step(old: u64, ratio: u64) -> u64 {
    let step = CALIBRATION_UNIT / 50;
    let up = step * CALIBRATION_QUANTILE / 100;
    let down = step - up;
    if ratio > old {
        (old + up).min(ratio)
    } else {
        old.saturating_sub(down).max(CALIBRATION_UNIT)
    }
}

/// Recent run times of a model (exponential averages), in ns.
#[derive(Debug, Clone, Copy)]
pub struct RunTimes {
    /// Per run, batched runs included.
    pub run_ns: u64,
    /// Per row.
    pub row_ns: u64,
}

/// What is ahead of a request joining a model's queue.
#[derive(Debug, Clone, Copy)]
pub struct Ahead {
    /// Rows queued before it.
    pub rows: usize,
    /// Whether no session is free to take it now.
    pub every_session_busy: bool,
}

impl Ahead {
    /// An empty queue and a free session.
    pub const NOTHING: Ahead = Ahead {
        rows: 0,
        every_session_busy: false,
    };
}

/// When a request of `rows` rows would be answered, from recent run times (`None` before the
/// model has run): with every session busy, the first to free up is expected half a run from
/// now; then the rows ahead, spread over the sessions; then its own. A row's time comes from
/// recent, mostly batched, runs, so the prediction errs short.
pub fn predicted_answer(
    ahead: Ahead,
    rows: usize,
    sessions: usize,
    recent: Option<RunTimes>,
) -> Option<Duration> {
    let recent = recent?;
    let free_in = if ahead.every_session_busy {
        recent.run_ns / 2
    } else {
        0
    };
    let rows_ahead = u64::try_from(ahead.rows / sessions.max(1)).unwrap_or(u64::MAX);
    let own = u64::try_from(rows).unwrap_or(u64::MAX);
    Some(Duration::from_nanos(free_in.saturating_add(
        recent.row_ns.saturating_mul(rows_ahead.saturating_add(own)),
    )))
}

/// Whether a request predicted to be answered in `answer` (its `own` run included) misses a
/// deadline `left` from now because of the queue ahead: a deadline shorter than its own run
/// is no matter of load (that request queues and expires, 504, without running).
fn misses_deadline(own: Duration, answer: Duration, left: Duration) -> bool {
    own <= left && answer > left
}

/// The wait calibration's unit (a factor of 1), fine enough for its smallest step.
const CALIBRATION_UNIT: u64 = 1_000_000;

/// Waits are taken as at most this many times their prediction.
const MAX_CALIBRATION: u64 = 4 * CALIBRATION_UNIT;

/// The percentile of waits (against their predictions) that the calibration follows.
const CALIBRATION_QUANTILE: u64 = 99;

/// A bound of [`WaitBound::Auto`] is this many recent runs...
pub const AUTO_WAIT_RUNS: u32 = 50;

/// ...and at least this long: a model of microseconds still absorbs a burst.
pub const AUTO_WAIT_FLOOR: Duration = Duration::from_millis(20);

/// ...and only past this many full batches queued per session: a queue that batching
/// drains within two runs of each session is what batching is for, not overload, however
/// long those runs are (64 clients of a model whose 64-row batch takes 20 ms were refused by
/// a bound of 50 small runs, and a wait calibrated up by preempted runs).
pub const AUTO_WAIT_FULL_BATCHES: usize = 2;

/// ...once the model has run this many times: a prediction from a handful of runs (a cold
/// first one, one preempted on a busy machine) is no ground for refusing a burst.
pub const AUTO_WAIT_MIN_RUNS: u64 = 100;

/// How long a request without a deadline may expect to wait in a model's queue before it is
/// refused at once (503 with Retry-After) instead of queued: under overload the admitted
/// requests keep a bounded latency, and the rest learn at once instead of after a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitBound {
    /// [`AUTO_WAIT_RUNS`] of the model's recent runs, at least [`AUTO_WAIT_FLOOR`], for a
    /// queue of more than [`AUTO_WAIT_FULL_BATCHES`] full batches per session; no bound
    /// before it has run [`AUTO_WAIT_MIN_RUNS`] times.
    Auto,
    /// This long.
    At(Duration),
    /// No bound but the queue's capacity.
    Off,
}

impl WaitBound {
    /// From config.toml's `max_queue_wait_us`: unset is [`WaitBound::Auto`], 0 is
    /// [`WaitBound::Off`].
    pub fn from_config(max_queue_wait_us: Option<u64>) -> WaitBound {
        match max_queue_wait_us {
            None => WaitBound::Auto,
            Some(0) => WaitBound::Off,
            Some(us) => WaitBound::At(Duration::from_micros(us)),
        }
    }

    /// The bound now, given the model's recent run times and how many runs it has made.
    pub fn limit(self, recent: Option<RunTimes>, runs: u64) -> Option<Duration> {
        match self {
            WaitBound::Auto => recent.filter(|_| runs >= AUTO_WAIT_MIN_RUNS).map(|r| {
                Duration::from_nanos(r.run_ns.saturating_mul(u64::from(AUTO_WAIT_RUNS)))
                    .max(AUTO_WAIT_FLOOR)
            }),
            WaitBound::At(bound) => Some(bound),
            WaitBound::Off => None,
        }
    }

    /// The fewest requests queued for which any bound applies: two per session.
    pub fn min_depth(sessions: usize) -> usize {
        2 * sessions
    }

    /// Whether the bound applies to a queue of `queue` ahead, served by `sessions` sessions
    /// that run at most `full_batch_rows` rows at a time. Never to a queue less than two deep
    /// per session: one large request ahead is no overload, and a wait extrapolated to its
    /// rows from smaller runs (fixed costs and all) errs long. The automatic bound also waits
    /// until more than [`AUTO_WAIT_FULL_BATCHES`] full batches per session are queued; one
    /// the operator set applies as set.
    pub fn applies(self, queue: QueueShape, sessions: usize, full_batch_rows: usize) -> bool {
        let deep = queue.requests >= Self::min_depth(sessions);
        match self {
            WaitBound::Auto => {
                deep && queue.rows > AUTO_WAIT_FULL_BATCHES * full_batch_rows.max(1) * sessions
            }
            WaitBound::At(_) => deep,
            WaitBound::Off => false,
        }
    }
}

/// How much is queued ahead of a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueShape {
    /// Requests waiting.
    pub requests: usize,
    /// Their rows.
    pub rows: usize,
}

/// A model's recent time per row: decaying sums of run time and of rows (each halved at every
/// run), so a run weighs by its rows. A per-row average of runs would let one small run (whose
/// fixed cost is most of it) make a 1,024-row request look 25 times longer than it is.
#[derive(Debug, Default)]
struct RowTime {
    ns: AtomicU64,
    /// Rows, in 1/1024ths, so the halving keeps a single row.
    rows: AtomicU64,
}

impl RowTime {
    const ROW: u64 = 1024;

    /// Adds a run of `rows` rows that took `took` ns; a run counts at most four times what the
    /// estimate says (as [`average_into`] does), so one preempted run moves it little.
    /// Workers update it without a lock: a lost update costs a sample, nothing more.
    fn observe(&self, took: u64, rows: u64) {
        let took = match self.per_row_ns() {
            Some(per_row) => took.min(per_row.saturating_mul(rows).saturating_mul(4)),
            None => took,
        };
        let ns = self.ns.load(Ordering::Relaxed);
        let counted = self.rows.load(Ordering::Relaxed);
        self.ns.store(ns / 2 + took / 2, Ordering::Relaxed);
        self.rows.store(
            counted / 2 + rows.saturating_mul(Self::ROW) / 2,
            Ordering::Relaxed,
        );
    }

    /// Time per row, once a run was measured.
    fn per_row_ns(&self) -> Option<u64> {
        let rows = self.rows.load(Ordering::Relaxed);
        (rows > 0).then(|| {
            let ns = u128::from(self.ns.load(Ordering::Relaxed)) * u128::from(Self::ROW);
            u64::try_from(ns / u128::from(rows)).unwrap_or(u64::MAX)
        })
    }
}

/// Moves an exponential average of run times toward `took`. Halving: a model's first run
/// (ONNX Runtime's warm-up) can take a thousand times its usual one, and must not keep it off
/// the inline path for long. A run counts at most four times the estimate, so one preempted
/// run does not either; a model that really became slow is past the bound within a few runs.
fn average_into(estimate: &AtomicU64, took: u64) {
    let old = estimate.load(Ordering::Relaxed);
    let new = if old == u64::MAX {
        took
    } else {
        old / 2 + took.min(old.saturating_mul(4)) / 2
    };
    estimate.store(new, Ordering::Relaxed);
}

/// The queue and workers of one model version.
pub struct Scheduler {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Scheduler {
    /// Starts one worker thread per session.
    pub fn start(
        label: &str,
        sessions: Vec<OnnxSession>,
        limits: BatchLimits,
        inline: InlineLimits,
        wait_bound: WaitBound,
        metrics: ModelMetrics,
    ) -> std::io::Result<Scheduler> {
        let count = sessions.len();
        let shared = Arc::new(Shared {
            label: label.to_string(),
            batcher: Mutex::new(Batcher::new(limits)),
            wake: Condvar::new(),
            waiting: AtomicUsize::new(0),
            submissions: Submissions::default(),
            sessions: sessions.into_iter().map(Mutex::new).collect(),
            recent_run_ns: AtomicU64::new(u64::MAX),
            row_time: RowTime::default(),
            runs: AtomicU64::new(0),
            published_depth: AtomicUsize::new(0),
            wait_calibration: AtomicU64::new(CALIBRATION_UNIT),
            inline,
            arrivals: Arrivals::new(inline.min_gap),
            wait_bound,
            metrics,
        });
        let mut workers = Vec::with_capacity(count);
        for i in 0..count {
            let shared = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("infer-{label}-{i}"))
                    .spawn(move || worker(&shared, i))?,
            );
        }
        Ok(Scheduler {
            shared,
            workers: Mutex::new(workers),
        })
    }

    /// Counts a request as in progress until the guard drops (enter before
    /// [`Scheduler::claim_inline`]: whether requests overlap decides inline runs).
    pub fn enter(&self) -> Active {
        self.shared.arrivals.enter();
        Active(self.shared.clone())
    }

    /// Queues a job, or hands it back when the queue is full or closed, or when the queue
    /// ahead makes it wait too long ([`predicted_answer`]): past its deadline, though its own
    /// run would fit (such a request would only wait to fail, and its place in the queue is
    /// worth more to the others; a deadline shorter than the run itself is no matter of load:
    /// that request is queued and expires as before, 504, not run), or past the model's
    /// [`WaitBound`], which a deadline may shorten but not lengthen (a request with a long
    /// deadline must not take the queue from those without one).
    pub fn submit(&self, mut job: Job) -> Result<(), Refused<Job>> {
        let mut batcher = self.shared.lock();
        let sessions = self.shared.sessions.len();
        let recent = self.shared.measured();
        let wait = predicted_answer(self.shared.ahead(&batcher), 0, sessions, recent);
        job.predicted_wait = wait;
        let own = predicted_answer(Ahead::NOTHING, job.rows, sessions, recent);
        if let Some((wait, own)) = wait.zip(own) {
            let wait = self.shared.calibrated(wait);
            let answer = wait + own;
            if let Some(deadline) = job.deadline
                && misses_deadline(
                    own,
                    answer,
                    deadline.saturating_duration_since(Instant::now()),
                )
            {
                return Err(Refused::WouldMissDeadline(job, answer));
            }
            if let Some(bound) = self.shared.exceeded_bound(&batcher, wait, recent) {
                return Err(Refused::WouldWaitTooLong {
                    predicted: wait,
                    bound,
                });
            }
        }
        batcher.push(job)?;
        self.shared.submissions.note();
        self.shared.publish_depth(&batcher);
        drop(batcher);
        self.shared.wake_one();
        Ok(())
    }

    /// The model's [`WaitBound`] and the wait predicted now, when any request joining the
    /// queue now would be refused for it, whatever its rows or deadline (a deadline only
    /// shortens the bound): a door asks before it reads and decodes a body that would only
    /// be refused, which under overload keeps refusals cheap and quick.
    pub fn over_wait_bound(&self) -> Option<(Duration, Duration)> {
        // Below the bound's minimum depth, most requests learn they pass from one atomic read
        // instead of the lock the workers take for every batch.
        let published = self.shared.published_depth.load(Ordering::Relaxed);
        if published < WaitBound::min_depth(self.shared.sessions.len()) {
            return None;
        }
        let batcher = self.shared.lock();
        let recent = self.shared.measured();
        let ahead = self.shared.ahead(&batcher);
        let wait = predicted_answer(ahead, 0, self.shared.sessions.len(), recent)?;
        let wait = self.shared.calibrated(wait);
        let bound = self.shared.exceeded_bound(&batcher, wait, recent)?;
        Some((wait, bound))
    }

    /// The answer predicted now for a one-row request with `left` until its deadline, when the
    /// queue ahead would make it miss that deadline ([`Scheduler::submit`] refuses it then):
    /// a door that knows a request's deadline from its headers asks before it reads the body.
    /// An empty queue passes without the lock (its requests start at once).
    pub fn would_miss_deadline(&self, left: Duration) -> Option<Duration> {
        if self.shared.published_depth.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let shared = &*self.shared;
        let (sessions, recent) = (shared.sessions.len(), shared.measured());
        let wait = predicted_answer(shared.ahead(&shared.lock()), 0, sessions, recent)?;
        let own = predicted_answer(Ahead::NOTHING, 1, sessions, recent)?;
        let answer = shared.calibrated(wait) + own;
        misses_deadline(own, answer, left).then_some(answer)
    }

    /// Claims an idle session for a request of `rows` rows, which arrived at `arrived`, to
    /// run on the calling thread, when its run is predicted short enough (see the module doc),
    /// nothing is queued and requests do not crowd the front door (see [`Arrivals`]); runs under the
    /// blocking bound are claimed only when `may_block`, and none that would outlive the
    /// request's `timeout` (queued, a request is answered at its deadline; inline, only after
    /// the run). `None` means: queue it with [`Scheduler::submit`]. Call it once per request:
    /// it also counts the arrival.
    pub fn claim_inline(
        &self,
        rows: usize,
        arrived: Instant,
        may_block: bool,
        timeout: Option<Duration>,
    ) -> Option<InlineRun<'_>> {
        let shared = &*self.shared;
        if !shared.arrivals.allow_inline(arrived) {
            return None;
        }
        let estimate = Duration::from_nanos(shared.predicted_ns(rows));
        if timeout.is_some_and(|t| estimate >= t) {
            return None;
        }
        let blocks = if estimate < shared.inline.direct {
            false
        } else if may_block && estimate < shared.inline.blocking {
            true
        } else {
            return None;
        };
        if !shared.lock().claim_idle_session(shared.sessions.len()) {
            return None;
        }
        // The batcher counts a session as ours; a worker may still hold the one it just
        // finished for a moment, so take whichever is free.
        let Some(session) = shared.sessions.iter().find_map(|s| s.try_lock().ok()) else {
            shared.lock().finished();
            shared.wake_all();
            return None;
        };
        Some(InlineRun {
            shared,
            session,
            blocks,
            rows,
        })
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.shared.lock().depth()
    }

    /// How long a request joining the queue now would wait before it runs, as admission
    /// predicts it (calibrated); `None` before the model has run.
    pub fn predicted_wait(&self) -> Option<Duration> {
        let ahead = self.shared.ahead(&self.shared.lock());
        predicted_answer(ahead, 0, self.shared.sessions.len(), self.shared.measured())
            .map(|wait| self.shared.calibrated(wait))
    }

    /// Refuses new jobs; workers finish what is queued, then exit.
    pub fn close(&self) {
        self.shared.lock().close();
        self.shared.wake.notify_all();
    }

    /// Closes, then waits until every queued job is answered and the workers are gone.
    pub fn drain(&self) {
        self.close();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Dropping without `drain` must still let the workers finish and exit.
        self.close();
    }
}

/// An idle session claimed for one request on the caller's thread ([`Scheduler::claim_inline`]).
pub struct InlineRun<'a> {
    shared: &'a Shared,
    session: MutexGuard<'a, OnnxSession>,
    blocks: bool,
    rows: usize,
}

impl InlineRun<'_> {
    /// Whether the run may be long enough that an async caller must move its other work to
    /// another thread first.
    pub fn blocks(&self) -> bool {
        self.blocks
    }

    /// Runs the request, frees the session, and answers.
    pub fn run(self, inputs: &[Tensor]) -> JobResult {
        let InlineRun {
            shared,
            mut session,
            rows,
            ..
        } = self;
        let started = Instant::now();
        let outcome = guarded(|| session.run(inputs).map_err(BatchFailure::Run));
        drop(session);
        let took = started.elapsed();
        shared.observe_run(took, rows);
        shared.metrics.record_run([Duration::ZERO], rows, took);
        let mut batcher = shared.lock();
        batcher.finished();
        let queued = batcher.depth() > 0;
        drop(batcher);
        if queued {
            // A worker waiting to fill a batch may now run at once.
            shared.wake_all();
        }
        match outcome {
            Ok(outputs) => Ok((
                outputs,
                StageTimings {
                    queue: Duration::ZERO,
                    infer: took,
                    batch_size: 1,
                },
            )),
            Err(failure) => Err(failure.job_error()),
        }
    }
}

fn worker(shared: &Shared, index: usize) {
    let mut batcher = shared.lock();
    // Whether this idle stretch was watched already: arrival averages only move when requests
    // arrive, so after load stops they would keep a worker watching forever.
    let mut watched = false;
    loop {
        let now = Instant::now();
        match batcher.next(now) {
            Step::Run(batch) => {
                watched = false;
                shared.publish_depth(&batcher);
                drop(batcher);
                let replies = {
                    let mut session = shared.sessions[index]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    run_batch(shared, &mut session, batch, now)
                };
                // The session is free before anyone hears back, so a caller answered here
                // finds it idle for its next request.
                shared.lock().finished();
                // A worker waiting to fill a batch may now run at once.
                shared.wake_all();
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
                batcher = shared.lock();
            }
            Step::Expired(jobs) => {
                shared.publish_depth(&batcher);
                drop(batcher);
                for job in jobs {
                    let waited = now.saturating_duration_since(job.enqueued_at);
                    let _ = job.reply.send(Err(JobError::Expired { waited }));
                }
                batcher = shared.lock();
            }
            Step::Wait => batcher = idle_wait(shared, batcher, now, None, &mut watched),
            Step::WaitUntil(at) => {
                batcher = idle_wait(shared, batcher, now, Some(at), &mut watched);
            }
            Step::Exit => return,
        }
    }
}

/// With nothing to run: first watches for the next job for about one arrival gap while
/// arrivals come close together (once per idle stretch, `watched`), else sleeps until a submit
/// notifies or `deadline` passes. Returns the queue locked again, for the worker to look at it
/// anew.
fn idle_wait<'a>(
    shared: &'a Shared,
    batcher: MutexGuard<'a, Batcher<Job>>,
    now: Instant,
    deadline: Option<Instant>,
    watched: &mut bool,
) -> MutexGuard<'a, Batcher<Job>> {
    if let Some(until) = shared.watch_until(now, deadline, watched) {
        let seen = shared.submissions.seen();
        drop(batcher);
        shared.submissions.watch(seen, until);
        return shared.lock();
    }
    // Counted under the batcher's lock, so a submit that pushes after we looked sees us
    // waiting and notifies.
    shared.waiting.fetch_add(1, Ordering::AcqRel);
    let batcher = match deadline {
        Some(at) => {
            shared
                .wake
                .wait_timeout(batcher, at.saturating_duration_since(now))
                .unwrap_or_else(|p| p.into_inner())
                .0
        }
        None => shared.wake.wait(batcher).unwrap_or_else(|p| p.into_inner()),
    };
    shared.waiting.fetch_sub(1, Ordering::AcqRel);
    batcher
}

/// Where each answer of a batch goes.
type Replies = Vec<(oneshot::Sender<JobResult>, JobResult)>;

/// Runs a batch and returns its answers, for the caller to send once the session is free.
fn run_batch(
    shared: &Shared,
    session: &mut OnnxSession,
    batch: Vec<Job>,
    started: Instant,
) -> Replies {
    // A client that gave up (its deadline passed, or it went away) costs no compute.
    let batch: Vec<Job> = batch
        .into_iter()
        .filter(|j| !j.reply.is_closed() && j.claim.run())
        .collect();
    if batch.is_empty() {
        return Vec::new();
    }
    let outcome = guarded(|| infer(session, &batch));
    let infer_time = started.elapsed();
    let rows = batch.iter().map(|j| j.rows).sum();
    shared.observe_run(infer_time, rows);
    let waits = batch
        .iter()
        .map(|job| started.saturating_duration_since(job.enqueued_at));
    shared.metrics.record_run(waits, rows, infer_time);
    for job in &batch {
        if let Some(predicted) = job.predicted_wait {
            shared.calibrate(
                predicted,
                started.saturating_duration_since(job.enqueued_at),
            );
        }
    }
    let batch_size = batch.len();
    let failure = match outcome {
        Ok(per_job) => {
            return batch
                .into_iter()
                .zip(per_job)
                .map(|(job, outputs)| {
                    let timings = StageTimings {
                        queue: started.saturating_duration_since(job.enqueued_at),
                        infer: infer_time,
                        batch_size,
                    };
                    (job.reply, Ok((outputs, timings)))
                })
                .collect();
        }
        Err(failure) => failure,
    };
    if batch_size == 1 {
        return batch
            .into_iter()
            .map(|job| (job.reply, Err(failure.job_error())))
            .collect();
    }
    if let BatchFailure::Misaligned(reason) = &failure {
        let mut batcher = shared.lock();
        if batcher.batching() {
            batcher.stop_batching();
            tracing::warn!(model = %shared.label, %reason, "the model's outputs do not follow its inputs' batch dimension; serving each request on its own from now on");
        }
    }
    // One request may have failed the whole batch: each runs alone, so only it fails.
    batch
        .into_iter()
        .map(|job| {
            let started = Instant::now();
            let alone = guarded(|| infer(session, std::slice::from_ref(&job)));
            let timings = StageTimings {
                queue: started.saturating_duration_since(job.enqueued_at),
                infer: started.elapsed(),
                batch_size: 1,
            };
            let result = match alone {
                Ok(mut outputs) => Ok((outputs.pop().unwrap_or_default(), timings)),
                Err(failure) => Err(failure.job_error()),
            };
            (job.reply, result)
        })
        .collect()
}

/// Why a batch produced no outputs.
enum BatchFailure {
    /// ONNX Runtime refused or failed the run.
    Run(RunError),
    /// The outputs could not be split back along the requests' rows.
    Misaligned(String),
    /// The run panicked; the worker caught it and keeps serving.
    Panicked(String),
}

impl BatchFailure {
    fn job_error(&self) -> JobError {
        match self {
            BatchFailure::Run(RunError::BadInput(m)) => JobError::BadInput(m.clone()),
            BatchFailure::Run(RunError::Runtime(m)) | BatchFailure::Misaligned(m) => {
                JobError::Run(m.clone())
            }
            BatchFailure::Panicked(m) => JobError::Run(format!("the model's worker panicked: {m}")),
        }
    }
}

/// Runs `run`, turning a panic into a failure of this batch instead of a dead worker whose
/// requests would wait for ever.
fn guarded<T>(run: impl FnOnce() -> Result<T, BatchFailure>) -> Result<T, BatchFailure> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(%message, "an inference worker panicked; failing its batch and serving on");
        Err(BatchFailure::Panicked(message))
    })
}

/// Runs one batch and returns each job's outputs.
fn infer(session: &mut OnnxSession, batch: &[Job]) -> Result<Vec<Vec<Tensor>>, BatchFailure> {
    if let [job] = batch {
        return Ok(vec![session.run(&job.inputs).map_err(BatchFailure::Run)?]);
    }
    let inputs: Vec<Tensor> = (0..batch[0].inputs.len())
        .map(|i| stack(&batch.iter().map(|j| &j.inputs[i]).collect::<Vec<_>>()))
        .collect();
    let outputs = session.run(&inputs).map_err(BatchFailure::Run)?;
    let rows: Vec<usize> = batch.iter().map(|j| j.rows).collect();
    let mut per_job: Vec<Vec<Tensor>> = (0..batch.len())
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for output in &outputs {
        let pieces = split(output, &rows).map_err(|e| BatchFailure::Misaligned(e.to_string()))?;
        for (job_outputs, piece) in per_job.iter_mut().zip(pieces) {
            job_outputs.push(piece);
        }
    }
    Ok(per_job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_queue_ahead_makes_a_request_miss_its_deadline() {
        let us = Duration::from_micros;
        assert!(
            misses_deadline(us(100), us(900), us(500)),
            "late for the wait"
        );
        assert!(!misses_deadline(us(100), us(400), us(500)), "in time");
        assert!(!misses_deadline(us(100), us(500), us(500)), "just in time");
        assert!(
            !misses_deadline(us(600), us(900), us(500)),
            "its own run is longer than its deadline: no matter of load"
        );
        assert!(!misses_deadline(us(100), us(900), us(0)), "already past it");
    }

    #[test]
    fn the_automatic_wait_bound_follows_run_times_once_enough_runs_were_measured() {
        let recent = Some(RunTimes {
            run_ns: 2_000_000,
            row_ns: 30_000,
        });
        assert_eq!(WaitBound::Auto.limit(recent, AUTO_WAIT_MIN_RUNS - 1), None);
        assert_eq!(WaitBound::Auto.limit(None, 1000), None);
        assert_eq!(
            WaitBound::Auto.limit(recent, AUTO_WAIT_MIN_RUNS),
            Some(Duration::from_millis(100)),
            "50 runs of 2 ms"
        );
        let fast = Some(RunTimes {
            run_ns: 10_000,
            row_ns: 200,
        });
        assert_eq!(WaitBound::Auto.limit(fast, 1000), Some(AUTO_WAIT_FLOOR));
        let fixed = WaitBound::from_config(Some(5_000));
        assert_eq!(fixed.limit(None, 0), Some(Duration::from_millis(5)));
        assert_eq!(WaitBound::from_config(Some(0)).limit(recent, 1000), None);
    }

    #[test]
    fn the_wait_bound_applies_past_two_deep_per_session_and_the_automatic_one_past_two_full_batches()
     {
        let queue = |requests, rows| QueueShape { requests, rows };
        let fixed = WaitBound::At(Duration::from_millis(5));
        // 63 one-row clients queued behind a model batching 64 rows on one session: batching
        // drains them in one run, so the automatic bound waits; a bound the operator set does not.
        assert!(!WaitBound::Auto.applies(queue(63, 63), 1, 64));
        assert!(fixed.applies(queue(63, 63), 1, 64));
        assert!(!WaitBound::Auto.applies(queue(128, 128), 1, 64));
        assert!(WaitBound::Auto.applies(queue(129, 129), 1, 64));
        // Spread over two sessions, twice as many rows are two full batches each.
        assert!(!WaitBound::Auto.applies(queue(256, 256), 2, 64));
        assert!(WaitBound::Auto.applies(queue(257, 257), 2, 64));
        // A model that does not batch: past two requests per session, whichever bound.
        assert!(WaitBound::Auto.applies(queue(3, 3), 1, 1));
        assert!(WaitBound::Auto.applies(queue(3, 3), 1, 0));
        // One large request ahead is no overload, whatever its rows.
        assert!(!WaitBound::Auto.applies(queue(1, 5_000), 1, 64));
        assert!(!fixed.applies(queue(1, 5_000), 1, 64));
        assert!(!WaitBound::Off.applies(queue(5_000, 5_000), 1, 64));
    }

    #[test]
    fn the_wait_calibration_settles_above_nearly_every_wait_and_comes_back_down() {
        let unit = CALIBRATION_UNIT;
        // One wait in fifty takes 1.5x its prediction, one in fifty 1.2x, the others as
        // predicted: the 99th percentile is 1.5x.
        let mut factor = unit;
        let mut lowest_late = u64::MAX;
        for i in 0..20_000 {
            let ratio = match i % 50 {
                0 => unit * 3 / 2,
                25 => unit * 6 / 5,
                _ => unit,
            };
            factor = calibration_step(factor, ratio);
            if i >= 10_000 {
                lowest_late = lowest_late.min(factor);
            }
        }
        assert!(
            lowest_late > unit * 6 / 5 && factor <= unit * 3 / 2,
            "settles between the 98th and the 99th percentile: {lowest_late}, {factor}"
        );
        // The long waits stop: 2,500 ordinary waits (0.5 / 0.0002) later it is back at 1.
        for _ in 0..2_500 {
            factor = calibration_step(factor, unit);
        }
        assert_eq!(factor, unit);
    }

    #[test]
    fn the_time_per_row_weighs_runs_by_their_rows() {
        let time = RowTime::default();
        assert_eq!(time.per_row_ns(), None);
        // A cold one-row run, then a 1,024-row run at 20 µs a row.
        time.observe(500_000, 1);
        assert_eq!(time.per_row_ns(), Some(500_000));
        time.observe(20_480_000, 1024);
        let per_row = time.per_row_ns().unwrap();
        assert!((20_000..21_000).contains(&per_row), "{per_row} ns per row");
        // One preempted run counts at most four times the estimate.
        time.observe(u64::MAX, 1024);
        assert!(time.per_row_ns().unwrap() < 4 * per_row);
    }

    #[test]
    fn the_predicted_answer_counts_busy_sessions_and_spreads_the_rows_ahead_over_them() {
        let us = Duration::from_micros;
        let recent = Some(RunTimes {
            run_ns: 1_000_000,
            row_ns: 20_000,
        });
        let ahead = |rows, every_session_busy| Ahead {
            rows,
            every_session_busy,
        };
        assert_eq!(
            predicted_answer(ahead(1024, true), 1, 1, None),
            None,
            "not yet measured"
        );
        assert_eq!(
            predicted_answer(ahead(0, false), 1, 2, recent),
            Some(us(20))
        );
        assert_eq!(
            predicted_answer(ahead(0, true), 1, 2, recent),
            Some(us(520)),
            "half a run until a session frees"
        );
        assert_eq!(
            predicted_answer(ahead(1024, false), 1, 1, recent),
            Some(us(20_500))
        );
        assert_eq!(
            predicted_answer(ahead(1024, false), 1, 2, recent),
            Some(us(10_260))
        );
        let huge = Some(RunTimes {
            run_ns: u64::MAX,
            row_ns: u64::MAX,
        });
        assert_eq!(
            predicted_answer(ahead(usize::MAX, true), usize::MAX, 1, huge),
            Some(Duration::from_nanos(u64::MAX)),
            "saturates instead of overflowing"
        );
    }

    #[test]
    fn a_panicking_run_becomes_a_failure_of_its_batch() {
        let failed = guarded::<()>(|| panic!("boom in a run"));
        match failed {
            Err(BatchFailure::Panicked(message)) => assert_eq!(message, "boom in a run"),
            _ => panic!("the panic escaped the guard"),
        }
        let error = BatchFailure::Panicked("boom".into()).job_error();
        assert!(matches!(error, JobError::Run(m) if m.contains("worker panicked: boom")));
        assert!(matches!(guarded(|| Ok(7)), Ok(7)));
    }
}
