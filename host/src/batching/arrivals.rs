//! Whether a model's requests crowd the front door: the recent mean gap between arrivals, and
//! how often a request arrived while another was in progress. Running a fast model inline
//! saves two thread hand-offs per request, but under load it keeps the model's work on the
//! front door's threads, which are then what limits throughput, one row per run; requests
//! that overlap often are better queued for the model's worker, in batches. One caller
//! alone, however fast, never overlaps itself, and stays inline.
//!
//! Overlap is what decides; the gap only lets requests that overlap but come seldom (slow
//! runs at a low rate) stay inline. With a gap of 30 µs as the threshold, fraud at
//! concurrency 64 kept running inline on two 2-core VMs: a loaded front door answers in
//! clumps, so the mean gap crossed 30 µs again and again (14-82 µs measured on the slower
//! VM), and every crossing ran requests inline one row at a time. The default gap is a
//! millisecond for that reason (`inline_min_gap_us`).
//!
//! Both averages are updated with relaxed atomics by whichever thread a request arrives on:
//! two arrivals at once may each lose the other's update, which an average shrugs off.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Weights of the averages, in 1/1024ths: an overlapping arrival counts 1024.
const OVERLAP_FULL: u64 = 1024;
/// Requests overlap "often" above this share (1/16).
const OVERLAP_OFTEN: u64 = OVERLAP_FULL / 16;

/// One model version's arrivals.
pub struct Arrivals {
    /// Requests arriving on average closer together than this, and often overlapping, count
    /// as crowding; zero: never (any rate may run inline).
    min_gap_ns: u64,
    epoch: Instant,
    last_ns: AtomicU64,
    recent_gap_ns: AtomicU64,
    in_progress: AtomicUsize,
    recent_overlap: AtomicU64,
}

impl Arrivals {
    /// Arrivals of a model whose requests crowd the front door when they come on average
    /// closer together than `min_gap` and often overlap; zero: never.
    pub fn new(min_gap: Duration) -> Arrivals {
        let min_gap_ns = u64::try_from(min_gap.as_nanos()).unwrap_or(u64::MAX);
        let arrivals = Arrivals {
            min_gap_ns,
            epoch: Instant::now(),
            last_ns: AtomicU64::new(0),
            recent_gap_ns: AtomicU64::new(0),
            in_progress: AtomicUsize::new(0),
            recent_overlap: AtomicU64::new(0),
        };
        // As after a pause: a first request may be inline.
        arrivals
            .recent_gap_ns
            .store(arrivals.gap_cap_ns(), Ordering::Relaxed);
        arrivals
    }

    /// The longest gap between two arrivals that counts in full: eight minimum gaps, so one
    /// pause is enough to run inline again, and a burst after it is seen within twenty
    /// requests or so.
    fn gap_cap_ns(&self) -> u64 {
        self.min_gap_ns.saturating_mul(8)
    }

    /// The recent mean gap between arrivals (at most eight minimum gaps).
    pub fn recent_gap(&self) -> Duration {
        Duration::from_nanos(self.recent_gap_ns.load(Ordering::Relaxed))
    }

    /// A request is in progress, from before it asks to run inline until it is answered.
    pub fn enter(&self) {
        self.in_progress.fetch_add(1, Ordering::Relaxed);
    }

