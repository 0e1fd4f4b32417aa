//! Dynamic batching: the pure decision logic ([`policy`]), the byte-level stacking of
//! tensors ([`stack`]), the worker threads that run batches ([`scheduler`]), and whether
//! requests crowd the front door enough to go to them even when a session is idle
//! ([`arrivals`]), and how an idle worker waits for its next job ([`idle`]).

pub mod arrivals;
pub mod idle;
pub mod policy;
pub mod scheduler;
pub mod stack;
