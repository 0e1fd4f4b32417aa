//! The load-following replica policy of many nodes on virtual time: every node runs its own
//! [`Scaler`] over the load reports it has received, places models by rendezvous order with
//! the counts it decided, loads what it is placed (taking [`LOAD_TIME`]) and unloads what it
//! is no longer placed (after [`UNLOAD_GRACE`]), as real nodes do. Traffic per model follows
//! a scenario (steady, a step up and back, one-second spikes, a slow climb) and one node
//! dies. It measures what the policy promises: decisions per minute, how fast every node
//! reaches the count a step needs, how far apart the nodes decide, oscillations, and how fast
//! a lost node's replicas are placed again. Deterministic: same seed, same numbers.
//!
//! The load model: a model's requests arrive at `rate` per second and take [`SERVICE_TIME`]
//! on one of a replica's [`SESSIONS`]; spread evenly over the nodes serving it, each holds
//! `λS / (1 − ρ)` requests in flight (the M/M/1 shape: queues grow as utilisation ρ nears 1),
//! and a replica past saturation holds a full queue.

use super::scale::{SAMPLE_PERIOD, ScaleChange, Scaler};
use crate::wire::{ModelInFlight, NodeAdvert, Scaling};
use std::collections::BTreeMap;
use std::time::Duration;

/// Virtual time between two steps of the simulation.
const TICK: Duration = Duration::from_millis(100);

/// Time a node takes to fetch, load and warm a model it was placed.
pub const LOAD_TIME: Duration = Duration::from_secs(2);

/// Time a node keeps serving a model it is no longer placed (peers stop sending first).
pub const UNLOAD_GRACE: Duration = Duration::from_secs(3);

/// One request's run time.
const SERVICE_TIME: f64 = 0.002;

/// Requests a replica runs at once.
const SESSIONS: f64 = 2.0;

/// Requests in flight a saturated replica holds (its queue capacity).
const FULL_QUEUE: f64 = 1024.0;

/// Every simulated model's bounds: one to four replicas, one request in flight each (half
/// of a replica's capacity), down after 30 s.
const SCALING: Scaling = Scaling {
    min: 1,
    max: 4,
    target_in_flight_milli: 1000,
    down_window_s: 30,
};

/// When the step models step up and back down, the drift models climb, and a node dies.
const STEP_UP_S: f64 = 40.0;
const STEP_DOWN_S: f64 = 100.0;
const DRIFT_S: (f64, f64) = (20.0, 170.0);
const NODE_LOSS_S: f64 = 150.0;
const END_S: f64 = 175.0;

/// What one model's traffic does over the scenario.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Traffic {
    /// The same rate throughout.
    Steady(f64),
    /// 300/s, 2,500/s from [`STEP_UP_S`] to [`STEP_DOWN_S`].
    Step,
    /// 200/s, and 15 times that for one second from the given time.
    Spike(f64),
    /// From 200/s to 2,000/s over [`DRIFT_S`].
    Drift,
}

impl Traffic {
    fn rate(self, t: f64) -> f64 {
        match self {
            Traffic::Steady(rate) => rate,
            Traffic::Step if (STEP_UP_S..STEP_DOWN_S).contains(&t) => 2500.0,
            Traffic::Step => 300.0,
            Traffic::Spike(at) if (at..at + 1.0).contains(&t) => 3000.0,
            Traffic::Spike(_) => 200.0,
            Traffic::Drift => {
                let f = ((t - DRIFT_S.0) / (DRIFT_S.1 - DRIFT_S.0)).clamp(0.0, 1.0);
                200.0 + f * 1800.0
            }
        }
    }
}

/// Whether a node serves a model, and since when.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Serving {
    No,
    /// Placed here; serving from the given time.
    Loading(f64),
    Yes,
    /// Not placed here any more since the given time; serving until the grace is over.
    Leaving(f64),
}

impl Serving {
    fn serves(self) -> bool {
        matches!(self, Serving::Yes | Serving::Leaving(_))
    }
}

