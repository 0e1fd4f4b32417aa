//! Node adverts as foca custom broadcasts: the newest advert of each node wins, and foca stops
//! spreading one as soon as a newer one of the same node arrives.

use crate::wire::NodeAdvert;
use foca::{BroadcastHandler, Invalidates};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The newest advert of every node heard from.
#[derive(Debug, Default)]
pub(crate) struct AdvertTable {
    by_node: HashMap<String, NodeAdvert>,
}

impl AdvertTable {
    pub(crate) fn get(&self, node: &str) -> Option<&NodeAdvert> {
        self.by_node.get(node)
    }

    /// Drops `node`'s advert if it is from `generation` or earlier.
    pub(crate) fn forget(&mut self, node: &str, generation: u64) {
        if self
            .by_node
            .get(node)
            .is_some_and(|a| a.generation <= generation)
        {
            self.by_node.remove(node);
        }
    }

    /// Keeps `advert` if it is newer than what we hold; says whether it was.
    pub(crate) fn offer(&mut self, advert: NodeAdvert) -> bool {
        let newer = self.by_node.get(&advert.node).is_none_or(|held| {
            (advert.generation, advert.sequence) > (held.generation, held.sequence)
        });
        if newer {
            self.by_node.insert(advert.node.clone(), advert);
        }
        newer
    }
}

/// Which advert a broadcast carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdvertKey {
    node: String,
    version: (u64, u64),
}

impl Invalidates for AdvertKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && self.version >= other.version
    }
}

/// Decodes adverts for foca and keeps the newest in the shared table.
pub(crate) struct AdvertHandler {
    table: Arc<Mutex<AdvertTable>>,
}

impl AdvertHandler {
    pub(crate) fn new(table: Arc<Mutex<AdvertTable>>) -> AdvertHandler {
        AdvertHandler { table }
    }
}

/// An advert that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("malformed node advert: {0}")]
pub(crate) struct AdvertError(String);

impl<T> BroadcastHandler<T> for AdvertHandler {
    type Key = AdvertKey;
    type Error = AdvertError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&T>,
    ) -> Result<Option<AdvertKey>, AdvertError> {
        let advert: NodeAdvert =
            postcard::from_bytes(data).map_err(|e| AdvertError(e.to_string()))?;
        let key = AdvertKey {
            node: advert.node.clone(),
            version: (advert.generation, advert.sequence),
        };
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        Ok(table.offer(advert).then_some(key))
    }
}
