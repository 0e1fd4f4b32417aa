//! `meshserve/1`, the mesh's wire protocol: postcard-encoded [`message::Message`]s in
//! versioned, length-limited frames ([`frame`]), one bidirectional QUIC stream per request.
//! Sans-IO: this module turns bytes into messages and back; `transport` moves the bytes.

pub mod frame;
pub mod message;

pub use frame::{WIRE_VERSION, WireError, decode, encode, encode_vectored};
pub use message::*;
