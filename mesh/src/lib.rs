//! meshserve nodes: the HTTP front doors over the engine of `meshserve-host`, the QUIC mesh
//! that joins nodes, the route-aware client, the node's configuration and start-up, the
//! bundled example models, and the load generator.
//!
//! The mesh, bottom up: [`wire`] (frames, sans-IO), [`transport`] (QUIC + mutual TLS),
//! [`membership`] (SWIM core, sans-IO, and its simulation), [`placement`] (rendezvous hashing),
//! [`routing`] (p2c over peak-EWMA, route hints), [`cluster`] (a node's mesh service),
//! [`client`] (route-aware client). [`dispatch`] is where every door's requests meet the
//! engine or the mesh.

#![forbid(unsafe_code)]

pub mod bench;
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
pub mod routing;
pub mod transport;
pub mod wire;
