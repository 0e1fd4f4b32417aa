//! Choosing a replica: power of two choices over a peak-EWMA latency × outstanding score.
//!
//! The ideas are Finagle's, as linkerd and tower use them: Mitzenmacher's "The Power of Two
//! Choices in Randomized Load Balancing" (2001) picks two replicas at random and takes the
//! better, which spreads load nearly as well as examining every replica without herding onto
//! the single best one; the score is a latency EWMA that jumps up at once on a slow answer
//! ("peak") and decays slowly, multiplied by the requests already in flight to that replica.
//! A replica never measured scores a modest default, so a new one is tried but not flooded.
//! As in tower's `PeakEwma`, the estimate also decays while nothing is measured (at read
//! time): a replica that failed or was slow once, and so stopped being picked, looks better
//! with time and gets traffic again instead of being shunned for good. A request's place in
//! the outstanding count is a guard ([`Pending`]), so a caller that gives up (its future
//! dropped) cannot leave a replica looking busy forever. Replicas the caller knows to be in
//! doubt (SWIM suspects) are picked only when no other is left. Where the replicas report
//! the queue wait a new request would meet (their adverts do), it is added to the latency:
//! a replica's queue also holds what other nodes sent it, which this caller's measurements
//! see only once its own requests come back slow.
//! Pure logic on explicit `Instant`s; the caller supplies the time.
//!
//! Why not tower's `p2c::Balance` and `load::PeakEwma` themselves: `Balance` picks among the
//! ready services of a `Discover` stream when it is polled, so a retry cannot say "any replica
//! but the one that just failed", and SWIM suspicion has no place in its choice; `PeakEwma`
//! measures the calls made through the service it wraps, while here one replica's estimate is
//! fed by every request any door forwards and by the route-aware client's own calls. The
//! retry budget, where tower's fits as it is, is tower's ([`super::retry`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The latency a never-measured replica is assumed to have.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// How fast old measurements fade.
pub const DECAY: Duration = Duration::from_secs(10);

/// The latency charged for a failed request: bad enough that p2c avoids the replica for a
/// while, decaying like any measurement, so it gets retried later.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// One replica's load estimate.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    ewma_ns: f64,
    stamp: Instant,
    outstanding: u32,
}

impl PeakEwma {
    /// A replica never measured.
    pub fn new(now: Instant) -> PeakEwma {
        PeakEwma {
            ewma_ns: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
            outstanding: 0,
        }
    }

    /// An estimate that starts at `latency` instead of the default.
    pub fn starting_at(latency: Duration, now: Instant) -> PeakEwma {
        PeakEwma {
            ewma_ns: latency.as_nanos() as f64,
            stamp: now,
            outstanding: 0,
        }
    }

    /// Folds in one measured latency.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt_ns = rtt.as_nanos() as f64;
        if rtt_ns > self.ewma_ns {
            self.ewma_ns = rtt_ns;
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
            let weight = (-elapsed / DECAY.as_nanos() as f64).exp();
            self.ewma_ns = self.ewma_ns * weight + rtt_ns * (1.0 - weight);
        }
        self.stamp = now;
    }

    /// The estimate at `now`: the last one, faded by the time since it was made.
    fn decayed_ns(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        self.ewma_ns * (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    /// The score p2c compares at `now`: lower is better.
    pub fn cost(&self, now: Instant) -> f64 {
        self.cost_waiting(Duration::ZERO, now)
    }

    /// The score with `queue_wait`, the wait the replica reports for a new request, added to
    /// the latency estimate.
    fn cost_waiting(&self, queue_wait: Duration, now: Instant) -> f64 {
        (self.decayed_ns(now) + queue_wait.as_nanos() as f64) * f64::from(self.outstanding + 1)
    }

    /// The current latency estimate.
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.ewma_ns as u64)
    }
}

/// Load estimates for every replica a node or client talks to, by node name.
#[derive(Debug)]
pub struct Balancer {
    state: Mutex<BalancerState>,
}

#[derive(Debug)]
struct BalancerState {
    replicas: HashMap<String, PeakEwma>,
    rng: u64,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer::new(0x853c_49e6_748f_ea9b)
    }
}

