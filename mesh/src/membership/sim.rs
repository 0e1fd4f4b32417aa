//! A deterministic simulation of many membership cores on virtual time: no sockets, no clock,
//! packets delivered after a seeded random latency. It measures what the real mesh relies on:
//! how long a mesh takes to converge after nodes join, how long a crash takes to be detected
//! everywhere, and how much placement moves when a node joins.

use crate::membership::{AdvertFetch, DetectorConfig, LiveMember, MemberId, Membership};
use crate::placement;
use crate::wire::{CatalogEntry, NodeAdvert};
use foca::Timer;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use std::time::Duration;

/// How often every simulated node re-publishes its advert, as the real node does.
const ADVERT_PERIOD: Duration = Duration::from_secs(1);

/// Models in every simulated node's catalog: a large repository, so adverts are far larger
/// than a membership datagram, as real ones are.
pub const CATALOG_MODELS: usize = 200;

enum Event {
    Deliver {
        to: usize,
        from: usize,
        packet: Vec<u8>,
    },
    /// The answer to `node`'s fetch reaches it (read from the target when it arrives).
    Fetched {
        node: usize,
        fetch: AdvertFetch,
    },
    Timer {
        node: usize,
        timer: Timer<MemberId>,
    },
    Advertise {
        node: usize,
    },
}

struct Node {
    core: Membership,
    up: bool,
}

/// Many membership cores exchanging packets on virtual time.
pub struct Simulation {
    now: Duration,
    sequence: u64,
    rng: u64,
    detector: DetectorConfig,
    catalog: Vec<CatalogEntry>,
    nodes: Vec<Option<Node>>,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: std::collections::HashMap<u64, Event>,
}

fn addr_of(index: usize) -> SocketAddr {
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    SocketAddr::from(([10, 0, (index >> 8) as u8, index as u8], 7000))
}

fn index_of(addr: SocketAddr) -> Option<usize> {
    match addr {
        SocketAddr::V4(v4) => {
            let [_, _, high, low] = v4.ip().octets();
            Some((usize::from(high) << 8) | usize::from(low))
        }
        SocketAddr::V6(_) => None,
    }
}

/// The name of simulated node `index`.
pub fn node_name(index: usize) -> String {
    format!("node-{index:03}")
}

impl Simulation {
    /// An empty simulation whose nodes are configured as real nodes are.
    pub fn new(detector: DetectorConfig, seed: u64) -> Simulation {
        Simulation {
            now: Duration::ZERO,
            sequence: 0,
            rng: seed | 1,
            detector,
            catalog: (0..CATALOG_MODELS)
                .map(|i| CatalogEntry {
                    model: format!("model-{i:04}"),
                    replicas: 2,
                    digest: [1; 32],
                    bytes: 1 << 20,
                    scaling: None,
                })
                .collect(),
            nodes: Vec::new(),
            queue: BinaryHeap::new(),
            events: std::collections::HashMap::new(),
        }
    }

    /// Virtual time elapsed.
    pub fn now(&self) -> Duration {
        self.now
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.sequence += 1;
        self.queue.push(Reverse((self.now + after, self.sequence)));
        self.events.insert(self.sequence, event);
    }

    /// Starts node `index` (a new one, or a restart with a later generation) and has it join
    /// through `seed`.
    pub fn start(&mut self, index: usize, seed: Option<usize>) {
        if self.nodes.len() <= index {
            self.nodes.resize_with(index + 1, || None);
        }
        let generation = self.now.as_millis() as u64 + 1;
        let id = MemberId {
            name: node_name(index),
            addr: addr_of(index),
            generation,
        };
        let rng_seed = self.random();
        let mut core = Membership::new(id, self.detector, rng_seed);
        if let Some(seed) = seed {
            let _ = core.join(addr_of(seed));
        }
        self.nodes[index] = Some(Node { core, up: true });
        self.advertise(index);
        self.flush(index);
    }

    /// Stops node `index` without a goodbye, as `kill -9` would.
    pub fn crash(&mut self, index: usize) {
        if let Some(Some(node)) = self.nodes.get_mut(index) {
            node.up = false;
        }
    }

    fn advertise(&mut self, index: usize) {
        let Some(Some(node)) = self.nodes.get_mut(index) else {
            return;
        };
        let id = node.core.id().clone();
        let now = self.now;
        let _ = node.core.advertise(
            NodeAdvert {
                generation: id.generation,
                catalog: self.catalog.clone(),
                ..NodeAdvert::empty(&id.name, id.addr)
            },
            now,
        );
        self.schedule(ADVERT_PERIOD, Event::Advertise { node: index });
    }

