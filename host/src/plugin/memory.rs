//! Plugin linear memory, bounded per instance and node-wide.

use crate::plugin::stopped::Stopped;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The node-wide budget of plugin linear memory, charged as memories grow and released when an
/// instance is dropped.
#[derive(Debug)]
pub struct NodeMemory {
    limit: usize,
    used: AtomicUsize,
}

impl NodeMemory {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> NodeMemory {
        NodeMemory {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One instance's memory: every linear memory of the component counts against one cap, and
/// against the node's budget.
pub struct MemoryBudget {
    node: Arc<NodeMemory>,
    cap: usize,
    used: usize,
}

impl MemoryBudget {
    pub(crate) fn new(node: Arc<NodeMemory>, cap: usize) -> MemoryBudget {
        MemoryBudget { node, cap, used: 0 }
    }

    /// Bytes of linear memory this instance holds.
    pub fn used(&self) -> usize {
        self.used
    }
}

impl wasmtime::ResourceLimiter for MemoryBudget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current);
        if self.used.saturating_add(more) > self.cap {
            return Err(wasmtime::Error::new(Stopped::new(
                "memory",
                format!("tried to grow its memory past the {} byte cap", self.cap),
            )));
        }
        if !self.node.try_charge(more) {
            return Err(wasmtime::Error::new(Stopped::new(
                "node-memory",
                "the node's plugin memory budget is spent",
            )));
        }
        self.used += more;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Table sizes are bounded by the pooling allocator's slots.
        Ok(true)
    }
}

impl Drop for MemoryBudget {
    fn drop(&mut self) {
        self.node.release(self.used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_budget_refuses_growth_past_its_limit_and_takes_back_what_instances_release() {
        let node = Arc::new(NodeMemory::new(100));
        let mut a = MemoryBudget::new(node.clone(), 80);
        let mut b = MemoryBudget::new(node.clone(), 80);
        use wasmtime::ResourceLimiter;
        assert!(a.memory_growing(0, 60, None).unwrap());
        // b's own cap allows 50 more, the node does not.
        let err = b.memory_growing(0, 50, None).unwrap_err();
        assert_eq!(err.downcast_ref::<Stopped>().unwrap().kind, "node-memory");
        // a's cap counts every memory of the instance together.
        let err = a.memory_growing(0, 30, None).unwrap_err();
        assert_eq!(err.downcast_ref::<Stopped>().unwrap().kind, "memory");
        drop(a);
        assert_eq!(node.used(), 0);
        assert!(b.memory_growing(0, 50, None).unwrap());
        assert_eq!(node.used(), 50);
    }
}
