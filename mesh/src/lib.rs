//! meshserve nodes: the doors, the serve layer under them, the QUIC mesh that joins nodes,
//! the route-aware clients, the node's configuration and start-up, and the bundled example
//! models. Dependencies point one way (docs/design.md, "The request path on one node"):
//!
//! - [`node`] wires the engine of `meshserve-host`, plugins, [`cluster`], [`dispatch`] and the
//!   doors, from a node [`config`];
//! - the doors only decode and encode: [`http`] (HTTP/1.1, HTTP/2 and HTTP/3) and [`mesh1`]
//!   (`meshserve/1` calls), with the OIP codec in [`oip`];
//! - [`dispatch`]: a call is a model call or an endpoint call, run here or on a replica;
//! - the mesh, bottom up: [`wire`] (frames, sans-IO), [`transport`] (QUIC + mutual TLS),
//!   [`membership`] (SWIM core, sans-IO, and its simulation), [`placement`] (rendezvous
//!   hashing), [`routing`] (balancing, the retry rule and the one replica loop, route hints),
//!   [`cluster`] (a node's mesh shell, which imports no door and no dispatch);
//! - [`client`]: the route-aware clients (`meshserve/1` and HTTP/3).
//!
//! The load generator and benchmarks are the `meshserve-bench` crate.

#![forbid(unsafe_code)]

pub mod bundled;
pub mod client;
pub mod cluster;
pub mod config;
pub mod dispatch;
pub mod http;
pub mod membership;
pub mod mesh1;
pub mod node;
pub mod oip;
pub mod pem;
pub mod placement;
pub mod process;
pub mod routing;
pub mod throttle;
pub mod transport;
pub mod wire;
