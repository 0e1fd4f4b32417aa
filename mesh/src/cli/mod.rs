//! The subcommands of `meshserve`, one module each; `main` parses and hands off here.

pub(crate) mod certs;
pub(crate) mod infer;
pub(crate) mod serve;
pub(crate) mod status;

use anyhow::{Context, Result};

/// A work-stealing runtime of `threads` threads (unset: one per core), named `name`.
pub(crate) fn multi_thread_runtime(
    threads: Option<usize>,
    name: &str,
) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .thread_name(name)
        .build()
        .context("cannot start the async runtime")
}

/// A runtime on this thread alone: clients and the load generator leave the rest of the
/// machine to the node they talk to.
pub(crate) fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
