//! Replica counts that follow load: the policy every node runs, alike, over the load the
//! members report.
//!
//! **The signal** is a model's requests in flight summed over the nodes that serve it (each
//! node's time-average over its last [`SAMPLE_PERIOD`], [`crate::wire::ModelInFlight`]), against a target
//! per replica, as Knative's concurrency target. Requests in flight, unlike CPU or requests
//! per second, mean the same for a 50 µs model and a 50 ms one, include the queue (the part
//! that grows without bound under overload), and add up across replicas: their sum is the
//! arrival rate times the time each spends, which barely moves when a replica is added, so
//! adding one does not make the signal ask for removing it again.
//!
//! **The decision** is taken once per [`SAMPLE_PERIOD`] from the samples since the count last
//! went up: up when each of the last [`UP_SAMPLES`] wants more replicas (to the fewest any of
//! them wants: a burst must last about a second and a half, the meter's lag included), down
//! when each of the last `down_window_s` wants fewer, counted with [`DOWN_HEADROOM`] (to the
//! most any of them wants). The down window slides on after a step down: when the load's tail
//! left one sample wanting 2 of 3 replicas, the count goes to 1 as soon as that sample leaves
//! the window, not a whole window after the step to 2. The headroom is the hysteresis: after going down to `n`, the load is at most 80% of
//! what `n` replicas carry, so it does not ask for `n + 1` again until it grows by a quarter.
//!
//! Every node feeds its own copy the same reports, a notice's latency apart, so all of them
//! reach the same count within a sample or two; each node only ever acts on its own view
//! (whether it is placed the model), so a node that disagrees for a moment changes nothing
//! elsewhere. A member's report counts only for models it serves, and at most the publisher's
//! `max` replicas follow from any report: a member cannot make another run what the
//! publishers did not allow, nor hide the load the other replicas report.
//!
//! Pure: no clock (one call per sample), no I/O.

use crate::wire::{NodeAdvert, Scaling};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// How often the policy samples the load: as often as the nodes' meters measure it.
pub const SAMPLE_PERIOD: Duration = meshserve_host::metrics::in_flight::PERIOD;

/// Consecutive samples that must want more replicas before one is added: a second of excess
/// (three half-second figures) is a burst; one or two are a blip.
pub const UP_SAMPLES: usize = 3;

/// A count goes down only to what carries the load at this fraction of the target.
pub const DOWN_HEADROOM: f64 = 0.8;

/// Largest number of requests in flight one member's report may claim for one model: far
/// above any real queue, so a hostile report cannot overflow a sum.
const MAX_REPORTED_IN_FLIGHT: f64 = 1e6;

/// The replica count `in_flight` needs at `target` per replica (`headroom` of it), within the
/// bounds.
fn wanted(in_flight: f64, scaling: &Scaling, headroom: f64) -> u16 {
    let target = f64::from(scaling.target_in_flight_milli.max(1)) / 1000.0 * headroom;
    let count = (in_flight / target).ceil();
    let count = if count.is_finite() { count } else { 0.0 };
    (count.min(f64::from(u16::MAX)) as u16).clamp(scaling.min, scaling.max.max(scaling.min))
}

/// A change of one model's replica count, and the load that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleChange {
    /// The model.
    pub model: String,
    /// The count before.
    pub from: u16,
    /// The count after.
    pub to: u16,
    /// Requests in flight over its replicas at the last sample.
    pub in_flight: f64,
    /// Why, in words (for the log and `meshserve status`).
    pub reason: String,
}

/// One model's count and the samples since it last went up.
#[derive(Debug, Clone)]
struct ModelScale {
    scaling: Scaling,
    count: u16,
    /// Requests in flight over its replicas, one per sample since the last change, newest
    /// last; at most as many as the longer window needs.
    samples: VecDeque<f64>,
    last_change: Option<ScaleChange>,
}

impl ModelScale {
    fn new(scaling: Scaling) -> ModelScale {
        ModelScale {
            scaling,
            count: scaling.min,
            samples: VecDeque::new(),
            last_change: None,
        }
    }

