//! Dynamic batching: the pure decision logic ([`policy`]), the byte-level stacking of
//! tensors ([`stack`]), the worker threads that run batches ([`scheduler`]), and whether
//! requests crowd the front door enough to go to them even when a session is idle
//! ([`arrivals`]).

pub mod arrivals;
pub mod policy;
pub mod scheduler;
pub mod stack;
