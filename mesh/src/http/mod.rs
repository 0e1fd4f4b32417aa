//! The HTTP front doors: the OIP codec ([`oip`]), its routes ([`routes`]), endpoints with
//! plugins ([`endpoints`]), the one error
//! mapping ([`error`]), and the TCP server for HTTP/1.1 and HTTP/2 ([`server`]).

pub mod endpoints;
pub mod error;
pub mod oip;
pub mod routes;
pub mod server;
