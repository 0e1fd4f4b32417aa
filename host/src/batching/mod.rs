//! Dynamic batching: the pure decision logic ([`policy`]), the byte-level stacking of
//! tensors ([`stack`]), and the worker threads that run batches ([`scheduler`]).

pub mod policy;
pub mod scheduler;
pub mod stack;
