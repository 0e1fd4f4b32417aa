//! The batching decision as a pure state machine: no threads, no clock, no I/O.
//!
//! The worker threads around it (see `scheduler`) feed it events (a request arrived, a session
//! finished, the time is now T) and do what it answers. The rules:
//!
//! - A request that finds the model idle (no session running) is dispatched at once, with
//!   whatever else is queued: waiting could only add latency.
//! - While a session runs, requests queue up. A free session takes up to `max_batch_rows`
//!   compatible requests (same shape apart from dimension 0). A partial batch waits for more
//!   only while another session is still running, and at most `max_queue_delay` after its
//!   oldest request arrived. That keeps a second session from taking crumbs under load,
//!   the trade Triton's `max_queue_delay_microseconds` makes, without taxing an idle model.
//! - A request whose deadline has passed is handed back as expired before it costs compute.
//! - The queue is bounded: a full queue refuses new requests (the caller sheds with 503).
//! - Once closed, the batcher refuses new requests, drains the queue, then tells workers to exit.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the policy needs to know about a queued request.
pub trait Batchable {
    /// Rows this request adds along dimension 0.
    fn rows(&self) -> usize;
    /// When it entered the queue.
    fn enqueued_at(&self) -> Instant;
    /// When it stops being worth computing.
    fn deadline(&self) -> Option<Instant>;
    /// Whether it can share a batch with `other` (same non-batch dimensions).
    fn compatible(&self, other: &Self) -> bool;
}

/// The knobs of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most rows in one batch; 0 means the model does not batch, so each request runs alone.
    pub max_batch_rows: usize,
    /// Longest a partial batch waits for more while another session runs.
    pub max_queue_delay: Duration,
    /// Most requests waiting at once.
    pub queue_capacity: usize,
}

/// What an idle worker should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<T> {
    /// Run these requests as one batch (the worker now counts as busy until [`Batcher::finished`]).
    Run(Vec<T>),
    /// Answer these requests with a deadline error; they were removed from the queue.
    Expired(Vec<T>),
    /// Nothing to run before this instant unless something happens.
    WaitUntil(Instant),
    /// Nothing to do until a request arrives or a session finishes.
    Wait,
    /// Closed and drained: the worker should exit.
    Exit,
}

/// Why a request was not queued; the request comes back to the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused<T> {
    /// The queue is at capacity.
    Full(T),
    /// The model is being unloaded or the node is shutting down.
    Closed(T),
    /// Its deadline falls before the answer the queue ahead predicts, this long from now.
    WouldMissDeadline(T, std::time::Duration),
    /// The queue ahead predicts a longer wait than the model's bound on queueing (the
    /// request, which no one needs back, is dropped).
    WouldWaitTooLong {
        /// The predicted wait.
        predicted: std::time::Duration,
        /// The bound.
        bound: std::time::Duration,
    },
}

/// The batching state of one model version.
#[derive(Debug)]
pub struct Batcher<T> {
    limits: BatchLimits,
    queue: VecDeque<T>,
    /// Rows over every queued request, kept as they come and go (read at every admission).
    queued_rows: usize,
    busy_sessions: usize,
    closed: bool,
}

impl<T: Batchable> Batcher<T> {
    /// An empty batcher.
    pub fn new(limits: BatchLimits) -> Self {
        Batcher {
            limits,
            queue: VecDeque::new(),
            queued_rows: 0,
            busy_sessions: 0,
            closed: false,
        }
    }

    /// Queues a request, or hands it back if the queue is full or closed.
    pub fn push(&mut self, item: T) -> Result<(), Refused<T>> {
        if self.closed {
            return Err(Refused::Closed(item));
        }
        if self.queue.len() >= self.limits.queue_capacity {
            return Err(Refused::Full(item));
        }
        self.queued_rows += item.rows();
        self.queue.push_back(item);
        Ok(())
    }

    /// Requests waiting.
    pub fn depth(&self) -> usize {
        self.queue.len()
    }

    /// Most rows one run takes (1 for a model that does not batch).
    pub fn full_batch_rows(&self) -> usize {
        self.limits.max_batch_rows.max(1)
    }

    /// Rows waiting, over every queued request.
    pub fn queued_rows(&self) -> usize {
        self.queued_rows
    }

    /// Sessions running a batch now.
    pub fn busy_sessions(&self) -> usize {
        self.busy_sessions
    }

