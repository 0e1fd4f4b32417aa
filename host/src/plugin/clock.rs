//! The running time of a guest call: what its budget is charged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The running time of one call: time its future is being polled. Time spent yielded (waiting
/// in the async run queue, or in an async WASI call) is not the plugin's doing, so it does not
/// count against the plugin's budget: under a burst, a wall-clock deadline would fail
/// well-behaved plugins that merely waited their turn. (The wall-clock cap is separate.)
///
/// Nor is time the operating system gives other threads while the call is being polled: once
/// a call has run [`CPU_CLOCK_AFTER`], it is charged the polling thread's CPU time, so a node
/// sharing its cores with a compile or a load generator does not fail a plugin that did
/// little work. Reading that clock is a system call (about 0.4 µs here), so the short calls
/// that are nearly all of them are charged by the cheap monotonic clock; that overcharges
/// them by at most the time other threads took during their first millisecond.
pub struct RunningClock {
    budget: Duration,
    state: Mutex<ClockState>,
}

/// Running time a call is charged by the monotonic clock before the thread's CPU clock takes
/// over.
pub const CPU_CLOCK_AFTER: Duration = Duration::from_millis(1);

struct ClockState {
    used: Duration,
    /// Where the stretch of running being charged began, on the clock that charges it.
    since: Mark,
}

#[derive(Clone, Copy)]
enum Mark {
    Wall(Instant),
    ThreadCpu(Duration),
}

impl Mark {
    /// The mark for a stretch starting now, on the clock that `used` calls for.
    fn now(used: Duration) -> Mark {
        if used >= CPU_CLOCK_AFTER {
            Mark::ThreadCpu(thread_cpu_time())
        } else {
            Mark::Wall(Instant::now())
        }
    }

    /// Adds the stretch since this mark to `used`; returns the mark for the stretch that
    /// starts now.
    fn charge_into(self, used: &mut Duration) -> Mark {
        match self {
            Mark::Wall(at) => {
                *used += at.elapsed();
                Mark::now(*used)
            }
            Mark::ThreadCpu(at) => {
                let now = thread_cpu_time();
                *used += now.saturating_sub(at);
                Mark::ThreadCpu(now)
            }
        }
    }
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    // The kernel never reports negative CPU time; a zero is harmless either way.
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

impl RunningClock {
    pub(crate) fn new(budget: Duration) -> RunningClock {
        RunningClock {
            budget,
            state: Mutex::new(ClockState {
                used: Duration::ZERO,
                since: Mark::Wall(Instant::now()),
            }),
        }
    }

    /// Adds the running time since the last resumption or charge; true once the budget is
    /// spent. Called on the thread polling the call (the epoch callback runs there too).
    pub(crate) fn charge(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ClockState { used, since } = &mut *state;
        *since = since.charge_into(used);
        *used >= self.budget
    }

    /// The call's future is being polled again, on the calling thread.
    pub(crate) fn resumed(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.since = Mark::now(state.used);
    }

    /// The call's future returned from a poll: what ran since the last charge counts.
    pub(crate) fn paused(&self) {
        self.charge();
    }

    /// Running time charged so far.
    pub(crate) fn used(&self) -> Duration {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(busy_for: Duration, clock: impl Fn() -> Duration) {
        let start = clock();
        while clock().saturating_sub(start) < busy_for {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_long_call_is_charged_the_cpu_time_it_used_not_the_time_its_thread_was_descheduled() {
        let budget = Duration::from_millis(20);
        let clock = RunningClock::new(budget);
        let started = Instant::now();
        clock.resumed();
        spin(CPU_CLOCK_AFTER * 2, || started.elapsed());
        assert!(!clock.charge());
        // Off the CPU in the middle of a poll, as when the OS runs other threads.
        std::thread::sleep(budget * 2);
        assert!(!clock.charge(), "charged {:?}", clock.used());
        assert!(clock.used() < budget, "charged {:?}", clock.used());
        // Work it does itself still counts: a runaway call is stopped.
        spin(budget, thread_cpu_time);
        assert!(clock.charge(), "charged {:?}", clock.used());
    }
}
