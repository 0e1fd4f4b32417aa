//! Models: their config, their place on disk, their signature and their ONNX Runtime sessions.

pub mod config;
pub mod repository;
pub mod session;
pub mod signature;
pub mod tuning;
