//! What each meshserve binary (`meshserve`, `meshserve-bench`) sets up at start: logging to
//! stderr, and the async runtime it runs on.

use std::io::IsTerminal;
use tokio::runtime::{Builder, Runtime};
use tracing_subscriber::EnvFilter;

/// Logs to stderr at `RUST_LOG`'s levels (default `info`), in colour only on a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// A work-stealing runtime of `threads` threads (unset: one per core), named `name`.
pub fn multi_thread_runtime(threads: Option<usize>, name: &str) -> std::io::Result<Runtime> {
    let mut builder = Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    builder.enable_all().thread_name(name).build()
}

/// A runtime on this thread alone: clients and the load generator leave the rest of the
/// machine to the node they talk to.
pub fn current_thread_runtime() -> std::io::Result<Runtime> {
    Builder::new_current_thread().enable_all().build()
}
