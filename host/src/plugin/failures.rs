//! How much running time one plugin stage may spend on calls that fail, before its calls pause.
//!
//! Every failure is contained to its own request, but a plugin whose calls keep failing
//! expensively (looping to its deadline, building a 48 MiB argument the host refuses, starting
//! an instance whose `init` fails) still spends the node's cores on work that answers no one,
//! and its siblings slow down. The running time of failed calls (and of failed starts) is
//! charged to a token bucket refilled at the stage's `failure_budget_ms` per second; while the
//! bucket is overdrawn, calls of that stage are answered 503 at once with a `Retry-After` of
//! when it refills, the way a proxy ejects an upstream that keeps failing. Cheap failures (a
//! panic on bad input, a refused shape) cost microseconds and never pause anything; a healthy
//! call costs nothing. Pure: the clock is passed in, so the rule is tested on plain values.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The failure budget of one loaded plugin stage.
#[derive(Debug)]
pub struct FailureBudget {
    /// Running time refilled per second; also the most the bucket holds.
    per_second: Duration,
    bucket: Mutex<Bucket>,
    /// Whether the bucket may be overdrawn: set by a charge that overdraws it, cleared when
    /// [`FailureBudget::paused`] finds it refilled. Lets a healthy call skip the lock and the
    /// clock.
    in_debt: AtomicBool,
}

#[derive(Debug)]
struct Bucket {
    /// Running time that may still be spent on failures; negative while overdrawn.
    balance_ns: i128,
    refilled_at: Instant,
}

impl FailureBudget {
    /// A full bucket that refills `per_second` of running time every second.
    pub fn new(per_second: Duration, now: Instant) -> FailureBudget {
        FailureBudget {
            per_second,
            bucket: Mutex::new(Bucket {
                balance_ns: per_second.as_nanos() as i128,
                refilled_at: now,
            }),
            in_debt: AtomicBool::new(false),
        }
    }

    /// Whether calls may be paused now; when false, [`FailureBudget::paused`] would answer
    /// `None`.
    pub fn in_debt(&self) -> bool {
        self.in_debt.load(Ordering::Acquire)
    }

    /// Charges the running time of a failed call or start.
    pub fn charge(&self, running: Duration, now: Instant) {
        let mut bucket = self.refilled(now);
        bucket.balance_ns -= running.as_nanos() as i128;
        if bucket.balance_ns < 0 {
            self.in_debt.store(true, Ordering::Release);
        }
    }

    /// How long calls stay paused, if the bucket is overdrawn at `now`.
    pub fn paused(&self, now: Instant) -> Option<Duration> {
        let bucket = self.refilled(now);
        if bucket.balance_ns >= 0 {
            self.in_debt.store(false, Ordering::Release);
            return None;
        }
        let rate = self.per_second.as_nanos().max(1) as f64;
        let debt = -bucket.balance_ns as f64;
        Some(Duration::from_secs_f64(debt / rate))
    }

    fn refilled(&self, now: Instant) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(bucket.refilled_at);
        let earned = elapsed.as_secs_f64() * self.per_second.as_nanos() as f64;
        let full = self.per_second.as_nanos() as i128;
        bucket.balance_ns = (bucket.balance_ns + earned as i128).min(full);
        bucket.refilled_at = bucket.refilled_at.max(now);
        bucket
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn failures_within_the_budget_never_pause() {
        let start = Instant::now();
        let budget = FailureBudget::new(250 * MS, start);
        // A thousand cheap failures a second, 20 µs each: a fifth of the budget.
        for i in 0..1000u32 {
            let now = start + i * MS;
            budget.charge(Duration::from_micros(20), now);
            assert_eq!(budget.paused(now), None);
        }
    }

    #[test]
    fn an_overdrawn_budget_pauses_until_it_has_refilled() {
        let start = Instant::now();
        let budget = FailureBudget::new(250 * MS, start);
        // Five calls looping to a 50 ms deadline spend the bucket; the sixth overdraws it.
        for _ in 0..5 {
            budget.charge(50 * MS, start);
        }
        assert_eq!(budget.paused(start), None);
        assert!(!budget.in_debt());
        budget.charge(50 * MS, start);
        assert!(budget.in_debt());
        // 50 ms of debt at 250 ms per second: a fifth of a second.
        assert_eq!(budget.paused(start), Some(200 * MS));
        assert_eq!(budget.paused(start + 100 * MS), Some(100 * MS));
        assert!(budget.in_debt());
        assert_eq!(budget.paused(start + 200 * MS), None);
        // Refilled: healthy calls skip the clock again.
        assert!(!budget.in_debt());
    }

    #[test]
    fn an_idle_budget_refills_only_to_one_seconds_worth() {
        let start = Instant::now();
        let budget = FailureBudget::new(100 * MS, start);
        let later = start + Duration::from_secs(60);
        budget.charge(100 * MS, later);
        assert_eq!(budget.paused(later), None);
        budget.charge(MS, later);
        assert!(budget.paused(later).is_some());
    }
}