    /// Takes one sample; the new count when it changes.
    fn sample(&mut self, in_flight: f64) -> Option<(u16, String)> {
        let down_samples = samples_in(self.scaling.down_window_s);
        self.samples.push_back(in_flight);
        while self.samples.len() > down_samples.max(UP_SAMPLES) {
            self.samples.pop_front();
        }
        let target = f64::from(self.scaling.target_in_flight_milli) / 1000.0;
        let recent = |n: usize| self.samples.iter().rev().take(n);
        if self.samples.len() >= UP_SAMPLES {
            let up = recent(UP_SAMPLES)
                .map(|&s| wanted(s, &self.scaling, 1.0))
                .min()
                .unwrap_or(self.count);
            if up > self.count {
                let reason = format!(
                    "{in_flight:.1} requests in flight over {} replica(s), target {target} each, for {:.1} s",
                    self.count,
                    (SAMPLE_PERIOD * UP_SAMPLES as u32).as_secs_f64()
                );
                return Some((up, reason));
            }
        }
        if self.samples.len() >= down_samples {
            let down = recent(down_samples)
                .map(|&s| wanted(s, &self.scaling, DOWN_HEADROOM))
                .max()
                .unwrap_or(self.count);
            if down < self.count {
                let peak = recent(down_samples).copied().fold(0.0, f64::max);
                let reason = format!(
                    "at most {peak:.1} requests in flight for {} s, under {}% of target {target} per replica on {down}",
                    self.scaling.down_window_s.max(1),
                    (DOWN_HEADROOM * 100.0) as u32
                );
                return Some((down, reason));
            }
        }
        None
    }
}

/// Samples in a window of `seconds` (at least one second).
fn samples_in(seconds: u32) -> usize {
    let millis = u128::from(seconds.max(1)) * 1000;
    usize::try_from(millis / SAMPLE_PERIOD.as_millis().max(1)).unwrap_or(usize::MAX)
}

/// The replica count of every model whose count follows load, as one node decides it.
#[derive(Debug, Clone, Default)]
pub struct Scaler {
    models: BTreeMap<String, ModelScale>,
}

impl Scaler {
    /// Takes one sample of every scaled model's load (`scaled`: the models whose publisher
    /// asks for scaling, with its bounds; `members`: the live members' adverts with their
    /// load figures) and gives the changes it decided. Models no longer scaled are forgotten;
    /// a model whose bounds changed keeps its count within the new ones.
    pub fn sample(
        &mut self,
        scaled: &BTreeMap<String, Scaling>,
        members: &[&NodeAdvert],
    ) -> Vec<ScaleChange> {
        self.models.retain(|model, _| scaled.contains_key(model));
        let totals = in_flight_by_model(scaled, members);
        let mut changes = Vec::new();
        for (model, scaling) in scaled {
            if !self.models.contains_key(model) {
                self.models.insert(model.clone(), ModelScale::new(*scaling));
            }
            let Some(state) = self.models.get_mut(model) else {
                continue;
            };
            if state.scaling != *scaling {
                state.scaling = *scaling;
                state.count = state.count.clamp(scaling.min, scaling.max.max(scaling.min));
                state.samples.clear();
            }
            let in_flight = totals.get(model.as_str()).copied().unwrap_or(0.0);
            if let Some((to, reason)) = state.sample(in_flight) {
                let change = ScaleChange {
                    model: model.clone(),
                    from: state.count,
                    to,
                    in_flight,
                    reason,
                };
                if to > state.count {
                    // A new replica count must hold a whole stable window before it goes down.
                    state.samples.clear();
                }
                state.count = to;
                state.last_change = Some(change.clone());
                changes.push(change);
            }
        }
        changes
    }

    /// The count of every scaled model decided so far.
    pub fn counts(&self) -> BTreeMap<String, u16> {
        self.models
            .iter()
            .map(|(model, state)| (model.clone(), state.count))
            .collect()
    }