    /// Stops accepting requests; queued ones still run.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Claims a free session for a request to run at once on the caller's thread, skipping
    /// the queue and the worker hand-off: only when nothing is queued (a newcomer must not
    /// overtake waiting requests), the batcher is open and one of `sessions` is idle. The
    /// caller runs it and then calls [`Batcher::finished`].
    pub fn claim_idle_session(&mut self, sessions: usize) -> bool {
        let idle = self.queue.is_empty() && !self.closed && self.busy_sessions < sessions;
        if idle {
            self.busy_sessions += 1;
        }
        idle
    }

    /// A session finished the batch it got from [`Step::Run`] or [`Batcher::claim_idle_session`].
    pub fn finished(&mut self) {
        self.busy_sessions = self.busy_sessions.saturating_sub(1);
    }

    /// Decides what an idle worker does at `now`.
    /// From now on every request runs on its own: the model's outputs turned out not to share
    /// the inputs' batch dimension.
    pub fn stop_batching(&mut self) {
        self.limits.max_batch_rows = 0;
    }

    /// Whether requests are still merged into batches.
    pub fn batching(&self) -> bool {
        self.limits.max_batch_rows > 0
    }

    pub fn next(&mut self, now: Instant) -> Step<T> {
        let expired = self.take_expired(now);
        if !expired.is_empty() {
            return Step::Expired(expired);
        }
        let Some(head) = self.queue.front() else {
            return if self.closed { Step::Exit } else { Step::Wait };
        };
        let fill_deadline = head.enqueued_at() + self.limits.max_queue_delay;
        let (members, full) = self.plan_batch();
        let dispatch_now = full || self.closed || self.busy_sessions == 0 || now >= fill_deadline;
        if !dispatch_now {
            let wake = self
                .queue
                .iter()
                .filter_map(Batchable::deadline)
                .fold(fill_deadline, Instant::min);
            return Step::WaitUntil(wake);
        }
        self.busy_sessions += 1;
        Step::Run(self.remove(&members))
    }

    /// Picks queue positions for the next batch: the head plus compatible requests in arrival
    /// order while they fit. Returns the positions and whether the batch is full.
    fn plan_batch(&self) -> (Vec<usize>, bool) {
        let Some(head) = self.queue.front() else {
            return (Vec::new(), false);
        };
        let max = self.limits.max_batch_rows;
        if max == 0 {
            return (vec![0], true);
        }
        let mut members = vec![0];
        let mut rows = head.rows();
        for (i, item) in self.queue.iter().enumerate().skip(1) {
            if rows >= max {
                break;
            }
            if item.compatible(head) && rows + item.rows() <= max {
                members.push(i);
                rows += item.rows();
            }
        }
        (members, rows >= max)
    }

    /// Removes the items at `positions` (ascending), keeping the order of the rest.
    fn remove(&mut self, positions: &[usize]) -> Vec<T> {
        let taken: Vec<T> = if positions.len() == self.queue.len() {
            self.queue.drain(..).collect()
        } else {
            let mut taken = Vec::with_capacity(positions.len());
            for &p in positions.iter().rev() {
                if let Some(item) = self.queue.remove(p) {
                    taken.push(item);
                }
            }
            taken.reverse();
            taken
        };
        self.forget_rows(&taken);
        taken
    }

    fn forget_rows(&mut self, gone: &[T]) {
        let rows: usize = gone.iter().map(Batchable::rows).sum();
        self.queued_rows = self.queued_rows.saturating_sub(rows);
    }

    fn take_expired(&mut self, now: Instant) -> Vec<T> {
        if !self
            .queue
            .iter()
            .any(|item| item.deadline().is_some_and(|d| d <= now))
        {
            return Vec::new();
        }
        let (expired, live): (Vec<T>, Vec<T>) = self
            .queue
            .drain(..)
            .partition(|item| item.deadline().is_some_and(|d| d <= now));
        self.queue = live.into();
        self.forget_rows(&expired);
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Req {
        id: u32,
        rows: usize,
        width: usize,
        at: Instant,
        deadline: Option<Instant>,
    }

    impl Batchable for Req {
        fn rows(&self) -> usize {
            self.rows
        }
        fn enqueued_at(&self) -> Instant {
            self.at
        }
        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }
        fn compatible(&self, other: &Self) -> bool {
            self.width == other.width
        }
    }

    struct Scenario {
        t0: Instant,
        batcher: Batcher<Req>,
        next_id: u32,
    }

