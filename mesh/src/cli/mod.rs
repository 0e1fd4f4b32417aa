//! The subcommands of `meshserve`, one module each; `main` parses and hands off here.

pub(crate) mod certs;
pub(crate) mod infer;
pub(crate) mod plugin;
pub(crate) mod serve;
pub(crate) mod status;

use anyhow::{Context, Result};
use meshserve::transport::MeshIdentity;
use meshserve::transport::certs::Role;
use std::path::Path;

/// A work-stealing runtime of `threads` threads (unset: one per core), named `name`.
pub(crate) fn multi_thread_runtime(
    threads: Option<usize>,
    name: &str,
) -> Result<tokio::runtime::Runtime> {
    meshserve::process::multi_thread_runtime(threads, name)
        .context("cannot start the async runtime")
}

/// A runtime on this thread alone (see [`meshserve::process::current_thread_runtime`]).
pub(crate) fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    meshserve::process::current_thread_runtime().context("cannot start the async runtime")
}

/// The mesh client certificate `client-NAME.pem` in `certs`, with what to do when it is missing.
pub(crate) fn client_identity(certs: &Path, name: &str) -> Result<MeshIdentity> {
    MeshIdentity::from_dir(certs, Role::Client, name).with_context(|| {
        format!(
            "client certificate '{name}' in {dir} (create it with `meshserve certs --dir {dir} --client {name}`)",
            dir = certs.display()
        )
    })
}
