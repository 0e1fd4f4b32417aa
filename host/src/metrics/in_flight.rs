//! A model's requests in flight on this node, as a time-average per second: by Little's law,
//! the time its requests spent here (queued and running) summed over those that finished in a
//! second, divided by that second. Sampling a gauge would see whatever instant the sample hit
//! (a model answering in 200 µs is mostly idle between bursts); the sum counts every request.
//! What the mesh's replica policy reads (`placement::scale`). Pure logic on explicit seconds.

use std::sync::Mutex;
use std::time::Duration;

/// Busy time of the current second and the one before it.
#[derive(Debug, Default)]
pub struct InFlightMeter {
    slots: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    second: u64,
    busy_us: u64,
    previous_busy_us: u64,
}

impl InFlightMeter {
    /// Adds `busy` (requests × time each spent here) for requests that finished in second `now`.
    pub fn record(&self, busy: Duration, now: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.roll_to(now);
        let us = u64::try_from(busy.as_micros()).unwrap_or(u64::MAX);
        slots.busy_us = slots.busy_us.saturating_add(us);
    }

    /// Requests in flight on average over the last complete second before second `now`.
    pub fn last_second(&self, now: u64) -> f64 {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.roll_to(now);
        slots.previous_busy_us as f64 / 1e6
    }
}

impl Slots {
    fn roll_to(&mut self, now: u64) {
        if now == self.second {
            return;
        }
        self.previous_busy_us = if now == self.second + 1 {
            self.busy_us
        } else {
            0
        };
        self.second = now;
        self.busy_us = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_complete_second_counts_and_an_idle_gap_reads_zero() {
        let meter = InFlightMeter::default();
        // Second 10: 4,000 requests of 500 µs each = 2 requests in flight on average.
        for _ in 0..4000 {
            meter.record(Duration::from_micros(500), 10);
        }
        assert_eq!(meter.last_second(10), 0.0, "second 10 is not over");
        assert!((meter.last_second(11) - 2.0).abs() < 1e-9);
        meter.record(Duration::from_millis(300), 11);
        assert!((meter.last_second(11) - 2.0).abs() < 1e-9);
        assert!((meter.last_second(12) - 0.3).abs() < 1e-9);
        assert_eq!(meter.last_second(14), 0.0, "nothing finished in second 13");
    }
}