    // Turns what a core asked for into scheduled events.
    fn flush(&mut self, index: usize) {
        let Some(Some(node)) = self.nodes.get_mut(index) else {
            return;
        };
        let outbox = node.core.drain();
        for (to, packet) in outbox.packets {
            if let Some(to) = index_of(to) {
                let latency = self.latency();
                self.schedule(
                    latency,
                    Event::Deliver {
                        to,
                        from: index,
                        packet,
                    },
                );
            }
        }
        for fetch in outbox.fetches {
            let round_trip = self.latency() + self.latency();
            self.schedule(round_trip, Event::Fetched { node: index, fetch });
        }
        for (after, timer) in outbox.timers {
            self.schedule(after, Event::Timer { node: index, timer });
        }
    }

    /// 100 µs to 1 ms one way: a data-centre network with some jitter.
    fn latency(&mut self) -> Duration {
        Duration::from_micros(100 + self.random() % 900)
    }

    /// A running node's current advert, as a fetch reads it; in the simulation every node's
    /// certificate names it, so the answer is certified as `node_name(index)`.
    fn advert_at(&self, addr: SocketAddr) -> Result<(String, NodeAdvert), String> {
        let index = index_of(addr).ok_or("not a simulated address")?;
        match self.nodes.get(index) {
            Some(Some(node)) if node.up => node
                .core
                .own_advert()
                .cloned()
                .map(|advert| (node_name(index), advert))
                .ok_or_else(|| "no advert yet".to_string()),
            _ => Err(format!("{addr} does not answer")),
        }
    }

    /// Has node `from` send node `to` a SWIM ping that reports node `about` down, at the
    /// incarnation `from` knows it by: what a member with a valid node certificate can say
    /// about another, to see that it does not count for more than suspicion.
    pub fn report_down(&mut self, from: usize, to: usize, about: usize) {
        let (Some(Some(sender)), Some(Some(receiver)), Some(Some(subject))) = (
            self.nodes.get(from),
            self.nodes.get(to),
            self.nodes.get(about),
        ) else {
            return;
        };
        let subject = subject.core.id().clone();
        let incarnation = sender.core.known_incarnation(&subject).unwrap_or_default();
        let packet = super::swim_packet(
            sender.core.id(),
            receiver.core.id(),
            &[foca::Member::new(subject, incarnation, foca::State::Down)],
        );
        let latency = self.latency();
        self.schedule(latency, Event::Deliver { to, from, packet });
    }

    /// The generation node `index` runs as now (it grows when the node rejoins).
    pub fn generation(&self, index: usize) -> Option<u64> {
        match self.nodes.get(index) {
            Some(Some(node)) => Some(node.core.id().generation),
            _ => None,
        }
    }

    /// Runs events until virtual time `until`.
    pub fn run_until(&mut self, until: Duration) {
        while let Some(Reverse((at, sequence))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at;
            let Some(event) = self.events.remove(&sequence) else {
                continue;
            };
            let index = match &event {
                Event::Deliver { to, .. } => *to,
                Event::Fetched { node, .. }
                | Event::Timer { node, .. }
                | Event::Advertise { node } => *node,
            };
            let up = matches!(self.nodes.get(index), Some(Some(node)) if node.up);
            if !up {
                continue;
            }
            match event {
                Event::Deliver { from, packet, .. } => {
                    if let Some(Some(node)) = self.nodes.get_mut(index) {
                        let _ = node.core.handle_packet(&node_name(from), &packet);
                    }
                }
                Event::Fetched { fetch, .. } => {
                    let answer = self.advert_at(fetch.addr);
                    let (certified, answer) = match answer {
                        Ok((certified, advert)) => (certified, Ok(advert)),
                        Err(e) => (String::new(), Err(e)),
                    };
                    if let Some(Some(node)) = self.nodes.get_mut(index) {
                        let _ = node.core.advert_fetched(&fetch, &certified, answer);
                    }
                }
                Event::Timer { timer, .. } => {
                    if let Some(Some(node)) = self.nodes.get_mut(index) {
                        let _ = node.core.handle_timer(timer);
                    }
                }
                Event::Advertise { .. } => self.advertise(index),
            }
            self.flush(index);
        }
        self.now = until;
    }

    /// Runs until `done` holds (checked every `step`) or `limit` passes; the time it took.
    pub fn run_until_true(
        &mut self,
        step: Duration,
        limit: Duration,
        mut done: impl FnMut(&Simulation) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        while self.now - start < limit {
            if done(self) {
                return Some(self.now - start);
            }
            let next = self.now + step;
            self.run_until(next);
        }
        done(self).then(|| self.now - start)
    }

