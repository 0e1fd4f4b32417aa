//! The HTTP doors, which only decode and encode: the route table ([`routes`]) and one handler
//! module per resource: the node's health and metrics ([`health`]), models ([`models`]), the
//! model repository ([`repository`]), the statistics extension ([`statistics`]), endpoint invocations and the endpoint repository API
//! ([`endpoints`]); what handlers share ([`state`]), how they read bodies ([`body`]) and write
//! answers ([`respond`]), the one error mapping ([`error`]), admin authority ([`admin`]), the
//! application that serves the inference route directly and the rest through the router
//! ([`app`]), the TCP server for HTTP/1.1 and HTTP/2 ([`server`]) and the QUIC server for
//! HTTP/3 ([`http3`]), both serving the same application. Calls go to
//! [`crate::dispatch`].

pub mod admin;
pub mod app;
pub mod body;
pub mod endpoints;
pub mod error;
pub mod grpc;
pub mod health;
pub mod http3;
pub mod models;
pub mod repository;
pub mod respond;
pub mod routes;
pub mod server;
pub mod state;
pub mod statistics;
mod unread;
