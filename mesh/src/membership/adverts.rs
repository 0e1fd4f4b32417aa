//! The adverts a node holds about its members: the newest fetched from each, and the checks
//! every advert passes before it counts.

use crate::transport::certs::valid_node_name;
use crate::wire::{AdvertNotice, NodeAdvert};
use meshserve_host::model::repository::Repository;
use std::collections::HashMap;

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

    /// The (generation, sequence) of `node`'s advert we hold.
    pub(crate) fn version(&self, node: &str) -> Option<(u64, u64)> {
        self.by_node
            .get(node)
            .map(|advert| (advert.generation, advert.sequence))
    }

    /// Takes the load figures of a notice about the advert version we hold.
    pub(crate) fn update_load(&mut self, notice: &AdvertNotice) {
        if let Some(advert) = self.by_node.get_mut(&notice.node)
            && (advert.generation, advert.sequence) == (notice.generation, notice.sequence)
        {
            advert.queue_depth = notice.queue_depth;
            advert.ewma_latency_us = notice.ewma_latency_us;
            advert.in_flight.clone_from(&notice.in_flight);
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

/// Most models one advert may list (in its catalog, and again in what it serves). Far above
/// a real repository; the frame limit bounds the bytes as well.
pub const MAX_ADVERT_MODELS: usize = 65_536;

/// Refuses an advert whose names could reach outside a model repository or grow without bound:
/// model names end up in paths (fetch, install) and node names in logs and headers.
pub(crate) fn check(advert: &NodeAdvert) -> Result<(), AdvertError> {
    if !valid_node_name(&advert.node) {
        return Err(AdvertError(format!("invalid node name {:?}", advert.node)));
    }
    if advert.catalog.len() > MAX_ADVERT_MODELS
        || advert.serving.len() > MAX_ADVERT_MODELS
        || advert.endpoints.len() > MAX_ADVERT_MODELS
        || advert.in_flight.len() > MAX_ADVERT_MODELS
        || advert.declined.len() > MAX_ADVERT_MODELS
    {
        return Err(AdvertError(format!(
            "node '{}' lists more than {MAX_ADVERT_MODELS} models or endpoints",
            advert.node
        )));
    }
    // Endpoint names are folder names too; the headers they list are only compared.
    let models = advert
        .catalog
        .iter()
        .map(|entry| entry.model.as_str())
        .chain(advert.serving.iter().map(String::as_str))
        .chain(
            advert
                .endpoints
                .iter()
                .flat_map(|e| [e.name.as_str(), e.model.as_str()]),
        );
    for model in models {
        Repository::check_name(model)
            .map_err(|e| AdvertError(format!("from node '{}': {e}", advert.node)))?;
    }
    Ok(())
}

/// An advert that breaks the rules.
#[derive(Debug, thiserror::Error)]
#[error("refused node advert: {0}")]
pub(crate) struct AdvertError(String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::certs::MAX_NODE_NAME;
    use crate::wire::CatalogEntry;

    fn advert(node: &str, models: &[&str]) -> NodeAdvert {
        NodeAdvert {
            sequence: 1,
            http: "127.0.0.1:8000".parse().unwrap(),
            catalog: models
                .iter()
                .map(|model| CatalogEntry {
                    model: model.to_string(),
                    replicas: 1,
                    digest: [1; 32],
                    bytes: 10,
                    scaling: None,
                })
                .collect(),
            ..NodeAdvert::empty(node, "127.0.0.1:7000".parse().unwrap())
        }
    }

    #[test]
    fn adverts_naming_paths_odd_nodes_or_too_many_models_are_refused() {
        for (node, model) in [
            ("evil", "../../x"),
            ("evil", "/etc"),
            ("evil", "a/b"),
            ("evil", ".."),
            ("evil", ""),
            ("../evil", "fraud"),
            ("", "fraud"),
            ("Evil", "fraud"),
            ("a..b", "fraud"),
            (".a", "fraud"),
        ] {
            assert!(check(&advert(node, &[model])).is_err(), "{node} / {model}");
        }
        let long = "n".repeat(MAX_NODE_NAME + 1);
        assert!(check(&advert(&long, &["fraud"])).is_err());
        let names: Vec<String> = (0..=MAX_ADVERT_MODELS).map(|i| format!("m{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let error = check(&advert("b", &names)).unwrap_err().to_string();
        assert!(error.contains("more than 65536 models"), "{error}");
        assert!(check(&advert("b", &names[..200])).is_ok());
        assert!(check(&advert("node-b.rack_1", &["fraud"])).is_ok());
        // Endpoint names and their models end up in paths too.
        for (name, model) in [("../x", "fraud"), ("fraud-check", "../../m"), ("", "fraud")] {
            let mut with_endpoint = advert("b", &["fraud"]);
            with_endpoint.endpoints.push(crate::wire::EndpointEntry {
                name: name.into(),
                model: model.into(),
                digest: [2; 32],
                bytes: 1,
                headers: Vec::new(),
            });
            assert!(check(&with_endpoint).is_err(), "{name} / {model}");
        }
    }
}
