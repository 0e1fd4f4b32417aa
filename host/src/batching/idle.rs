//! How a model's idle worker waits for its next job. Sleeping on the queue's condition
//! variable costs the worker a context switch and the thread that submits the next job a
//! futex wake: on a node serving fraud at concurrency 64 that wake was 6% of the front door's
//! time, and the worker's switch back in another 5%. While requests arrive close together the
//! next job is due within one arrival gap, so an idle worker first watches for it that long
//! (once per idle stretch, and only while that gap is short), yielding its core in between:
//! spinning outright took the core from the front door's threads on a 2-core machine and
//! halved throughput.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest a worker watches before it sleeps, whatever the arrival gap.
pub const MAX_WATCH: Duration = Duration::from_micros(50);

/// How long an idle worker watches for the next job: the recent mean gap between arrivals,
/// when that is shorter than [`MAX_WATCH`]; `None`: sleep at once (the next job is not due
/// soon enough to be worth a core's time).
pub fn watch_budget(recent_gap: Duration) -> Option<Duration> {
    (recent_gap < MAX_WATCH).then_some(recent_gap)
}

/// Jobs ever submitted to one queue, which an idle worker watches change.
#[derive(Debug, Default)]
pub struct Submissions(AtomicU64);

impl Submissions {
    /// Counts a job put on the queue.
    pub fn note(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }

    /// The count now: read it under the queue's lock, so any job pushed after it counts.
    pub fn seen(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Yields the calling thread until a job is submitted after `seen` or `until` passes; true
    /// when one was.
    pub fn watch(&self, seen: u64, until: Instant) -> bool {
        loop {
            if self.seen() != seen {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_worker_watches_one_arrival_gap_only_while_arrivals_come_closer_than_the_cap() {
        assert_eq!(
            watch_budget(Duration::from_micros(12)),
            Some(Duration::from_micros(12))
        );
        assert_eq!(
            watch_budget(MAX_WATCH - Duration::from_micros(1)),
            Some(MAX_WATCH - Duration::from_micros(1))
        );
        assert_eq!(watch_budget(MAX_WATCH), None);
        assert_eq!(watch_budget(Duration::from_millis(2)), None);
    }

    #[test]
    fn watching_ends_at_the_next_submission_or_at_its_deadline() {
        let submissions = Arc::new(Submissions::default());
        let seen = submissions.seen();
        let started = Instant::now();
        assert!(!submissions.watch(seen, started + Duration::from_millis(5)));
        assert!(started.elapsed() >= Duration::from_millis(5));

        // A job submitted from another thread ends a watch that would otherwise last a minute.
        let submitter = submissions.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            submitter.note();
        });
        assert!(submissions.watch(seen, started + Duration::from_secs(60)));
        assert!(started.elapsed() < Duration::from_secs(30));
        thread.join().unwrap();
        // A count read after the job sees nothing new.
        assert!(!submissions.watch(submissions.seen(), Instant::now()));
    }
}
