//! WebAssembly pre- and post-processing plugins: the bindings of the WIT ([`bindings`]), the
//! wasmtime engine and linker ([`runtime`]) with its on-disk compile cache ([`cache`]), a plugin
//! entry of an endpoint ([`spec`]), a loaded plugin with its instance pool and bounded calls
//! ([`instance`]), the state and host functions its guest sees ([`sandbox`]), the checks of what
//! it returns ([`limits`]), and the feature tables plugins may query ([`features`]).

pub mod bindings;
pub mod cache;
pub mod features;
pub mod instance;
pub mod limits;
pub mod runtime;
pub mod sandbox;
pub mod spec;

/// The SHA-256 of `bytes` in lower-case hex: how plugin versions and compiled artifacts are named.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
