//! Placement: which nodes host a model, computed from membership alone.
//!
//! Rendezvous (highest random weight) hashing, after Thaler and Ravishankar, "Using
//! Name-Based Mappings to Increase Hit Rates" (1998): every node scores every model with a
//! hash of the pair, and a model's replicas are its `replicas` highest-scoring eligible nodes.
//! Every node computes the same answer from the same member list with no coordinator, and a
//! node joining or leaving moves only the models whose top set it enters or leaves: about
//! `replicas / N` of all assignments. Pure functions; no I/O, no clock.

pub mod scale;
pub mod sim;

use crate::wire::{
    CatalogEntry, EndpointEntry, NodeAdvert, Replica, RouteHint, RouteTable, Scaling,
};
use std::collections::{BTreeMap, BTreeSet};

/// Whose model repositories are authoritative for the mesh (`mesh.publishers`): only their
/// catalogs say which models exist, how many replicas each gets and which version a node
/// fetches. A member with a valid node certificate that is not a publisher can hold and serve
/// its own files, but cannot make any other node install them, widen or narrow a model's
/// placement, or take a replica slot while it holds another version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Publishers {
    /// Every member publishes (no `mesh.publishers`): any node certificate can change what
    /// others run.
    #[default]
    Anyone,
    /// Only these nodes, by the name their certificates carry.
    Only(BTreeSet<String>),
}

impl Publishers {
    /// Whether `node`'s catalog counts.
    pub fn includes(&self, node: &str) -> bool {
        match self {
            Publishers::Anyone => true,
            Publishers::Only(names) => names.contains(node),
        }
    }

    /// Whether `advert` may serve `model` as published: under [`Publishers::Only`], its
    /// catalog holds no other version of it than `published` (under `Anyone` versions are not
    /// compared: that is the open mesh it names).
    pub fn may_serve(
        &self,
        advert: &NodeAdvert,
        model: &str,
        published: Option<&[u8; 32]>,
    ) -> bool {
        *self == Publishers::Anyone
            || advert
                .catalog
                .iter()
                .all(|e| e.model != model || Some(&e.digest) == published)
    }
}

/// Each model as the publishers hold it: the first publisher's entry by name when they
/// differ.
fn published_entries<'a>(
    members: &[&'a NodeAdvert],
    publishers: &Publishers,
) -> BTreeMap<&'a str, &'a CatalogEntry> {
    let mut published = BTreeMap::new();
    for advert in publishers_by_name(members, publishers) {
        for entry in &advert.catalog {
            published.entry(entry.model.as_str()).or_insert(entry);
        }
    }
    published
}

/// The version of each model the publishers hold: the first publisher's by name when they
/// differ.
pub fn published_digests(
    members: &[&NodeAdvert],
    publishers: &Publishers,
) -> BTreeMap<String, [u8; 32]> {
    published_entries(members, publishers)
        .into_iter()
        .map(|(model, entry)| (model.to_string(), entry.digest))
        .collect()
}

/// The models whose replica count follows load, with their bounds: as the first publisher
/// by name holds them.
pub fn published_scaling(
    members: &[&NodeAdvert],
    publishers: &Publishers,
) -> BTreeMap<String, Scaling> {
    published_entries(members, publishers)
        .into_iter()
        .filter_map(|(model, entry)| Some((model.to_string(), entry.scaling?)))
        .collect()
}

/// The publishers' adverts, first by name: whose version counts when they differ.
fn publishers_by_name<'a>(
    members: &[&'a NodeAdvert],
    publishers: &Publishers,
) -> Vec<&'a NodeAdvert> {
    let mut by_name: Vec<&NodeAdvert> = members
        .iter()
        .copied()
        .filter(|a| publishers.includes(&a.node))
        .collect();
    by_name.sort_by(|a, b| a.node.cmp(&b.node));
    by_name
}

/// The version of each endpoint the publishers hold (the first publisher's by name when they
/// differ). An endpoint has no placement of its own: it runs on its model's replicas, so a
/// request's tensors never leave the node that runs its plugins.
pub fn published_endpoints(
    members: &[&NodeAdvert],
    publishers: &Publishers,
) -> BTreeMap<String, EndpointEntry> {
    let mut published = BTreeMap::new();
    for advert in publishers_by_name(members, publishers) {
        for entry in &advert.endpoints {
            published
                .entry(entry.name.clone())
                .or_insert_with(|| entry.clone());
        }
    }
    published
}