    impl Scenario {
        fn new(max_batch_rows: usize, delay_us: u64, capacity: usize) -> Self {
            Scenario {
                t0: Instant::now(),
                batcher: Batcher::new(BatchLimits {
                    max_batch_rows,
                    max_queue_delay: Duration::from_micros(delay_us),
                    queue_capacity: capacity,
                }),
                next_id: 0,
            }
        }
        fn at(&self, us: u64) -> Instant {
            self.t0 + Duration::from_micros(us)
        }
        fn push(&mut self, us: u64, rows: usize) -> u32 {
            self.push_full(us, rows, 1, None)
        }
        fn push_full(
            &mut self,
            us: u64,
            rows: usize,
            width: usize,
            deadline_us: Option<u64>,
        ) -> u32 {
            let id = self.next_id;
            self.next_id += 1;
            let req = Req {
                id,
                rows,
                width,
                at: self.at(us),
                deadline: deadline_us.map(|d| self.at(d)),
            };
            assert!(self.batcher.push(req).is_ok());
            id
        }
        fn step(&mut self, us: u64) -> Step<u32> {
            match self.batcher.next(self.at(us)) {
                Step::Run(b) => Step::Run(b.iter().map(|r| r.id).collect()),
                Step::Expired(b) => Step::Expired(b.iter().map(|r| r.id).collect()),
                Step::WaitUntil(t) => Step::WaitUntil(t),
                Step::Wait => Step::Wait,
                Step::Exit => Step::Exit,
            }
        }
    }

    #[test]
    fn a_request_runs_inline_only_on_an_idle_session_with_nothing_queued() {
        let mut s = Scenario::new(8, 1000, 4);
        assert!(s.batcher.claim_idle_session(2));
        assert!(s.batcher.claim_idle_session(2), "the second session");
        assert!(!s.batcher.claim_idle_session(2), "both busy: queue instead");
        s.batcher.finished();
        s.push(0, 1);
        assert!(
            !s.batcher.claim_idle_session(2),
            "a newcomer does not overtake a queued request"
        );
        // Another session still runs: the queued request waits to fill a batch, as before.
        assert!(matches!(s.batcher.next(s.at(0)), Step::WaitUntil(_)));
        assert!(matches!(s.batcher.next(s.at(1000)), Step::Run(_)));
        s.batcher.finished();
        s.batcher.finished();
        assert_eq!(s.batcher.busy_sessions(), 0);
        s.batcher.close();
        assert!(!s.batcher.claim_idle_session(2), "closed");
    }

    #[test]
    fn an_idle_model_runs_a_lone_request_at_once() {
        let mut s = Scenario::new(64, 1_000, 16);
        let a = s.push(0, 1);
        assert_eq!(s.step(0), Step::Run(vec![a]));
        assert_eq!(s.batcher.busy_sessions(), 1);
        assert_eq!(s.step(1), Step::Wait);
    }

    #[test]
    fn requests_queued_behind_a_busy_session_go_out_together() {
        // One session: while it runs, requests pile up; when it frees, it takes them all at once.
        let mut s = Scenario::new(64, 1_000, 16);
        let first = s.push(0, 1);
        assert_eq!(s.step(0), Step::Run(vec![first]));
        let queued: Vec<u32> = (0..5).map(|i| s.push(10 + i, 1)).collect();
        s.batcher.finished();
        assert_eq!(s.step(50), Step::Run(queued));
    }

    #[test]
    fn a_batch_never_exceeds_max_rows_and_keeps_arrival_order() {
        let mut s = Scenario::new(4, 0, 16);
        let ids: Vec<u32> = (0..3).map(|_| s.push(0, 2)).collect();
        assert_eq!(s.batcher.queued_rows(), 6);
        // 2 + 2 fit; the third (2 more rows) waits for the next batch.
        assert_eq!(s.step(0), Step::Run(vec![ids[0], ids[1]]));
        assert_eq!(s.batcher.queued_rows(), 2);
        s.batcher.finished();
        assert_eq!(s.step(1), Step::Run(vec![ids[2]]));
        assert_eq!(s.batcher.queued_rows(), 0);
    }

    #[test]
    fn a_smaller_request_behind_one_that_does_not_fit_still_joins() {
        let mut s = Scenario::new(4, 0, 16);
        let a = s.push(0, 3);
        let b = s.push(0, 2);
        let c = s.push(0, 1);
        assert_eq!(s.step(0), Step::Run(vec![a, c]));
        s.batcher.finished();
        assert_eq!(s.step(0), Step::Run(vec![b]));
    }