impl Balancer {
    /// A balancer whose random choices start from `seed`.
    pub fn new(seed: u64) -> Balancer {
        Balancer {
            state: Mutex::new(BalancerState {
                replicas: HashMap::new(),
                rng: seed | 1,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BalancerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks one of `candidates` (node names) by power of two choices; `None` when empty.
    pub fn pick<'a>(&self, candidates: &[&'a str], now: Instant) -> Option<&'a str> {
        self.pick_avoiding(candidates, |_| false, |_| Duration::ZERO, now)
    }

    /// As [`Balancer::pick`], but among the candidates `in_doubt` does not flag whenever there
    /// are any, and with the queue wait each candidate reports (`queue_wait`) added to its
    /// latency estimate.
    pub fn pick_avoiding<'a>(
        &self,
        candidates: &[&'a str],
        in_doubt: impl Fn(&str) -> bool,
        queue_wait: impl Fn(&str) -> Duration,
        now: Instant,
    ) -> Option<&'a str> {
        let trusted: Vec<&'a str> = candidates
            .iter()
            .copied()
            .filter(|c| !in_doubt(c))
            .collect();
        let candidates = if trusted.is_empty() {
            candidates
        } else {
            &trusted
        };
        let mut state = self.lock();
        let (first, second) = match candidates.len() {
            0 => return None,
            1 => return Some(candidates[0]),
            n => {
                let a = (state.next() % n as u64) as usize;
                let b = (a + 1 + (state.next() % (n as u64 - 1)) as usize) % n;
                (candidates[a], candidates[b])
            }
        };
        let cost = |state: &mut BalancerState, node: &str| {
            state
                .replicas
                .entry(node.to_string())
                .or_insert_with(|| PeakEwma::new(now))
                .cost_waiting(queue_wait(node), now)
        };
        let (a, b) = (cost(&mut state, first), cost(&mut state, second));
        Some(if b < a { second } else { first })
    }

    /// Counts a request sent to `node` until the returned guard is finished or dropped.
    pub fn start(&self, node: &str, now: Instant) -> Pending<'_> {
        let mut state = self.lock();
        state
            .replicas
            .entry(node.to_string())
            .or_insert_with(|| PeakEwma::new(now))
            .outstanding += 1;
        Pending {
            balancer: self,
            node: Some(node.to_string()),
        }
    }

    fn end(&self, node: &str, latency: Option<Option<Duration>>, now: Instant) {
        let mut state = self.lock();
        if let Some(entry) = state.replicas.get_mut(node) {
            entry.outstanding = entry.outstanding.saturating_sub(1);
            if let Some(latency) = latency {
                entry.observe(latency.unwrap_or(FAILURE_PENALTY), now);
            }
        }
    }

    /// The latency estimate of `node`, if it was ever used.
    pub fn latency(&self, node: &str) -> Option<Duration> {
        self.lock().replicas.get(node).map(PeakEwma::latency)
    }
}

/// A request counted as outstanding at one replica.
#[must_use = "finish it with the outcome; dropping it only stops counting the request"]
pub struct Pending<'a> {
    balancer: &'a Balancer,
    node: Option<String>,
}

impl Pending<'_> {
    /// Records how the request ended: its latency, or `None` for a failure.
    pub fn finish(mut self, latency: Option<Duration>, now: Instant) {
        if let Some(node) = self.node.take() {
            self.balancer.end(&node, Some(latency), now);
        }
    }
}

impl Drop for Pending<'_> {
    // A caller that gave up: the request no longer counts, and says nothing about latency.
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            self.balancer.end(&node, None, Instant::now());
        }
    }
}

