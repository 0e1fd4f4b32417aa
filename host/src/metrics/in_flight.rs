//! A model's requests in flight on this node, as a time-average per [`PERIOD`]: by Little's
//! law, the time its requests spent here (queued and running) summed over those that finished
//! in a period, divided by the period. Sampling a gauge would see whatever instant the sample
//! hit (a model answering in 200 µs is mostly idle between bursts); the sum counts every
//! request. What the mesh's replica policy reads (`placement::scale`), once a period. Pure
//! logic on explicit period numbers.

use std::sync::Mutex;
use std::time::Duration;

/// The span each figure averages over. Half a second: short enough that a step in load shows
/// within a second, long enough to hold many requests of any model worth scaling.
pub const PERIOD: Duration = Duration::from_millis(500);

/// Busy time of the current period and the one before it.
#[derive(Debug, Default)]
pub struct InFlightMeter {
    slots: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    period: u64,
    busy_us: u64,
    previous_busy_us: u64,
}

impl InFlightMeter {
    /// Adds `busy` (requests × time each spent here) for requests that finished in period
    /// number `now`.
    pub fn record(&self, busy: Duration, now: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.roll_to(now);
        let us = u64::try_from(busy.as_micros()).unwrap_or(u64::MAX);
        slots.busy_us = slots.busy_us.saturating_add(us);
    }

    /// Requests in flight on average over the last complete period before period `now`.
    pub fn last_period(&self, now: u64) -> f64 {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.roll_to(now);
        slots.previous_busy_us as f64 / PERIOD.as_micros() as f64
    }
}

/// The number of the period `elapsed` falls in.
pub fn period_of(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis() / PERIOD.as_millis()).unwrap_or(u64::MAX)
}

impl Slots {
    fn roll_to(&mut self, now: u64) {
        if now == self.period {
            return;
        }
        self.previous_busy_us = if now == self.period + 1 {
            self.busy_us
        } else {
            0
        };
        self.period = now;
        self.busy_us = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_complete_period_counts_and_an_idle_gap_reads_zero() {
        let meter = InFlightMeter::default();
        let period_us = PERIOD.as_micros() as u64;
        // Period 10: requests of 500 µs each, twice as many as fit one after another = 2
        // requests in flight on average.
        for _ in 0..2 * period_us / 500 {
            meter.record(Duration::from_micros(500), 10);
        }
        assert_eq!(meter.last_period(10), 0.0, "period 10 is not over");
        assert!((meter.last_period(11) - 2.0).abs() < 1e-9);
        meter.record(PERIOD * 3 / 10, 11);
        assert!((meter.last_period(11) - 2.0).abs() < 1e-9);
        assert!((meter.last_period(12) - 0.3).abs() < 1e-9);
        assert_eq!(meter.last_period(14), 0.0, "nothing finished in period 13");
    }

    #[test]
    fn periods_are_numbered_from_the_start() {
        assert_eq!(period_of(Duration::ZERO), 0);
        assert_eq!(period_of(PERIOD - Duration::from_micros(1)), 0);
        assert_eq!(period_of(PERIOD * 7), 7);
    }
}