    fn up_nodes(&self) -> impl Iterator<Item = (usize, &Membership)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| match n {
            Some(node) if node.up => Some((i, &node.core)),
            _ => None,
        })
    }

    /// Whether every running node sees exactly the running nodes, each with its whole advert.
    pub fn converged(&self) -> bool {
        let running: BTreeSet<String> = self.up_nodes().map(|(i, _)| node_name(i)).collect();
        self.up_nodes().all(|(_, core)| {
            core.members().count() == running.len()
                && core.members().all(|(id, _, advert)| {
                    running.contains(&id.name)
                        && advert.is_some_and(|a| a.catalog.len() == CATALOG_MODELS)
                })
        })
    }

    /// Whether no running node still counts `index` as a live member.
    pub fn everyone_dropped(&self, index: usize) -> bool {
        let name = node_name(index);
        self.up_nodes()
            .all(|(_, core)| core.members().all(|(id, _, _)| id.name != name))
    }

    /// What node `index` sees.
    pub fn view(&self, index: usize) -> Vec<LiveMember> {
        match self.nodes.get(index) {
            Some(Some(node)) => node.core.live_members(),
            _ => Vec::new(),
        }
    }
}

/// What one simulated run measured.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// Nodes in the mesh.
    pub nodes: usize,
    /// From every node announcing itself to one seed until all see all, adverts included.
    pub join_convergence: Option<Duration>,
    /// From a crash until some node declares it down.
    pub crash_first_detected: Option<Duration>,
    /// From a crash until no running node counts it live.
    pub crash_detected_everywhere: Option<Duration>,
    /// From the crashed node's restart until the mesh has converged again.
    pub rejoin_convergence: Option<Duration>,
    /// Fraction of (model, replica) assignments that moved when one node joined.
    pub moved_on_join: f64,
    /// The ideal fraction for that join: 1 / (nodes + 1).
    pub ideal_moved_on_join: f64,
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<Duration>| {
            d.map_or("did not happen".to_string(), |d| {
                format!("{:.0} ms", d.as_secs_f64() * 1e3)
            })
        };
        writeln!(
            f,
            "membership simulation, {} nodes, virtual time:",
            self.nodes
        )?;
        writeln!(
            f,
            "  join convergence (all join via one seed): {} (checked every 10 ms)",
            ms(self.join_convergence)
        )?;
        writeln!(
            f,
            "  crash: first detected {}, dropped by every node {}",
            ms(self.crash_first_detected),
            ms(self.crash_detected_everywhere)
        )?;
        writeln!(
            f,
            "  restart of the crashed node until converged: {}",
            ms(self.rejoin_convergence)
        )?;
        writeln!(
            f,
            "  placement moved on one join: {:.4} of assignments (ideal 1/(N+1) = {:.4})",
            self.moved_on_join, self.ideal_moved_on_join
        )
    }
}

/// Runs the standard scenario on `nodes` nodes: all join through node 0, node `nodes / 2`
/// crashes and later restarts, then one more node joins.
pub fn run_scenario(nodes: usize, detector: DetectorConfig, seed: u64) -> SimReport {
    let limit = Duration::from_secs(120);
    let step = Duration::from_millis(10);
    let mut sim = Simulation::new(detector, seed);
    sim.start(0, None);
    for i in 1..nodes {
        sim.start(i, Some(0));
    }
    let join_convergence = sim.run_until_true(step, limit, Simulation::converged);

    let victim = nodes / 2;
    let victim_name = node_name(victim);
    sim.crash(victim);
    let crash_first_detected = sim.run_until_true(step, limit, |s| {
        s.up_nodes()
            .any(|(_, core)| core.members().all(|(id, _, _)| id.name != victim_name))
    });
    let crash_detected_everywhere = crash_first_detected.and_then(|first| {
        sim.run_until_true(step, limit, |s| s.everyone_dropped(victim))
            .map(|rest| first + rest)
    });

    sim.start(victim, Some(0));
    let rejoin_convergence = sim.run_until_true(step, limit, Simulation::converged);

    let models: Vec<String> = (0..2000).map(|i| format!("model-{i}")).collect();
    let names =
        |view: &[LiveMember]| -> Vec<String> { view.iter().map(|m| m.id.name.clone()).collect() };
    let before = names(&sim.view(0));
    sim.start(nodes, Some(0));
    let _ = sim.run_until_true(step, limit, Simulation::converged);
    let after = names(&sim.view(0));
    let moved = placement::moved_fraction(&models, &before, &after, 2);
    SimReport {
        nodes,
        join_convergence,
        crash_first_detected,
        crash_detected_everywhere,
        rejoin_convergence,
        moved_on_join: moved,
        ideal_moved_on_join: 1.0 / (before.len() + 1) as f64,
    }
}