struct Node {
    name: String,
    alive: bool,
    /// When in each sample period it samples and publishes (in ticks).
    phase: u32,
    scaler: Scaler,
    /// The count its scaler decided, per model.
    counts: Vec<u16>,
    serving: Vec<Serving>,
    /// Requests in flight per model averaged over this period's ticks so far.
    busy: Vec<f64>,
    /// Changes decided here, with their time.
    changes: Vec<(f64, ScaleChange)>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct ScaleReport {
    /// Nodes in the mesh.
    pub nodes: usize,
    /// Models, all load-following.
    pub models: usize,
    /// Virtual time simulated.
    pub duration: Duration,
    /// Count changes one node decided per minute, over every model (each node decides every
    /// change for itself, so the mesh's count changes are about this many too).
    pub decisions_per_minute: f64,
    /// After the step up, until the first node decided more replicas (the slowest model).
    pub step_first_decision: Duration,
    /// After the step up, until every node had decided the count the step needs (the slowest
    /// model); `None` if some node never did.
    pub step_all_decided: Option<Duration>,
    /// The widest gap between the first and the last node deciding a step model's count.
    pub step_spread: Duration,
    /// After the step down, until every node was back to the minimum (the slowest model).
    pub step_back_all: Option<Duration>,
    /// Models whose count went one way, back, and that way again on some node (the drift
    /// and steady models must have none, nor must the step models within one phase).
    pub oscillations: usize,
    /// Changes of steady models (which must have none).
    pub steady_changes: usize,
    /// Spike models whose count changed (a one-second spike may span two samples).
    pub spikes_followed: usize,
    /// After a node died, until every node's plan had placed its models elsewhere.
    pub loss_replaced: Option<Duration>,
    /// After a node died, until every model it served was served by its count of nodes again.
    pub loss_served: Option<Duration>,
    /// The failure-detection time the run assumed.
    pub failure_detection: Duration,
}

impl std::fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |d: Option<Duration>| {
            d.map_or("never".to_string(), |d| format!("{:.1} s", d.as_secs_f64()))
        };
        writeln!(
            f,
            "replica policy simulation, {} nodes, {} load-following models, {:.0} s of virtual time:",
            self.nodes,
            self.models,
            self.duration.as_secs_f64()
        )?;
        writeln!(
            f,
            "  decisions: {:.1} count changes per minute on each node, over {} models",
            self.decisions_per_minute, self.models
        )?;
        writeln!(
            f,
            "  step up (300 -> 2,500 req/s): first node decided after {}, every node after {}, nodes at most {} apart",
            s(Some(self.step_first_decision)),
            s(self.step_all_decided),
            s(Some(self.step_spread))
        )?;
        writeln!(
            f,
            "  step down: every node back at the minimum after {} (stable window {} s)",
            s(self.step_back_all),
            SCALING.down_window_s
        )?;
        writeln!(
            f,
            "  oscillations: {}; changes of steady models: {}; one-second spikes followed: {}",
            self.oscillations, self.steady_changes, self.spikes_followed
        )?;
        writeln!(
            f,
            "  node loss (failure detection {}): placed elsewhere after {}, served again after {}",
            s(Some(self.failure_detection)),
            s(self.loss_replaced),
            s(self.loss_served)
        )
    }
}

/// The rendezvous order of every node for each model, computed once: a model's placement is
/// the first `count` live nodes of its order, as [`super::replicas`] gives it.
fn orders(names: &[String], models: &[String]) -> Vec<Vec<usize>> {
    models
        .iter()
        .map(|model| {
            super::replicas(model, names.iter().map(String::as_str), names.len())
                .into_iter()
                .filter_map(|name| names.iter().position(|n| n == name))
                .collect()
        })
        .collect()
}

