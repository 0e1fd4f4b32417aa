//! What the plugins of one node share while they run: the wasmtime engine, the node-wide
//! instance slots and memory budget, metrics, and the per-call settings of the node's config.
//! Loading (compiling, linking, the compile cache) is [`crate::plugin::runtime`]'s; this is
//! the part a running plugin needs, so instances depend on it and not on the loader.

use crate::metrics::Metrics;
use crate::plugin::epoch::EpochTicker;
use crate::plugin::memory::NodeMemory;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::Engine;

/// A plugin's pool of idle instances, which can give one up so another plugin gets its slot.
pub(crate) trait IdlePool: Send + Sync {
    /// Drops one idle instance; true if there was one.
    fn release_idle(&self) -> bool;
}

/// Shared by every plugin of a node.
pub(crate) struct PluginNode {
    pub(crate) engine: Engine,
    /// Advances the engine's epoch while guest code runs.
    pub(crate) ticker: EpochTicker,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) memory: Arc<NodeMemory>,
    /// A call running longer than this yields between epochs, so it cannot hog its thread.
    pub(crate) long_call_after: Duration,
    /// Whether fuel metering is on (plugins may then set a fuel budget).
    pub(crate) fuel: bool,
    /// One permit per pooling-allocator slot, held by every live instance.
    slots: Arc<Semaphore>,
    /// Every loaded plugin's pool, so an idle instance of one can give its slot to another.
    pools: Mutex<Vec<Weak<dyn IdlePool>>>,
}

impl PluginNode {
    pub(crate) fn new(
        engine: Engine,
        ticker: EpochTicker,
        metrics: Arc<Metrics>,
        memory: NodeMemory,
        slots: usize,
        long_call_after: Duration,
        fuel: bool,
    ) -> PluginNode {
        PluginNode {
            engine,
            ticker,
            metrics,
            memory: Arc::new(memory),
            long_call_after,
            fuel,
            slots: Arc::new(Semaphore::new(slots)),
            pools: Mutex::new(Vec::new()),
        }
    }

    /// Lets `pool` give up idle instances when another plugin needs a slot.
    pub(crate) fn register_pool(&self, pool: Weak<dyn IdlePool>) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|pool| pool.strong_count() > 0);
        pools.push(pool);
    }

    /// A node-wide instance slot: free now, or freed by dropping another plugin's idle
    /// instance, or within `wait`.
    pub(crate) async fn instance_slot(&self, wait: Duration) -> Result<OwnedSemaphorePermit, ()> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let pools: Vec<Arc<dyn IdlePool>> = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for pool in pools {
            if pool.release_idle() {
                break;
            }
        }
        match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(()),
        }
    }
}