    /// A model's count, the requests in flight of its last sample, and its last change.
    pub fn state(&self, model: &str) -> Option<(u16, f64, Option<&ScaleChange>)> {
        self.models.get(model).map(|state| {
            (
                state.count,
                state.samples.back().copied().unwrap_or(0.0),
                state.last_change.as_ref(),
            )
        })
    }
}

/// Requests in flight per scaled model, summed over the members that report serving it.
fn in_flight_by_model<'a>(
    scaled: &'a BTreeMap<String, Scaling>,
    members: &[&NodeAdvert],
) -> BTreeMap<&'a str, f64> {
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    for advert in members {
        for load in &advert.in_flight {
            let Some((model, _)) = scaled.get_key_value(&load.model) else {
                continue;
            };
            if advert.serving.iter().any(|s| s == model) {
                let reported = (f64::from(load.milli) / 1000.0).min(MAX_REPORTED_IN_FLIGHT);
                *totals.entry(model.as_str()).or_default() += reported;
            }
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ModelInFlight;

    fn scaling(min: u16, max: u16, target: f64, down_window_s: u32) -> Scaling {
        Scaling {
            min,
            max,
            target_in_flight_milli: (target * 1000.0) as u32,
            down_window_s,
        }
    }

    fn advert(node: &str, serving: &[&str], loads: &[(&str, f64)]) -> NodeAdvert {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        NodeAdvert {
            serving: serving.iter().map(|s| s.to_string()).collect(),
            in_flight: loads
                .iter()
                .map(|&(model, load)| ModelInFlight {
                    model: model.into(),
                    milli: (load * 1000.0) as u32,
                    wait_us: 0,
                })
                .collect(),
            ..NodeAdvert::empty(node, addr)
        }
    }

    /// Feeds `loads` (total in flight, one per sample) to a scaler of `heavy`; the count after
    /// each sample.
    fn run(scaling: Scaling, loads: &[f64]) -> Vec<u16> {
        let scaled = BTreeMap::from([("heavy".to_string(), scaling)]);
        let mut scaler = Scaler::default();
        loads
            .iter()
            .map(|&load| {
                let a = advert("a", &["heavy"], &[("heavy", load)]);
                scaler.sample(&scaled, &[&a]);
                scaler.counts()["heavy"]
            })
            .collect()
    }

    #[test]
    fn a_burst_of_three_samples_scales_up_at_once_and_a_blip_does_not() {
        let policy = scaling(1, 3, 4.0, 10);
        // Two samples of 30 in flight are a blip; three are a burst: straight to the max.
        assert_eq!(
            run(policy, &[1.0, 30.0, 30.0, 1.0, 30.0, 30.0, 30.0]),
            vec![1, 1, 1, 1, 1, 1, 3]
        );
        // 6 in flight at 4 per replica needs 2.
        assert_eq!(run(policy, &[6.0, 6.0, 6.0, 6.0]), vec![1, 1, 2, 2]);
    }

    #[test]
    fn windows_are_counted_in_samples_of_the_period() {
        assert_eq!(
            SAMPLE_PERIOD * samples_in(30) as u32,
            Duration::from_secs(30)
        );
        assert_eq!(SAMPLE_PERIOD * samples_in(0) as u32, Duration::from_secs(1));
    }

    #[test]
    fn scaling_down_waits_for_the_whole_window_of_low_load_since_the_last_change() {
        let policy = scaling(1, 3, 4.0, 5);
        let window = samples_in(5);
        let mut loads = vec![20.0; UP_SAMPLES];
        loads.extend(vec![0.0; window - 1]);
        loads.push(20.0); // load comes back before the window is over: no change
        loads.extend(vec![0.0; window]);
        let counts = run(policy, &loads);
        let last = counts.len() - 1;
        assert!(
            counts[UP_SAMPLES - 1..last].iter().all(|&c| c == 3),
            "{counts:?}"
        );
        assert_eq!(
            counts[last], 1,
            "five low seconds after the blip: {counts:?}"
        );
    }

    #[test]
    fn a_step_down_lets_the_window_slide_on_to_the_next() {
        let policy = scaling(1, 3, 4.0, 5);
        let window = samples_in(5);
        // Up to 3; then one sample of the load's tail wants 2, the rest want 1.
        let mut loads = vec![20.0; UP_SAMPLES];
        loads.push(5.0);
        loads.extend(vec![0.0; window]);
        let counts = run(policy, &loads);
        let tail = UP_SAMPLES;
        assert_eq!(counts[tail + window - 1], 2, "{counts:?}");
        assert_eq!(
            counts[tail + window],
            1,
            "the sample wanting 2 left the window: {counts:?}"
        );
    }

    #[test]
    fn the_headroom_keeps_the_count_from_flapping_around_a_boundary() {
        // 8.5 in flight at a target of 4: wants 3 to go up; down to 2 only below 6.4.
        let policy = scaling(1, 5, 4.0, 3);
        let mut loads = vec![8.5; UP_SAMPLES];
        for i in 0..120 {
            loads.push(if i % 2 == 0 { 7.9 } else { 8.3 });
        }
        let counts = run(policy, &loads);
        assert!(
            counts[UP_SAMPLES - 1..].iter().all(|&c| c == 3),
            "{counts:?}"
        );
    }

    #[test]
    fn the_count_stays_within_the_bounds_and_follows_new_ones() {
        let mut scaled = BTreeMap::from([("heavy".to_string(), scaling(2, 4, 1.0, 3))]);
        let mut scaler = Scaler::default();
        let a = advert("a", &["heavy"], &[("heavy", 1e9)]);
        for _ in 0..3 {
            scaler.sample(&scaled, &[&a]);
        }
        assert_eq!(scaler.counts()["heavy"], 4, "at most max");
        scaled.insert("heavy".into(), scaling(1, 2, 1.0, 3));
        scaler.sample(&scaled, &[&a]);
        assert_eq!(scaler.counts()["heavy"], 2, "new bounds clamp the count");
        scaled.clear();
        scaler.sample(&scaled, &[&a]);
        assert!(
            scaler.counts().is_empty(),
            "a model no longer scaled is forgotten"
        );
    }

    #[test]
    fn only_members_serving_a_model_count_toward_its_load_and_a_claim_is_bounded() {
        let scaled = BTreeMap::from([
            ("heavy".to_string(), scaling(1, 3, 4.0, 3)),
            ("fraud".to_string(), scaling(1, 3, 4.0, 3)),
        ]);
        let a = advert("a", &["heavy"], &[("heavy", 3.0)]);
        let b = advert("b", &["heavy"], &[("heavy", 3.0)]);
        // c does not serve heavy: its claim is ignored. d claims the largest figure there is.
        let c = advert("c", &[], &[("heavy", 1000.0)]);
        let d = advert("d", &["fraud"], &[("fraud", 4_294_967.0)]);
        let totals = in_flight_by_model(&scaled, &[&a, &b, &c, &d]);
        assert_eq!(totals["heavy"], 6.0);
        assert_eq!(totals["fraud"], MAX_REPORTED_IN_FLIGHT.min(4_294_967.0));
        let mut scaler = Scaler::default();
        for _ in 1..UP_SAMPLES {
            scaler.sample(&scaled, &[&a, &b, &c, &d]);
        }
        let changes = scaler.sample(&scaled, &[&a, &b, &c, &d]);
        assert_eq!(scaler.counts()["heavy"], 2);
        assert_eq!(scaler.counts()["fraud"], 3, "at most the publisher's max");
        let heavy = changes.iter().find(|c| c.model == "heavy").unwrap();
        assert_eq!((heavy.from, heavy.to), (1, 2));
        assert!(
            heavy.reason.contains("6.0 requests in flight"),
            "{}",
            heavy.reason
        );
        assert_eq!(scaler.state("heavy").unwrap().2, Some(heavy));
    }
}
