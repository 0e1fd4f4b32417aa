//! WebAssembly pre- and post-processing plugins: the bindings of the one WIT world
//! ([`bindings`]), the wasmtime engine and compile cache ([`runtime`]), a loaded plugin and its
//! sandboxed calls ([`instance`]), and the feature tables plugins may query ([`features`]).

pub mod bindings;
pub mod features;
pub mod instance;
pub mod runtime;