/// Runs the scenario on `nodes` nodes and `models` models; `failure_detection` is how long
/// the mesh takes to drop a dead member everywhere (the membership simulation measures it).
pub fn run(nodes: usize, models: usize, failure_detection: Duration, seed: u64) -> ScaleReport {
    let mut rng = seed | 1;
    let mut random = move || {
        // xorshift64*: deterministic and good enough to spread phases and rates.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    };
    let names: Vec<String> = (0..nodes).map(|i| format!("node-{i:03}")).collect();
    let model_names: Vec<String> = (0..models).map(|i| format!("model-{i:04}")).collect();
    let traffic: Vec<Traffic> = (0..models)
        .map(|m| match m % 10 {
            0 => Traffic::Step,
            1 => Traffic::Spike(20.0 + random() * 120.0),
            2 => Traffic::Drift,
            _ => Traffic::Steady(50.0 + random() * 200.0),
        })
        .collect();
    let order = orders(&names, &model_names);
    let scaled: BTreeMap<String, Scaling> =
        model_names.iter().map(|m| (m.clone(), SCALING)).collect();
    let per_period = (SAMPLE_PERIOD.as_millis() / TICK.as_millis()) as u64;
    let mut mesh: Vec<Node> = names
        .iter()
        .map(|name| Node {
            name: name.clone(),
            alive: true,
            phase: (random() * per_period as f64) as u32 % per_period as u32,
            scaler: Scaler::default(),
            counts: vec![SCALING.min; models],
            serving: vec![Serving::No; models],
            busy: vec![0.0; models],
            changes: Vec::new(),
        })
        .collect();
    // Every model starts on its minimum, loaded.
    for (m, order) in order.iter().enumerate() {
        for &n in order.iter().take(usize::from(SCALING.min)) {
            mesh[n].serving[m] = Serving::Yes;
        }
    }
    let victim = nodes / 2;
    let victim_models: Vec<usize> = (0..models)
        .filter(|&m| {
            order[m]
                .iter()
                .take(usize::from(SCALING.max))
                .any(|&n| n == victim)
        })
        .collect();
    // The last report each node published: what every other node samples.
    let mut published: Vec<NodeAdvert> =
        mesh.iter().map(|n| report(n, &model_names, &[])).collect();
    let mut last_period: Vec<Vec<f64>> = vec![vec![0.0; models]; nodes];
    let mut loss_replaced = None;
    let mut loss_served = None;
    let ticks = (END_S / TICK.as_secs_f64()).round() as u64;
    for tick in 0..ticks {
        let t = tick as f64 * TICK.as_secs_f64();
        let detected = t >= NODE_LOSS_S + failure_detection.as_secs_f64();
        if t >= NODE_LOSS_S {
            mesh[victim].alive = false;
            mesh[victim].serving = vec![Serving::No; models];
        }
        // Load: each model's rate spread over the nodes serving it.
        for (m, traffic) in traffic.iter().enumerate() {
            let servers: Vec<usize> = (0..nodes)
                .filter(|&n| mesh[n].serving[m].serves())
                .collect();
            if servers.is_empty() {
                continue;
            }
            let rate = traffic.rate(t) / servers.len() as f64;
            let load = rate * SERVICE_TIME;
            let utilisation = load / SESSIONS;
            let in_flight = if utilisation >= 1.0 {
                FULL_QUEUE
            } else {
                (load / (1.0 - utilisation)).min(FULL_QUEUE)
            };
            for n in servers {
                mesh[n].busy[m] += in_flight / per_period as f64;
            }
        }
        // At a period's end each node's meter rolls over.
        if tick % per_period == per_period - 1 {
            for (n, node) in mesh.iter_mut().enumerate() {
                last_period[n] = std::mem::replace(&mut node.busy, vec![0.0; models]);
            }
        }
        // Each node publishes and samples once a period, at its phase.
        for n in 0..nodes {
            if !mesh[n].alive || tick % per_period != u64::from(mesh[n].phase) {
                continue;
            }
            published[n] = report(&mesh[n], &model_names, &last_period[n]);
            let members: Vec<&NodeAdvert> = (0..nodes)
                .filter(|&j| !(detected && j == victim))
                .map(|j| &published[j])
                .collect();
            let changes = mesh[n].scaler.sample(&scaled, &members);
            for change in changes {
                let m = model_index(&change.model);
                mesh[n].counts[m] = change.to;
                mesh[n].changes.push((t, change));
            }
        }
        // Each node follows its own plan (loading and unloading in steps of a tick).
        for (n, node) in mesh.iter_mut().enumerate().filter(|(_, node)| node.alive) {
            for (m, order) in order.iter().enumerate() {
                let placed = placement(order, node.counts[m], |j| !(detected && j == victim))
                    .any(|j| j == n);
                let next = match (node.serving[m], placed) {
                    (Serving::No, true) => Serving::Loading(t + LOAD_TIME.as_secs_f64()),
                    (Serving::Loading(ready), true) if t >= ready => Serving::Yes,
                    (Serving::Loading(_), false) => Serving::No,
                    (Serving::Yes, false) => Serving::Leaving(t + UNLOAD_GRACE.as_secs_f64()),
                    (Serving::Leaving(_), true) => Serving::Yes,
                    (Serving::Leaving(until), false) if t >= until => Serving::No,
                    (state, _) => state,
                };
                node.serving[m] = next;
            }
        }
        if t >= NODE_LOSS_S {
            let since = Duration::from_secs_f64(t - NODE_LOSS_S);
            if loss_replaced.is_none()
                && detected
                && victim_models.iter().all(|&m| {
                    mesh.iter().filter(|n| n.alive).all(|node| {
                        let count = node.counts[m];
                        placement(&order[m], count, |j| j != victim).count() == usize::from(count)
                    })
                })
            {
                loss_replaced = Some(since);
            }
            if loss_served.is_none()
                && victim_models.iter().all(|&m| {
                    let serving = mesh.iter().filter(|n| n.serving[m] == Serving::Yes).count();
                    let wanted = mesh
                        .iter()
                        .filter(|n| n.alive)
                        .map(|n| n.counts[m])
                        .min()
                        .unwrap_or(1);
                    serving >= usize::from(wanted)
                })
            {
                loss_served = Some(since);
            }
        }
    }
    summarise(
        &mesh,
        &traffic,
        victim,
        failure_detection,
        loss_replaced,
        loss_served,
    )
}

/// The first `count` nodes of `order` that `live` accepts.
fn placement(
    order: &[usize],
    count: u16,
    live: impl Fn(usize) -> bool,
) -> impl Iterator<Item = usize> {
    order
        .iter()
        .copied()
        .filter(move |&j| live(j))
        .take(usize::from(count))
}

/// A node's advert as the policy reads it: what it serves and its requests in flight.
fn report(node: &Node, models: &[String], in_flight: &[f64]) -> NodeAdvert {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
    let serving: Vec<usize> = (0..models.len())
        .filter(|&m| node.serving[m].serves())
        .collect();
    NodeAdvert {
        serving: serving.iter().map(|&m| models[m].clone()).collect(),
        in_flight: serving
            .iter()
            .filter(|&&m| in_flight.get(m).is_some_and(|&l| l > 0.0))
            .map(|&m| ModelInFlight {
                model: models[m].clone(),
                milli: (in_flight[m] * 1000.0).round() as u32,
                wait_us: 0,
            })
            .collect(),
        ..NodeAdvert::empty(&node.name, addr)
    }
}

fn summarise(
    mesh: &[Node],
    traffic: &[Traffic],
    victim: usize,
    failure_detection: Duration,
    loss_replaced: Option<Duration>,
    loss_served: Option<Duration>,
) -> ScaleReport {
    let models = traffic.len();
    let mut per_model: Vec<Vec<(usize, f64, &ScaleChange)>> = vec![Vec::new(); models];
    for (n, node) in mesh.iter().enumerate() {
        for (t, change) in &node.changes {
            if let Some(list) = per_model.get_mut(model_index(&change.model)) {
                list.push((n, *t, change));
            }
        }
    }
    let decisions: usize = per_model.iter().map(Vec::len).sum();
    let live = |n: usize| n != victim;
    let mut step_first = Duration::ZERO;
    let mut step_all: Option<Duration> = Some(Duration::ZERO);
    let mut step_spread = Duration::ZERO;
    let mut step_back: Option<Duration> = Some(Duration::ZERO);
    let (mut oscillations, mut steady_changes, mut spikes_followed) = (0, 0, 0);
    for (m, changes) in per_model.iter().enumerate() {
        // Oscillation: on one node, a direction taken, undone, and taken again.
        let oscillates = (0..mesh.len()).any(|n| {
            let ways: Vec<bool> = changes
                .iter()
                .filter(|c| c.0 == n)
                .map(|c| c.2.to > c.2.from)
                .collect();
            let mut turns = ways.windows(2).filter(|w| w[0] != w[1]).count();
            // The step models turn once, at the step down.
            if traffic[m] == Traffic::Step || matches!(traffic[m], Traffic::Spike(_)) {
                turns = turns.saturating_sub(1);
            }
            turns > 0
        });
        oscillations += usize::from(oscillates);
        match traffic[m] {
            Traffic::Steady(_) => steady_changes += changes.len(),
            Traffic::Spike(_) => spikes_followed += usize::from(!changes.is_empty()),
            Traffic::Drift => {}
            Traffic::Step => {
                let ups: Vec<(usize, f64)> = changes
                    .iter()
                    .filter(|c| c.2.to > c.2.from && c.1 < STEP_DOWN_S)
                    .map(|c| (c.0, c.1))
                    .collect();
                let first = ups.iter().map(|u| u.1).fold(f64::INFINITY, f64::min);
                step_first = step_first.max(secs(first - STEP_UP_S));
                // The last up of each live node: when it reached the step's count.
                let reached: Vec<Option<f64>> = (0..mesh.len())
                    .filter(|&n| live(n))
                    .map(|n| {
                        changes
                            .iter()
                            .filter(|c| c.0 == n && c.1 < STEP_DOWN_S && c.2.to == SCALING.max)
                            .map(|c| c.1)
                            .next()
                    })
                    .collect();
                let last = reached.iter().copied().collect::<Option<Vec<f64>>>();
                step_all = match (step_all, last) {
                    (Some(worst), Some(times)) => {
                        let latest = times.iter().copied().fold(f64::MIN, f64::max);
                        let earliest = times.iter().copied().fold(f64::MAX, f64::min);
                        step_spread = step_spread.max(secs(latest - earliest));
                        Some(worst.max(secs(latest - STEP_UP_S)))
                    }
                    _ => None,
                };
                let back: Option<Vec<f64>> = (0..mesh.len())
                    .filter(|&n| live(n))
                    .map(|n| {
                        changes
                            .iter()
                            .filter(|c| c.0 == n && c.1 >= STEP_DOWN_S && c.2.to == SCALING.min)
                            .map(|c| c.1)
                            .next()
                    })
                    .collect();
                step_back = match (step_back, back) {
                    (Some(worst), Some(times)) => {
                        let latest = times.iter().copied().fold(f64::MIN, f64::max);
                        Some(worst.max(secs(latest - STEP_DOWN_S)))
                    }
                    _ => None,
                };
            }
        }
    }
    ScaleReport {
        nodes: mesh.len(),
        models,
        duration: secs(END_S),
        decisions_per_minute: decisions as f64 / mesh.len() as f64 / (END_S / 60.0),
        step_first_decision: step_first,
        step_all_decided: step_all,
        step_spread,
        step_back_all: step_back,
        oscillations,
        steady_changes,
        spikes_followed,
        loss_replaced,
        loss_served,
        failure_detection,
    }
}

/// The index of a simulated model from its name (`model-0042`).
fn model_index(model: &str) -> usize {
    model
        .trim_start_matches("model-")
        .parse()
        .unwrap_or(usize::MAX)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}
