//! The clock plugins are interrupted by: a thread that advances the engine's epoch every
//! [`EPOCH_TICK`] while a guest call has been running for a while, and sleeps otherwise.
//!
//! A tick interrupts every call running at that moment (each then charges its clock and
//! yields), and each tick is a wake-up of this thread (tens of microseconds of a core on a
//! virtual machine, whose timer interrupts exit to the hypervisor). Most calls take
//! microseconds: ticking once a millisecond whenever any call runs would wake the thread a
//! thousand times a second under steady plugin traffic and interrupt calls that were about to
//! end anyway. So calls are counted by the generation they started in. While no call has
//! outlived a generation, the thread looks again every [`QUIET_CHECK`] without ticking; once
//! one has, it ticks every [`EPOCH_TICK`] until every call of that generation has ended. A
//! runaway is first interrupted at most two quiet checks after it starts, then every tick.
//! Steady plugin traffic costs the thread a wake-up every quiet check; a node whose plugins
//! have been idle for one, or whose traffic is all models, pays none.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::Duration;
use wasmtime::Engine;

/// How often the engine's epoch advances while a long call runs: the granularity of
/// deadlines and of yielding.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How often the thread looks for a call that has outlived a generation, while none has.
const QUIET_CHECK: Duration = Duration::from_millis(4);

/// What the ticking thread and the calls share.
#[derive(Default)]
struct Shared {
    /// Guest calls (and instantiations) running now, by the parity of the generation they
    /// started in.
    running: [AtomicUsize; 2],
    /// The generation calls starting now belong to; the thread advances it once every call of
    /// the previous one has ended.
    generation: AtomicUsize,
    /// Whether a call started since the thread last looked: while calls keep coming, it looks
    /// every quiet check instead of parking between them (a parked thread's wake-up costs more
    /// than a look). Set only when clear, so calls share the flag without writing it each time.
    started: AtomicBool,
    /// Ticks given so far.
    ticks: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn any_running(&self) -> bool {
        self.running.iter().any(|n| n.load(Ordering::Acquire) > 0)
    }
}

/// The ticking thread; stops it when dropped.
pub(crate) struct EpochTicker {
    shared: Arc<Shared>,
    thread: Thread,
}

/// Keeps the epoch ticking while it lives: held around every stretch of guest code.
pub(crate) struct Running<'t> {
    ticker: &'t EpochTicker,
    parity: usize,
}

impl EpochTicker {
    /// Starts the thread that ticks `engine`'s epoch.
    pub(crate) fn start(engine: Engine) -> std::io::Result<EpochTicker> {
        let shared = Arc::new(Shared::default());
        let ticking = shared.clone();
        let thread = std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || tick_while_calls_run(&ticking, &engine))?
            .thread()
            .clone();
        Ok(EpochTicker { shared, thread })
    }

    /// Marks guest code as running until the guard is dropped.
    pub(crate) fn running(&self) -> Running<'_> {
        if !self.shared.started.load(Ordering::Relaxed) {
            self.shared.started.store(true, Ordering::Relaxed);
        }
        let parity = self.shared.generation.load(Ordering::Acquire) % 2;
        // A count leaving zero wakes the thread (which parks only with both at zero); a
        // wake-up it does not need costs it one look.
        if self.shared.running[parity].fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        Running {
            ticker: self,
            parity,
        }
    }

    /// Ticks given since the ticker started.
    #[cfg(test)]
    fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::Relaxed)
    }
}

fn tick_while_calls_run(shared: &Shared, engine: &Engine) {
    while !shared.stop.load(Ordering::Acquire) {
        let started = shared.started.swap(false, Ordering::Relaxed);
        if !started && !shared.any_running() {
            // A call that starts unparks the thread; a wake-up without one just looks again.
            std::thread::park();
            continue;
        }
        let current = shared.generation.load(Ordering::Acquire) % 2;
        let previous = 1 - current;
        if shared.running[previous].load(Ordering::Acquire) > 0 {
            // A call of the previous generation has run at least a quiet check (a call that
            // raced the generation's change may be younger: it gets a tick early, which only
            // makes it charge its clock and yield once).
            engine.increment_epoch();
            shared.ticks.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(EPOCH_TICK);
        } else {
            // Calls running now become the previous generation: those still running at the
            // next look have run at least this long.
            shared.generation.fetch_add(1, Ordering::AcqRel);
            std::thread::sleep(QUIET_CHECK);
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.ticker.shared.running[self.parity].fetch_sub(1, Ordering::AcqRel);
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
            // About one a millisecond once the calls have outlived a quiet check; sleeps
            // overshoot on a busy machine, so at least a few.
            assert!((5..=50).contains(&ticked), "{ticked} ticks in 50 ms");
        }
        // The thread stops ticking once nothing runs.
        std::thread::sleep(QUIET_CHECK * 2);
        assert_eq!(ticks_over(&ticker, Duration::from_millis(50)), 0);
        // And starts again for the next call.
        let _again = ticker.running();
        assert!(ticks_over(&ticker, Duration::from_millis(20)) > 0);
    }

    #[test]
    fn calls_shorter_than_a_quiet_check_are_never_interrupted() {
        let ticker = EpochTicker::start(Engine::default()).unwrap();
        // Short calls back to back for 50 ms, one always running: the thread stays awake
        // looking, and never ticks.
        let mut running = ticker.running();
        let started = std::time::Instant::now();
        let mut calls = 0u64;
        while started.elapsed() < Duration::from_millis(50) {
            let next = ticker.running();
            drop(std::mem::replace(&mut running, next));
            calls += 1;
        }
        drop(running);
        assert_eq!(ticker.ticks(), 0, "ticks during {calls} short calls");
        // A call that outlives a quiet check is interrupted within two of them.
        let _long = ticker.running();
        let waited = std::time::Instant::now();
        while ticker.ticks() == 0 {
            assert!(
                waited.elapsed() < Duration::from_secs(1),
                "a long call was never interrupted"
            );
            std::thread::sleep(EPOCH_TICK);
        }
        let first = waited.elapsed();
        assert!(
            first < QUIET_CHECK * 2 + Duration::from_millis(100),
            "first tick after {first:?}"
        );
    }
}
