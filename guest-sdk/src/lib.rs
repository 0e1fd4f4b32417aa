//! The SDK for meshserve WebAssembly plugins (`wasm32-wasip2` components).
//!
//! Plugins turn a request into input tensors before inference and output tensors into an
//! answer after it, sandboxed inside the node. The WIT world, its bindings and the authoring
//! helpers land here with the plugin host; until then this crate only reserves the name and
//! the place in the workspace.
