//! A model's last few seconds of requests, for `meshserve status`: how many per second, and
//! their p99. Prometheus keeps totals since start (a dashboard takes rates from those); an
//! operator asking a node "how is it doing now" needs the recent window without a Prometheus
//! server. One-second slots in a ring, each with a coarse latency histogram (about 6%
//! resolution, a few KiB per slot); pure logic on explicit times.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Seconds the window covers.
pub const WINDOW_SECONDS: u64 = 10;

/// Longest latency told apart, in µs (longer ones count as this).
const MAX_LATENCY_US: u64 = 60_000_000;

/// Requests per second and p99 over the last [`WINDOW_SECONDS`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecentLoad {
    /// Requests answered per second.
    pub requests_per_second: f64,
    /// Their 99th percentile latency; `None` when there were none.
    pub p99: Option<Duration>,
}

struct Slot {
    second: u64,
    latencies: Histogram<u64>,
}

/// The ring of one-second slots.
pub struct RecentWindow {
    slots: Vec<Slot>,
}

impl Default for RecentWindow {
    fn default() -> Self {
        RecentWindow::new()
    }
}

impl RecentWindow {
    /// An empty window.
    pub fn new() -> RecentWindow {
        let slots = (0..WINDOW_SECONDS)
            .map(|_| Slot {
                second: u64::MAX,
                // One significant digit: bounds and precision are constants that fit.
                latencies: Histogram::new_with_bounds(1, MAX_LATENCY_US, 1)
                    .expect("constant, valid bounds"),
            })
            .collect();
        RecentWindow { slots }
    }

    /// Records one request that took `latency`, answered in second `now` (any monotonic
    /// count of seconds).
    pub fn record(&mut self, latency: Duration, now: u64) {
        let slot = &mut self.slots[(now % WINDOW_SECONDS) as usize];
        if slot.second != now {
            slot.second = now;
            slot.latencies.reset();
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        slot.latencies
            .saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    /// The load over the [`WINDOW_SECONDS`] seconds up to and including second `now`.
    pub fn load(&self, now: u64) -> RecentLoad {
        let oldest = now.saturating_sub(WINDOW_SECONDS - 1);
        let mut merged: Option<Histogram<u64>> = None;
        for slot in self
            .slots
            .iter()
            .filter(|s| s.second != u64::MAX && (oldest..=now).contains(&s.second))
        {
            match &mut merged {
                Some(all) => {
                    let _ = all.add(&slot.latencies);
                }
                None => merged = Some(slot.latencies.clone()),
            }
        }
        let count = merged.as_ref().map_or(0, Histogram::len);
        RecentLoad {
            requests_per_second: count as f64 / WINDOW_SECONDS as f64,
            p99: merged
                .filter(|h| !h.is_empty())
                .map(|h| Duration::from_micros(h.value_at_quantile(0.99))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_the_last_ten_seconds_and_their_p99() {
        let mut window = RecentWindow::new();
        assert_eq!(window.load(100).requests_per_second, 0.0);
        assert_eq!(window.load(100).p99, None);
        // 990 fast requests and 10 slow ones over seconds 91..=100.
        for i in 0..1000u64 {
            let latency = if i % 100 == 0 {
                Duration::from_millis(50)
            } else {
                Duration::from_micros(400)
            };
            window.record(latency, 91 + i % 10);
        }
        let load = window.load(100);
        assert_eq!(load.requests_per_second, 100.0);
        let p99 = load.p99.unwrap();
        assert!(
            p99 >= Duration::from_micros(380) && p99 <= Duration::from_micros(430),
            "{p99:?}"
        );
        // Five seconds on, half the slots are out of the window.
        assert_eq!(window.load(105).requests_per_second, 50.0);
        // A slot reused for a new second forgets the old one.
        window.record(Duration::from_millis(1), 111);
        let later = window.load(111);
        assert_eq!(later.requests_per_second, 0.1);
        assert!(
            later.p99.unwrap() >= Duration::from_micros(960),
            "{later:?}"
        );
    }
}