    #[test]
    fn incompatible_shapes_never_share_a_batch() {
        let mut s = Scenario::new(64, 0, 16);
        let a = s.push_full(0, 1, 8, None);
        let b = s.push_full(0, 1, 16, None);
        let c = s.push_full(0, 1, 8, None);
        assert_eq!(s.step(0), Step::Run(vec![a, c]));
        s.batcher.finished();
        assert_eq!(s.step(0), Step::Run(vec![b]));
    }

    #[test]
    fn a_second_session_waits_at_most_the_delay_while_the_first_runs() {
        let mut s = Scenario::new(8, 500, 16);
        let a = s.push(0, 1);
        assert_eq!(s.step(0), Step::Run(vec![a]));
        // Session 1 busy; a partial batch for session 2 waits to fill until 100 + 500 µs.
        let b = s.push(100, 1);
        assert_eq!(s.step(100), Step::WaitUntil(s.at(600)));
        let c = s.push(300, 1);
        assert_eq!(s.step(300), Step::WaitUntil(s.at(600)));
        assert_eq!(s.step(600), Step::Run(vec![b, c]));
    }

    #[test]
    fn a_full_batch_goes_without_waiting_for_the_delay() {
        let mut s = Scenario::new(2, 10_000, 16);
        let a = s.push(0, 1);
        assert_eq!(s.step(0), Step::Run(vec![a]));
        let b = s.push(1, 1);
        let c = s.push(2, 1);
        assert_eq!(s.step(2), Step::Run(vec![b, c]));
    }

    #[test]
    fn once_the_busy_session_finishes_a_waiting_batch_goes_at_once() {
        let mut s = Scenario::new(8, 10_000, 16);
        let a = s.push(0, 1);
        assert_eq!(s.step(0), Step::Run(vec![a]));
        let b = s.push(5, 1);
        assert!(matches!(s.step(5), Step::WaitUntil(_)));
        s.batcher.finished();
        assert_eq!(s.step(6), Step::Run(vec![b]));
    }

    #[test]
    fn expired_requests_are_returned_before_they_cost_compute() {
        let mut s = Scenario::new(8, 0, 16);
        let busy = s.push(0, 1);
        assert_eq!(s.step(0), Step::Run(vec![busy]));
        let late = s.push_full(10, 1, 1, Some(100));
        let fine = s.push_full(10, 1, 1, Some(10_000));
        let open = s.push(10, 1);
        s.batcher.finished();
        assert_eq!(s.step(200), Step::Expired(vec![late]));
        assert_eq!(
            s.batcher.queued_rows(),
            2,
            "the expired request's row is gone"
        );
        assert_eq!(s.step(200), Step::Run(vec![fine, open]));
    }

    #[test]
    fn a_waiting_batch_wakes_for_the_earliest_deadline() {
        let mut s = Scenario::new(8, 1_000, 16);
        let a = s.push(0, 1);
        assert_eq!(s.step(0), Step::Run(vec![a]));
        s.push_full(0, 1, 1, Some(300));
        assert_eq!(s.step(0), Step::WaitUntil(s.at(300)));
    }

    #[test]
    fn a_full_queue_refuses_and_hands_the_request_back() {
        let mut s = Scenario::new(8, 0, 2);
        s.push(0, 1);
        s.push(0, 1);
        let refused = s.batcher.push(Req {
            id: 99,
            rows: 1,
            width: 1,
            at: s.at(0),
            deadline: None,
        });
        assert!(matches!(refused, Err(Refused::Full(Req { id: 99, .. }))));
        assert_eq!(s.batcher.depth(), 2);
    }

    #[test]
    fn without_batching_each_request_runs_alone() {
        let mut s = Scenario::new(0, 0, 16);
        let a = s.push(0, 1);
        let b = s.push(0, 1);
        assert_eq!(s.step(0), Step::Run(vec![a]));
        assert_eq!(s.step(0), Step::Run(vec![b]));
    }

    #[test]
    fn closing_drains_the_queue_then_exits() {
        let mut s = Scenario::new(8, 10_000, 16);
        let a = s.push(0, 1);
        assert_eq!(s.step(0), Step::Run(vec![a]));
        let b = s.push(1, 1);
        s.batcher.close();
        let refused = s.batcher.push(Req {
            id: 7,
            rows: 1,
            width: 1,
            at: s.at(2),
            deadline: None,
        });
        assert!(matches!(refused, Err(Refused::Closed(_))));
        // Closed: no waiting to fill, even with a session busy.
        assert_eq!(s.step(2), Step::Run(vec![b]));
        assert_eq!(s.step(3), Step::Exit);
    }
}