impl BalancerState {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_answer_counts_at_once_and_fades() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(50), t0);
        assert_eq!(e.latency(), Duration::from_millis(50), "peaks jump");
        e.observe(Duration::from_millis(1), t0 + Duration::from_millis(1));
        assert!(
            e.latency() > Duration::from_millis(45),
            "one fast answer barely moves it"
        );
        e.observe(Duration::from_millis(1), t0 + Duration::from_secs(60));
        assert!(e.latency() < Duration::from_millis(2), "but time does");
    }

    #[test]
    fn outstanding_requests_raise_the_cost() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        let idle = e.cost(t0);
        e.outstanding = 3;
        assert_eq!(e.cost(t0), idle * 4.0);
    }

    #[test]
    fn p2c_avoids_a_slow_replica_and_spreads_over_equals() {
        let t0 = Instant::now();
        let balancer = Balancer::new(7);
        balancer
            .start("slow", t0)
            .finish(Some(Duration::from_millis(100)), t0);
        let mut picks: HashMap<&str, i32> = HashMap::new();
        for _ in 0..3000 {
            let node = balancer.pick(&["a", "b", "slow"], t0).unwrap();
            *picks.entry(node).or_insert(0) += 1;
        }
        // Two distinct replicas are drawn each time, so "slow" always loses its pair.
        assert_eq!(picks.get("slow"), None, "{picks:?}");
        let (a, b) = (picks["a"], picks["b"]);
        assert!((a - b).abs() < 300, "{picks:?}");
    }

    #[test]
    fn a_replica_reporting_a_long_queue_wait_is_passed_over_while_others_have_room() {
        let t0 = Instant::now();
        let balancer = Balancer::new(13);
        // Both answered this caller in 2 ms; "busy" reports that a new request would wait
        // 20 ms in its queue (other nodes fill it).
        for node in ["idle", "busy"] {
            balancer
                .start(node, t0)
                .finish(Some(Duration::from_millis(2)), t0);
        }
        let mut waits = HashMap::from([
            ("busy", Duration::from_millis(20)),
            ("idle", Duration::ZERO),
        ]);
        let busy_picks = |waits: &HashMap<&str, Duration>| {
            (0..200)
                .filter(|_| {
                    balancer.pick_avoiding(&["idle", "busy"], |_| false, |n| waits[n], t0)
                        == Some("busy")
                })
                .count()
        };
        assert_eq!(busy_picks(&waits), 0);
        // Three of this caller's requests outstanding at "idle": 4 x 2 ms still beats 22 ms.
        let _outstanding: Vec<_> = (0..3).map(|_| balancer.start("idle", t0)).collect();
        assert_eq!(busy_picks(&waits), 0);
        // Once "idle" reports a queue as long, its outstanding requests tip it.
        waits.insert("idle", Duration::from_millis(20));
        assert_eq!(busy_picks(&waits), 200);
    }

    #[test]
    fn a_failure_sends_traffic_elsewhere() {
        let t0 = Instant::now();
        let balancer = Balancer::new(3);
        balancer.start("a", t0).finish(None, t0);
        for _ in 0..100 {
            assert_eq!(balancer.pick(&["a", "b"], t0), Some("b"));
        }
        assert_eq!(
            balancer.pick(&["a"], t0),
            Some("a"),
            "a lone replica is still used"
        );
        assert_eq!(balancer.pick(&[], t0), None);
    }

    #[test]
    fn a_shunned_replica_is_forgiven_with_time() {
        let t0 = Instant::now();
        let balancer = Balancer::new(5);
        balancer.start("a", t0).finish(None, t0);
        balancer
            .start("b", t0)
            .finish(Some(Duration::from_millis(1)), t0);
        assert_eq!(balancer.pick(&["a", "b"], t0), Some("b"));
        // Nothing measured "a" since (it was never picked); its penalty fades at read time
        // until it looks no worse than "b" does after its own last answer.
        let later = t0 + Duration::from_secs(120);
        balancer
            .start("b", later)
            .finish(Some(Duration::from_millis(1)), later);
        let picks_a = (0..200)
            .filter(|_| balancer.pick(&["a", "b"], later) == Some("a"))
            .count();
        assert!(picks_a > 0, "a once-failed replica gets traffic again");
    }

    #[test]
    fn a_request_given_up_stops_counting() {
        let t0 = Instant::now();
        let balancer = Balancer::new(9);
        let idle = balancer.lock().replicas.get("a").map(|e| e.cost(t0));
        assert_eq!(idle, None);
        {
            let _abandoned = balancer.start("a", t0);
            let busy = balancer.lock().replicas["a"].outstanding;
            assert_eq!(busy, 1);
        }
        let state = balancer.lock();
        assert_eq!(state.replicas["a"].outstanding, 0, "dropped, not leaked");
        assert_eq!(
            state.replicas["a"].latency(),
            DEFAULT_RTT,
            "a cancelled request is no latency sample"
        );
    }

    #[test]
    fn replicas_in_doubt_are_picked_only_when_none_else_is_left() {
        let t0 = Instant::now();
        let balancer = Balancer::new(11);
        // "s" looks fastest, but is a suspect.
        balancer
            .start("a", t0)
            .finish(Some(Duration::from_millis(5)), t0);
        balancer
            .start("b", t0)
            .finish(Some(Duration::from_millis(5)), t0);
        balancer
            .start("s", t0)
            .finish(Some(Duration::from_micros(10)), t0);
        for _ in 0..200 {
            let pick =
                balancer.pick_avoiding(&["a", "b", "s"], |n| n == "s", |_| Duration::ZERO, t0);
            assert_ne!(pick, Some("s"));
        }
        assert_eq!(
            balancer.pick_avoiding(&["s"], |n| n == "s", |_| Duration::ZERO, t0),
            Some("s"),
            "the last resort"
        );
    }
}
