//! The route table both clients keep: what each answer's route hint says about where a model
//! lives, and which replica (or seed) to try next, by power of two choices.

use crate::routing::balance::{Balancer, Pending};
use crate::routing::replicas::Targets;
use crate::wire::{Replica, RouteHint};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::time::Instant;

/// Which of a replica's addresses a client speaks to (`meshserve/1` or HTTP/3).
pub(crate) type AddressOf = fn(&Replica) -> Option<SocketAddr>;

/// Routes by model, and the latency and load seen per node.
pub(crate) struct RouteBook {
    routes: RwLock<HashMap<String, RouteHint>>,
    balancer: Balancer,
    address_of: AddressOf,
}

impl RouteBook {
    pub(crate) fn new(address_of: AddressOf) -> RouteBook {
        RouteBook {
            routes: RwLock::default(),
            balancer: Balancer::default(),
            address_of,
        }
    }

    pub(crate) fn route(&self, model: &str) -> Option<RouteHint> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .cloned()
    }

    /// Takes a route hint from an answer, replacing an older or different one.
    pub(crate) fn learn(&self, hint: Option<RouteHint>) {
        let Some(hint) = hint else { return };
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let stale = routes
            .get(&hint.model)
            .is_none_or(|held| held.epoch != hint.epoch || held.replicas != hint.replicas);
        if stale {
            routes.insert(hint.model.clone(), hint);
        }
    }

    /// Drops the replica at `addr` from `model`'s route (unreachable, or no longer serving).
    pub(crate) fn forget(&self, model: &str, addr: SocketAddr) {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(route) = routes.get_mut(model) {
            route
                .replicas
                .retain(|r| (self.address_of)(r) != Some(addr));
            if route.replicas.is_empty() {
                routes.remove(model);
            }
        }
    }

    /// A replica of `model` not yet tried, by p2c; else a seed not yet tried. Returns the key
    /// the balancer knows it by and its address.
    pub(crate) fn target(
        &self,
        model: &str,
        tried: &[SocketAddr],
        seeds: &[SocketAddr],
    ) -> Option<(String, SocketAddr)> {
        if let Some(route) = self.route(model) {
            let fresh: Vec<(&str, SocketAddr)> = route
                .replicas
                .iter()
                .filter_map(|r| (self.address_of)(r).map(|addr| (r.node.as_str(), addr)))
                .filter(|(_, addr)| !tried.contains(addr))
                .collect();
            let names: Vec<&str> = fresh.iter().map(|(node, _)| *node).collect();
            if let Some(node) = self.balancer.pick(&names, Instant::now())
                && let Some((node, addr)) = fresh.iter().find(|(n, _)| *n == node)
            {
                return Some((node.to_string(), *addr));
            }
        }
        seeds
            .iter()
            .find(|s| !tried.contains(s))
            .map(|s| (s.to_string(), *s))
    }

    /// The targets of one request for `model`: its replicas by p2c, then the seeds, each once.
    pub(crate) fn targets<'a>(
        &'a self,
        model: &'a str,
        seeds: &'a [SocketAddr],
    ) -> BookTargets<'a> {
        BookTargets {
            book: self,
            model,
            seeds,
            tried: Vec::new(),
        }
    }

    /// A request to `key` starts; finish the guard with its outcome.
    pub(crate) fn start(&self, key: &str, now: Instant) -> Pending<'_> {
        self.balancer.start(key, now)
    }
}

/// The targets of one request, from a [`RouteBook`]: the balancer's key and the address.
pub(crate) struct BookTargets<'a> {
    book: &'a RouteBook,
    model: &'a str,
    seeds: &'a [SocketAddr],
    tried: Vec<SocketAddr>,
}

impl Targets for BookTargets<'_> {
    type Target = (String, SocketAddr);

    fn next(&mut self) -> Option<(String, SocketAddr)> {
        let target = self.book.target(self.model, &self.tried, self.seeds)?;
        self.tried.push(target.1);
        Some(target)
    }

    fn another(&self) -> bool {
        self.book
            .target(self.model, &self.tried, self.seeds)
            .is_some()
    }
}
