//! The clock plugins are interrupted by: a thread that advances the engine's epoch every
//! [`EPOCH_TICK`] while guest code runs somewhere on the node, and sleeps otherwise. A node
//! whose plugins are idle, or whose traffic is all models, pays no wake-ups for them (a tick
//! that nothing needs costs a thread wake-up a millisecond, about a tenth of a core on the
//! development VM).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::Duration;
use wasmtime::Engine;

/// How often the engine's epoch advances while guest code runs: the granularity of
/// deadlines and of yielding.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// What the ticking thread and the calls share.
#[derive(Default)]
struct Shared {
    /// Guest calls (and instantiations) running now.
    running: AtomicUsize,
    /// Ticks given so far.
    ticks: AtomicU64,
    stop: AtomicBool,
}

/// The ticking thread; stops it when dropped.
pub(crate) struct EpochTicker {
    shared: Arc<Shared>,
    thread: Thread,
}

/// Keeps the epoch ticking while it lives: held around every stretch of guest code.
pub(crate) struct Running<'t>(&'t EpochTicker);

impl EpochTicker {
    /// Starts the thread that ticks `engine`'s epoch.
    pub(crate) fn start(engine: Engine) -> std::io::Result<EpochTicker> {
        let shared = Arc::new(Shared::default());
        let ticking = shared.clone();
        let thread = std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !ticking.stop.load(Ordering::Acquire) {
                    if ticking.running.load(Ordering::Acquire) == 0 {
                        // A call that starts unparks the thread; a wake-up without one just
                        // looks again.
                        std::thread::park();
                        continue;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                    ticking.ticks.fetch_add(1, Ordering::Relaxed);
                }
            })?
            .thread()
            .clone();
        Ok(EpochTicker { shared, thread })
    }

    /// Marks guest code as running until the guard is dropped.
    pub(crate) fn running(&self) -> Running<'_> {
        if self.shared.running.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        Running(self)
    }

    /// Ticks given since the ticker started.
    #[cfg(test)]
    fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::Relaxed)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.shared.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticks_over(ticker: &EpochTicker, time: Duration) -> u64 {
        let before = ticker.ticks();
        std::thread::sleep(time);
        ticker.ticks() - before
    }

    #[test]
    fn the_epoch_ticks_only_while_guest_code_runs() {
        let ticker = EpochTicker::start(Engine::default()).unwrap();
        assert_eq!(ticks_over(&ticker, Duration::from_millis(50)), 0);
        {
            let _one = ticker.running();
            let _two = ticker.running();
            let ticked = ticks_over(&ticker, Duration::from_millis(50));
            // Sleeps overshoot on a busy machine; about one a millisecond, at least a few.
            assert!((5..=50).contains(&ticked), "{ticked} ticks in 50 ms");
        }
        // The thread notices within a tick that nothing runs.
        std::thread::sleep(EPOCH_TICK * 5);
        assert_eq!(ticks_over(&ticker, Duration::from_millis(50)), 0);
        // And starts again for the next call.
        let _again = ticker.running();
        assert!(ticks_over(&ticker, Duration::from_millis(20)) > 0);
    }
}
