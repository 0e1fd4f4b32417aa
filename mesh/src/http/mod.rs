//! The HTTP front doors: the OIP codec ([`oip`]), its routes ([`routes`]), the one error
//! mapping ([`error`]), and the TCP server for HTTP/1.1 and HTTP/2 ([`server`]).

pub mod error;
pub mod oip;
pub mod routes;
pub mod server;
