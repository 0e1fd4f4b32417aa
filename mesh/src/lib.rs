//! meshserve nodes: the HTTP front doors over the engine of `meshserve-host`, the node's
//! configuration and start-up, the bundled example models, the load generator, and the pure
//! cores of the mesh to come ([`placement`]).

#![forbid(unsafe_code)]

pub mod bench;
pub mod bundled;
pub mod config;
pub mod http;
pub mod node;
pub mod placement;