/// A stable 64-bit hash of `(model, node)`: FNV-1a over both names, then the SplitMix64
/// finaliser so that similar names spread. Stable across Rust versions and platforms, unlike
/// `std`'s hasher, because every node of a mesh must compute the same scores.
pub fn score(model: &str, node: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in model.bytes().chain([0xff]).chain(node.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The `replicas` nodes that host `model`, best first, chosen among `eligible` node ids.
/// Ties (equal scores) break by node id, so the order is total and the same everywhere.
pub fn replicas<'a>(
    model: &str,
    eligible: impl IntoIterator<Item = &'a str>,
    replicas: usize,
) -> Vec<&'a str> {
    let mut scored: Vec<(u64, &'a str)> = eligible
        .into_iter()
        .map(|node| (score(model, node), node))
        .collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored
        .into_iter()
        .take(replicas)
        .map(|(_, node)| node)
        .collect()
}

/// The fraction of `(model, replica)` assignments that differ between placing `models` over
/// `before` and over `after` (node names), with `count` replicas each.
pub fn moved_fraction(models: &[String], before: &[String], after: &[String], count: usize) -> f64 {
    let mut moved = 0usize;
    let mut total = 0usize;
    for model in models {
        let old = replicas(model, before.iter().map(String::as_str), count);
        let new = replicas(model, after.iter().map(String::as_str), count);
        total += old.len();
        moved += old.iter().filter(|node| !new.contains(node)).count();
    }
    if total == 0 {
        0.0
    } else {
        moved as f64 / total as f64
    }
}

/// Where every model of the mesh goes, computed from the adverts of the live members.
///
/// The models are those the publishers hold; a model's replica count is the largest any
/// publisher asks for (0, "every node", wins over any number), except for a model whose
/// count follows load ([`scale`]): its count is `scaled`'s (this node's policy's), within the
/// first publisher's bounds (their minimum when `scaled` has none). Every live member is eligible
/// for a model (one that lacks the files fetches them from a publisher) except one that is
/// leaving (stopping: its catalog still counts while it is a member) and one that holds
/// another version of it than the publishers' (the first publisher's by name when they
/// differ). Every node that sees the same adverts, with the same publishers, computes the
/// same plan.
pub fn plan(
    members: &[&NodeAdvert],
    publishers: &Publishers,
    scaled: &BTreeMap<String, u16>,
) -> RouteTable {
    let mut wanted: BTreeMap<&str, Option<usize>> = BTreeMap::new();
    let published = published_digests(members, publishers);
    let bounds = published_scaling(members, publishers);
    for advert in members.iter().filter(|a| publishers.includes(&a.node)) {
        for entry in &advert.catalog {
            let count = (entry.replicas > 0).then_some(usize::from(entry.replicas));
            let slot = wanted.entry(entry.model.as_str()).or_insert(count);
            *slot = match (*slot, count) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
    }
    let by_name: BTreeMap<&str, &NodeAdvert> =
        members.iter().map(|a| (a.node.as_str(), *a)).collect();
    let mut applied: Vec<(&str, u16)> = Vec::new();
    let routes = wanted
        .into_iter()
        .map(|(model, count)| {
            let count = match bounds.get(model) {
                Some(bounds) => {
                    let count = scaled.get(model).copied().unwrap_or(bounds.min);
                    let count = count.clamp(bounds.min, bounds.max.max(bounds.min));
                    applied.push((model, count));
                    Some(usize::from(count))
                }
                None => count,
            };
            let digest = published.get(model);
            let eligible = members
                .iter()
                .filter(|a| {
                    !a.leaving
                        && !a.declined.iter().any(|d| d == model)
                        && publishers.may_serve(a, model, digest)
                })
                .map(|a| a.node.as_str());
            let chosen = replicas(model, eligible, count.unwrap_or(usize::MAX));
            RouteHint {
                model: model.to_string(),
                epoch: 0,
                replicas: chosen
                    .into_iter()
                    .filter_map(|node| by_name.get(node))
                    .map(|a| Replica::from(*a))
                    .collect(),
            }
        })
        .collect::<Vec<_>>();
    let mut epoch = epoch_of(members);
    if !applied.is_empty() {
        // Routes change when a count does, though no advert did.
        epoch = score(&format!("{epoch:x}{applied:?}"), "scaled");
    }
    RouteTable {
        epoch,
        routes: routes
            .into_iter()
            .map(|r| RouteHint { epoch, ..r })
            .collect(),
    }
}

/// A model whose replicas changed between two plans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The model.
    pub model: String,
    /// Its replicas before (empty: new to the mesh).
    pub from: Vec<String>,
    /// Its replicas after (empty: no member holds it any more).
    pub to: Vec<String>,
}

/// Every model whose replica set differs between `before` and `after`, by name.
pub fn moves(before: &RouteTable, after: &RouteTable) -> Vec<Move> {
    let nodes = |table: &RouteTable| -> BTreeMap<String, Vec<String>> {
        table
            .routes
            .iter()
            .map(|r| {
                let mut nodes: Vec<String> = r.replicas.iter().map(|p| p.node.clone()).collect();
                nodes.sort();
                (r.model.clone(), nodes)
            })
            .collect()
    };
    let (mut before, after) = (nodes(before), nodes(after));
    let mut moved: Vec<Move> = after
        .into_iter()
        .filter_map(|(model, to)| {
            let from = before.remove(&model).unwrap_or_default();
            (from != to).then_some(Move { model, from, to })
        })
        .collect();
    moved.extend(before.into_iter().map(|(model, from)| Move {
        model,
        from,
        to: Vec::new(),
    }));
    moved.sort_by(|a, b| a.model.cmp(&b.model));
    moved
}

/// A digest of what placement depends on (members, their generations and catalogs): equal on
/// every node that sees the same mesh, different after any change that can move a model.
pub fn epoch_of(members: &[&NodeAdvert]) -> u64 {
    let mut parts: Vec<String> = members
        .iter()
        .map(|a| {
            let catalog: Vec<String> = a
                .catalog
                .iter()
                .map(|e| format!("{}*{}", e.model, e.replicas))
                .collect();
            format!("{}@{}:{}", a.node, a.generation, catalog.join(","))
        })
        .collect();
    parts.sort();
    score(&parts.join(";"), "epoch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_name_each_model_whose_replicas_changed() {
        let replica = |node: &str| Replica {
            node: node.into(),
            quic: "127.0.0.1:1".parse().unwrap(),
            http: "127.0.0.1:2".parse().unwrap(),
            http3: None,
        };
        let table = |routes: &[(&str, &[&str])]| RouteTable {
            epoch: 0,
            routes: routes
                .iter()
                .map(|(model, nodes)| RouteHint {
                    model: model.to_string(),
                    epoch: 0,
                    replicas: nodes.iter().map(|n| replica(n)).collect(),
                })
                .collect(),
        };
        let before = table(&[("fraud", &["a", "b"]), ("heavy", &["c"]), ("old", &["a"])]);
        let after = table(&[("fraud", &["b", "a"]), ("heavy", &["a"]), ("new", &["b"])]);
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            moves(&before, &after),
            vec![
                Move {
                    model: "heavy".into(),
                    from: names(&["c"]),
                    to: names(&["a"])
                },
                Move {
                    model: "new".into(),
                    from: vec![],
                    to: names(&["b"])
                },
                Move {
                    model: "old".into(),
                    from: names(&["a"]),
                    to: vec![]
                },
            ],
            "the same replicas in another order is no move"
        );
        assert!(moves(&after, &after).is_empty());
    }
    use std::collections::BTreeSet;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i:03}")).collect()
    }

    fn placement<'a>(
        models: &[String],
        members: &'a [String],
        count: usize,
    ) -> Vec<BTreeSet<&'a str>> {
        models
            .iter()
            .map(|m| {
                replicas(m, members.iter().map(String::as_str), count)
                    .into_iter()
                    .collect()
            })
            .collect()
    }

    /// An advert of `node` holding `models` as (name, replicas, digest byte).
    fn advert(node: &str, port: u16, models: &[(&str, u16, u8)]) -> NodeAdvert {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        NodeAdvert {
            catalog: models
                .iter()
                .map(|&(model, replicas, digest)| crate::wire::CatalogEntry {
                    model: model.into(),
                    replicas,
                    digest: [digest; 32],
                    bytes: 1,
                    scaling: None,
                })
                .collect(),
            serving: models.iter().map(|m| m.0.to_string()).collect(),
            ..NodeAdvert::empty(node, addr)
        }
    }

    #[test]
    fn only_publishers_decide_what_exists_its_replica_count_and_who_may_hold_it() {
        // a publishes heavy on one replica; a member named to sort first offers its own heavy
        // (another file) on every node, and a model of its own.
        let members = [
            advert("a", 1, &[("heavy", 1, 0x01)]),
            advert("b", 2, &[]),
            advert("c", 3, &[]),
            advert("0evil", 4, &[("heavy", 0, 0x66), ("trojan", 0, 0x66)]),
        ];
        let refs: Vec<&NodeAdvert> = members.iter().collect();
        let only = Publishers::Only(["a".to_string()].into());
        let table = plan(&refs, &only, &BTreeMap::new());
        let placed: Vec<(&str, Vec<&str>)> = table
            .routes
            .iter()
            .map(|r| {
                (
                    r.model.as_str(),
                    r.replicas.iter().map(|x| x.node.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            placed.len(),
            1,
            "only the published model is placed: {placed:?}"
        );
        assert_eq!(placed[0].0, "heavy");
        assert_eq!(placed[0].1.len(), 1, "the publisher's replica count stands");
        assert_ne!(
            placed[0].1[0], "0evil",
            "a member holding another version is not eligible"
        );
        assert_eq!(
            published_digests(&refs, &only).get("heavy"),
            Some(&[0x01; 32])
        );
        // Without publishers, the open mesh: the member's 0 ("every node") wins.
        let open = plan(&refs, &Publishers::Anyone, &BTreeMap::new());
        let heavy = open.routes.iter().find(|r| r.model == "heavy").unwrap();
        assert_eq!(heavy.replicas.len(), 4);
    }

    #[test]
    fn a_scaled_model_takes_the_policys_count_within_the_first_publishers_bounds() {
        let mut a = advert("a", 1, &[("heavy", 1, 1), ("fraud", 2, 2)]);
        a.catalog[0].scaling = Some(Scaling {
            min: 1,
            max: 3,
            target_in_flight_milli: 4000,
            down_window_s: 10,
        });
        assert_eq!(a.catalog[0].model, "heavy");
        let members = [
            a,
            advert("b", 2, &[]),
            advert("c", 3, &[]),
            advert("d", 4, &[]),
        ];
        let refs: Vec<&NodeAdvert> = members.iter().collect();
        let only = Publishers::Only(["a".to_string()].into());
        let count = |scaled: &[(&str, u16)]| {
            let scaled = scaled.iter().map(|(m, c)| (m.to_string(), *c)).collect();
            let table = plan(&refs, &only, &scaled);
            let replicas = |model: &str| {
                let route = table.routes.iter().find(|r| r.model == model).unwrap();
                route.replicas.len()
            };
            (replicas("heavy"), replicas("fraud"), table.epoch)
        };
        let (heavy, fraud, at_min) = count(&[]);
        assert_eq!((heavy, fraud), (1, 2), "no decision yet: the minimum");
        let (heavy, fraud, scaled_up) = count(&[("heavy", 3), ("fraud", 4)]);
        assert_eq!(
            (heavy, fraud),
            (3, 2),
            "a fixed count ignores the policy's figure"
        );
        assert_ne!(at_min, scaled_up, "a new count is a new epoch");
        assert_eq!(count(&[("heavy", 9)]).0, 3, "at most the maximum");
        assert_eq!(
            published_scaling(&refs, &only).keys().collect::<Vec<_>>(),
            ["heavy"]
        );
    }

    #[test]
    fn a_leaving_member_is_placed_nothing_and_its_catalog_still_counts() {
        let mut a = advert("a", 1, &[("fraud", 2, 1), ("heavy", 1, 2)]);
        let members = |a: &NodeAdvert| vec![a.clone(), advert("b", 2, &[]), advert("c", 3, &[])];
        let only = Publishers::Only(["a".to_string()].into());
        let nodes = |table: &RouteTable, model: &str| -> Vec<String> {
            let route = table.routes.iter().find(|r| r.model == model).unwrap();
            route.replicas.iter().map(|r| r.node.clone()).collect()
        };
        let before = members(&a);
        let before = plan(&before.iter().collect::<Vec<_>>(), &only, &BTreeMap::new());
        a.leaving = true;
        let after = members(&a);
        let after = plan(&after.iter().collect::<Vec<_>>(), &only, &BTreeMap::new());
        for (model, count) in [("fraud", 2), ("heavy", 1)] {
            let placed = nodes(&after, model);
            assert_eq!(placed.len(), count, "{model}: {placed:?}");
            assert!(!placed.contains(&"a".to_string()), "{model}: {placed:?}");
            // Only what was on the leaving member moves.
            for node in nodes(&before, model).iter().filter(|n| *n != "a") {
                assert!(placed.contains(node), "{model}: {node} lost its replica");
            }
        }
    }

    #[test]
    fn an_endpoint_is_the_first_publishers_version_and_no_one_elses() {
        let endpoint = |digest: u8| EndpointEntry {
            name: "fraud-check".into(),
            model: "fraud".into(),
            digest: [digest; 32],
            bytes: 1,
            headers: Vec::new(),
        };
        let mut a = advert("a", 1, &[("fraud", 2, 1)]);
        a.endpoints.push(endpoint(0x0a));
        let mut b = advert("b", 2, &[]);
        b.endpoints.push(endpoint(0x0b));
        let mut evil = advert("0evil", 3, &[]);
        evil.endpoints.push(endpoint(0x66));
        let refs = [&a, &b, &evil];
        let only = Publishers::Only(["a".to_string(), "b".to_string()].into());
        let published = published_endpoints(&refs, &only);
        assert_eq!(published["fraud-check"].digest, [0x0a; 32]);
        // In the open mesh every member publishes, and the first by name wins.
        let open = published_endpoints(&refs, &Publishers::Anyone);
        assert_eq!(open["fraud-check"].digest, [0x66; 32]);
        assert!(published_endpoints(&[&evil], &only).is_empty());
    }

    #[test]
    fn the_answer_does_not_depend_on_member_order() {
        let members = nodes(10);
        let reversed: Vec<String> = members.iter().rev().cloned().collect();
        let before = replicas("fraud", members.iter().map(String::as_str), 3);
        let after = replicas("fraud", reversed.iter().map(String::as_str), 3);
        assert_eq!(before, after);
        assert_eq!(before.len(), 3);
        assert_eq!(
            before.iter().collect::<BTreeSet<_>>().len(),
            3,
            "replicas are distinct"
        );
    }

    #[test]
    fn fewer_members_than_replicas_places_on_all_of_them() {
        let members = nodes(2);
        assert_eq!(
            replicas("m", members.iter().map(String::as_str), 5).len(),
            2
        );
        assert!(replicas("m", std::iter::empty(), 2).is_empty());
    }

    #[test]
    fn scores_are_pinned_so_every_version_agrees() {
        // A changed hash would silently re-place every model of a mixed-version mesh. The
        // values were computed by an independent implementation of the same definition.
        assert_eq!(score("fraud", "node-a"), 0x5326_4209_48cd_6ca7);
        assert_eq!(score("", ""), 0x4f2d_b50f_1240_40cd);
        assert_ne!(score("fraud", "node-a"), score("node-a", "fraud"));
    }

    #[test]
    fn a_join_moves_about_replicas_over_n_of_the_assignments() {
        let models: Vec<String> = (0..2000).map(|i| format!("model-{i}")).collect();
        let members = nodes(100);
        let before = placement(&models, &members, 2);
        let mut grown = members.clone();
        grown.push("node-new".to_string());
        let after = placement(&models, &grown, 2);
        let moved: usize = before
            .iter()
            .zip(&after)
            .map(|(b, a)| b.difference(a).count())
            .sum();
        let fraction = moved as f64 / (models.len() * 2) as f64;
        // Expected 1/101 ≈ 0.0099 of assignments; allow sampling noise.
        assert!(
            (0.005..0.02).contains(&fraction),
            "moved fraction {fraction}"
        );
        // Every moved assignment went to the new node, none between old nodes.
        for (b, a) in before.iter().zip(&after) {
            for gained in a.difference(b) {
                assert_eq!(*gained, "node-new");
            }
        }
    }

    #[test]
    fn a_leave_moves_only_the_models_the_leaver_hosted() {
        let models: Vec<String> = (0..1000).map(|i| format!("model-{i}")).collect();
        let members = nodes(50);
        let before = placement(&models, &members, 3);
        let remaining: Vec<String> = members
            .iter()
            .filter(|n| *n != "node-007")
            .cloned()
            .collect();
        let after = placement(&models, &remaining, 3);
        for (b, a) in before.iter().zip(&after) {
            if b.contains("node-007") {
                assert_eq!(
                    b.intersection(a).count(),
                    2,
                    "the two survivors keep the model"
                );
            } else {
                assert_eq!(b, a, "a model the leaver did not host must not move");
            }
        }
    }

    #[test]
    fn load_spreads_evenly() {
        let models: Vec<String> = (0..5000).map(|i| format!("model-{i}")).collect();
        let members = nodes(20);
        let mut per_node = std::collections::BTreeMap::new();
        for set in placement(&models, &members, 2) {
            for node in set {
                *per_node.entry(node).or_insert(0usize) += 1;
            }
        }
        let expected = 5000.0 * 2.0 / 20.0;
        for (node, count) in per_node {
            assert!(
                (count as f64 - expected).abs() < expected * 0.2,
                "{node} hosts {count}, expected ~{expected}"
            );
        }
    }
}
