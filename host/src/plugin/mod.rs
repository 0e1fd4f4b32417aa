//! WebAssembly pre- and post-processing plugins, one concept per file:
//! - loading: the bindings of the WIT ([`bindings`]), the wasmtime engine and linker
//!   ([`runtime`]) with its on-disk compile cache ([`cache`]), a plugin entry of an endpoint
//!   ([`spec`]);
//! - running: a loaded plugin with its instance pool and bounded calls ([`instance`]), what all
//!   plugins of a node share while they run (`node`: engine, instance slots, memory budget),
//!   what a stage's call returns, bounded in count as it is lifted ([`outcome`]), and the
//!   running time its failures may spend before its calls pause ([`failures`]);
//! - what a guest sees and may spend: the host functions and store state ([`sandbox`]), the
//!   request and context it is called with ([`views`]), its linear memory ([`memory`]), its
//!   running time ([`clock`]), stderr ([`stdio`]), randomness ([`random`]), why a call was
//!   stopped ([`stopped`]), the checks of what it returns ([`limits`]), and the feature tables
//!   it may query ([`features`]).

pub mod bindings;
pub mod cache;
pub mod clock;
mod epoch;
pub mod failures;
pub mod features;
pub mod instance;
pub mod limits;
pub mod memory;
mod node;
pub mod outcome;
pub mod random;
pub mod runtime;
pub mod sandbox;
pub mod spec;
pub mod stdio;
pub mod stopped;
pub mod views;

/// The SHA-256 of `bytes` in lower-case hex: how plugin versions and compiled artifacts are named.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