    /// The request counted by [`Arrivals::enter`] was answered.
    pub fn leave(&self) {
        self.in_progress.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a request arriving at `at` (already [entered](Arrivals::enter)), and says
    /// whether requests now come far enough apart, or overlap seldom enough, to run inline.
    pub fn allow_inline(&self, at: Instant) -> bool {
        // The caller counts itself.
        let overlapped = if self.in_progress.load(Ordering::Relaxed) > 1 {
            OVERLAP_FULL
        } else {
            0
        };
        let overlap = move_average(&self.recent_overlap, overlapped);
        let now =
            u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let gap = now
            .saturating_sub(self.last_ns.swap(now, Ordering::Relaxed))
            .min(self.gap_cap_ns());
        let recent_gap = move_average(&self.recent_gap_ns, gap);
        recent_gap >= self.min_gap_ns || overlap < OVERLAP_OFTEN
    }
}

/// Moves an exponential average an eighth of the way toward `sample`: steady under bursty
/// arrivals (a loaded front door answers in clumps), and returns the new value.
fn move_average(average: &AtomicU64, sample: u64) -> u64 {
    let old = average.load(Ordering::Relaxed);
    let new = old - old / 8 + sample / 8;
    average.store(new, Ordering::Relaxed);
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_requests_arriving_close_together_queue_until_a_pause() {
        let arrivals = Arrivals::new(Duration::from_micros(30));
        let start = Instant::now();
        let at = |us: u64| start + Duration::from_micros(us);
        arrivals.enter();
        assert!(arrivals.allow_inline(at(0)), "a first request");
        // 200,000 requests a second, each arriving while two others are in progress: within
        // a few dozen the front door counts as crowded, and they queue.
        arrivals.enter();
        arrivals.enter();
        let allowed: Vec<bool> = (1..=100)
            .map(|i| arrivals.allow_inline(at(i * 5)))
            .collect();
        let first_refused = allowed.iter().position(|ok| !ok).expect("never refused");
        assert!(
            first_refused < 30,
            "still inline after {first_refused} requests"
        );
        assert!(allowed[first_refused..].iter().all(|ok| !ok), "{allowed:?}");
        // Requests 100 µs apart (10,000 a second) run inline again once the average shows it.
        let spaced: Vec<bool> = (1..=20)
            .map(|i| arrivals.allow_inline(at(500 + i * 100)))
            .collect();
        assert!(spaced[10..].iter().all(|ok| *ok), "{spaced:?}");
        // After a burst, a pause of a millisecond is enough.
        for i in 0..50 {
            arrivals.allow_inline(at(3_000 + i));
        }
        assert!(!arrivals.allow_inline(at(3_050)));
        assert!(arrivals.allow_inline(at(4_050)));
    }

    #[test]
    fn overlapping_requests_queue_though_clumped_arrivals_stretch_their_mean_gap() {
        // A loaded front door answers in clumps: ten requests 2 µs apart, then 400 µs without
        // one (a mean gap of 42 µs), each while others are in progress.
        let clumped = |min_gap: Duration| {
            let arrivals = Arrivals::new(min_gap);
            let start = Instant::now();
            arrivals.enter();
            arrivals.enter();
            let mut at_us = 0;
            let mut inline_after_warm_up = 0;
            for clump in 0..100 {
                for _ in 0..10 {
                    at_us += 2;
                    let inline = arrivals.allow_inline(start + Duration::from_micros(at_us));
                    if inline && clump >= 10 {
                        inline_after_warm_up += 1;
                    }
                }
                at_us += 400;
            }
            inline_after_warm_up
        };
        assert_eq!(clumped(Duration::from_millis(1)), 0);
        // A 30 µs threshold, the default until it was measured so, lets every pause's mean
        // gap cross it and runs requests inline one row at a time.
        assert!(clumped(Duration::from_micros(30)) > 100);
    }

    #[test]
    fn one_fast_caller_alone_keeps_running_inline() {
        // Back to back, 5 µs apart, but each request ends before the next arrives: queueing
        // would only add the hand-off to every one.
        let arrivals = Arrivals::new(Duration::from_micros(30));
        let start = Instant::now();
        for i in 0..200 {
            arrivals.enter();
            let arrived = start + Duration::from_micros(i * 5);
            assert!(arrivals.allow_inline(arrived), "request {i}");
            arrivals.leave();
        }
    }

    #[test]
    fn with_no_minimum_gap_any_rate_may_run_inline() {
        let arrivals = Arrivals::new(Duration::ZERO);
        let now = Instant::now();
        for _ in 0..3 {
            arrivals.enter();
        }
        assert!((0..100).all(|_| arrivals.allow_inline(now)));
    }
}
