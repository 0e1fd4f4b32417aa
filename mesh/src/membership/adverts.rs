//! Node adverts as foca custom broadcasts: the newest advert of each node wins, and foca stops
//! spreading one as soon as a newer one of the same node arrives.

use crate::wire::NodeAdvert;
use foca::{BroadcastHandler, Invalidates};
use meshserve_host::model::repository::Repository;
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

/// Longest node name an advert may carry.
const MAX_NODE_NAME: usize = 128;

/// Whether `name` can name a node: what peers accept in adverts (and `meshserve certs` in
/// certificate names).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Refuses an advert whose names could reach outside a model repository or grow without bound:
/// model names end up in paths (fetch, install) and node names in logs and headers.
fn check(advert: &NodeAdvert) -> Result<(), AdvertError> {
    if !valid_node_name(&advert.node) {
        return Err(AdvertError(format!("invalid node name {:?}", advert.node)));
    }
    let models = advert
        .catalog
        .iter()
        .map(|entry| entry.model.as_str())
        .chain(advert.serving.iter().map(String::as_str));
    for model in models {
        Repository::check_name(model)
            .map_err(|e| AdvertError(format!("from node '{}': {e}", advert.node)))?;
    }
    Ok(())
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
        check(&advert)?;
        let key = AdvertKey {
            node: advert.node.clone(),
            version: (advert.generation, advert.sequence),
        };
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        Ok(table.offer(advert).then_some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::CatalogEntry;

    fn advert(node: &str, model: &str) -> Vec<u8> {
        let advert = NodeAdvert {
            node: node.into(),
            generation: 1,
            sequence: 1,
            quic: "127.0.0.1:7000".parse().unwrap(),
            http: "127.0.0.1:8000".parse().unwrap(),
            http3: None,
            catalog: vec![CatalogEntry {
                model: model.into(),
                replicas: 1,
                digest: [1; 32],
                bytes: 10,
            }],
            serving: vec![],
            queue_depth: 0,
            ewma_latency_us: 0,
        };
        postcard::to_allocvec(&advert).unwrap()
    }

    #[test]
    fn adverts_naming_paths_or_odd_nodes_are_refused_and_not_kept() {
        let table = Arc::new(Mutex::new(AdvertTable::default()));
        let mut handler = AdvertHandler::new(table.clone());
        let mut receive =
            |bytes: &[u8]| BroadcastHandler::<()>::receive_item(&mut handler, bytes, None);
        for (node, model) in [
            ("evil", "../../x"),
            ("evil", "/etc"),
            ("evil", "a/b"),
            ("evil", ".."),
            ("evil", ""),
            ("../evil", "fraud"),
            ("", "fraud"),
        ] {
            assert!(receive(&advert(node, model)).is_err(), "{node} / {model}");
        }
        let long = "n".repeat(MAX_NODE_NAME + 1);
        assert!(receive(&advert(&long, "fraud")).is_err());
        assert!(table.lock().unwrap().by_node.is_empty());
        assert!(receive(&advert("b", "fraud")).unwrap().is_some());
        assert!(table.lock().unwrap().get("b").is_some());
    }
}
