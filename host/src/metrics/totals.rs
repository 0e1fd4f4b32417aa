//! A model's running totals as the Open Inference Protocol's statistics extension reports
//! them (Triton's `ModelStatistics`: counts and cumulative nanoseconds since the node
//! started), which perf_analyzer and tritonclient read. Prometheus histograms hold the same
//! figures but do not hand them back, so they are kept here too: a few relaxed atomic adds
//! per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A count and the time it adds up to.
#[derive(Debug, Default)]
struct AtomicTally {
    count: AtomicU64,
    ns: AtomicU64,
}

impl AtomicTally {
    fn add(&self, count: u64, time: Duration) {
        self.count.fetch_add(count, Ordering::Relaxed);
        let ns = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
        self.ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn read(&self) -> Tally {
        Tally {
            count: self.count.load(Ordering::Relaxed),
            ns: self.ns.load(Ordering::Relaxed),
        }
    }
}

/// A count of events and their cumulative time in nanoseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Events.
    pub count: u64,
    /// Their time added up, ns.
    pub ns: u64,
}

/// One model's totals on this node.
#[derive(Debug, Default)]
pub struct ModelTotals {
    success: AtomicTally,
    fail: AtomicTally,
    queue: AtomicTally,
    compute: AtomicTally,
    executions: AtomicU64,
    rows: AtomicU64,
    last_run_ms: AtomicU64,
}

/// What [`ModelTotals`] held when read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TotalsSnapshot {
    /// Requests answered successfully, and their time from arrival to answer.
    pub success: Tally,
    /// Requests that failed, and their time.
    pub fail: Tally,
    /// Requests that reached a session, and their time waiting in the queue.
    pub queue: Tally,
    /// Requests run, and the time of the run each was part of (stacking inputs and splitting
    /// outputs included, which Triton reports apart as compute input and output).
    pub compute: Tally,
    /// Runs of the model (a batch is one).
    pub executions: u64,
    /// Rows inferred (a batch of 8 one-row requests is 8).
    pub rows: u64,
    /// When the model last ran, ms since the Unix epoch; 0 if never.
    pub last_run_ms: u64,
}

impl ModelTotals {
    /// Counts one answered request and its time from arrival to answer.
    pub fn record_request(&self, ok: bool, elapsed: Duration) {
        if ok { &self.success } else { &self.fail }.add(1, elapsed);
    }

    /// Counts one run of the model: the requests it held and their waits in the queue added
    /// up, the rows they held, and its run time (which every request in it spent).
    pub fn record_run(&self, requests: u32, waited: Duration, rows: usize, took: Duration) {
        self.queue.add(u64::from(requests), waited);
        self.compute
            .add(u64::from(requests), took.saturating_mul(requests));
        self.executions.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_run_ms.store(now_ms, Ordering::Relaxed);
    }

    /// The totals now.
    pub fn snapshot(&self) -> TotalsSnapshot {
        TotalsSnapshot {
            success: self.success.read(),
            fail: self.fail.read(),
            queue: self.queue.read(),
            compute: self.compute.read(),
            executions: self.executions.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            last_run_ms: self.last_run_ms.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_counts_once_as_a_run_and_once_per_request() {
        let totals = ModelTotals::default();
        let ms = Duration::from_millis;
        totals.record_run(2, ms(4), 5, ms(10));
        totals.record_run(1, ms(0), 1, ms(2));
        totals.record_request(true, ms(20));
        totals.record_request(true, ms(30));
        totals.record_request(false, ms(7));
        let got = totals.snapshot();
        assert_eq!(got.executions, 2);
        assert_eq!(got.rows, 6);
        assert_eq!(
            got.queue,
            Tally {
                count: 3,
                ns: 4_000_000
            }
        );
        // Both requests of the batch spent its 10 ms.
        assert_eq!(
            got.compute,
            Tally {
                count: 3,
                ns: 22_000_000
            }
        );
        assert_eq!(
            got.success,
            Tally {
                count: 2,
                ns: 50_000_000
            }
        );
        assert_eq!(
            got.fail,
            Tally {
                count: 1,
                ns: 7_000_000
            }
        );
        assert!(got.last_run_ms > 1_700_000_000_000, "{}", got.last_run_ms);
    }
}
