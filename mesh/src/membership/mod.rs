//! Membership and failure detection: SWIM, by the `foca` crate, plus each node's advert
//! (addresses, model catalog, what it serves, its load) disseminated as foca custom broadcasts.
//!
//! [`Membership`] is the sans-IO core: it takes packets, timer events and adverts (with the
//! time, so it needs no clock), and leaves what to send, what to schedule and what changed in
//! its [`Outbox`].
//!
//! Adverts spread two ways. A change that matters for placement (catalog, served models,
//! addresses, a new generation) is broadcast through foca's piggybacked dissemination at once;
//! load figures alone at most every [`LOAD_ADVERT_PERIOD`], and everything again every
//! [`REFRESH_PERIOD`] to heal losses. A member that comes up is sent our advert directly, so a
//! newcomer learns the whole mesh in one round trip instead of waiting for the next broadcast:
//! re-broadcasting every advert whenever anyone joins would swamp a 100-node mesh. [`sim`] drives many of them
//! on virtual time; `crate::cluster` drives one over QUIC datagrams and tokio timers.

pub(crate) mod adverts;
pub mod sim;

use crate::wire::NodeAdvert;
use adverts::{AdvertHandler, AdvertTable};
use foca::{Foca, Identity, Notification, PostcardCodec, Runtime, State, Timer};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest membership packet: below the smallest QUIC datagram payload on common paths.
pub const MAX_PACKET_BYTES: usize = 1150;

/// Least time between broadcasts that only carry new load figures.
pub const LOAD_ADVERT_PERIOD: Duration = Duration::from_secs(5);

/// Longest time between broadcasts of an unchanged advert.
pub const REFRESH_PERIOD: Duration = Duration::from_secs(30);

/// First byte of a membership packet: what follows.
const SWIM_PACKET: u8 = 0;
const ADVERT_PACKET: u8 = 1;

/// A member's identity in SWIM: its name, its QUIC address, and which start of it this is.
///
/// The address is what foca matches an announce against, so joining needs only a seed's
/// address. A restarted node comes back with a later generation, which wins over its old
/// identity at the same address instead of waiting for the old one to be forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MemberId {
    /// The node's name.
    pub name: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Start time (ms since the epoch) or a later renewal of it.
    pub generation: u64,
}

impl Identity for MemberId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(MemberId {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

impl MemberId {
    /// The identity to announce to when only a seed's address is known: foca accepts an
    /// announce addressed to any identity with the receiver's address.
    pub fn seed(addr: SocketAddr) -> MemberId {
        MemberId {
            name: String::new(),
            addr,
            generation: 0,
        }
    }
}

/// Timing of failure detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorConfig {
    /// How often a member probes another.
    pub probe_period: Duration,
    /// How long a direct probe waits for its ack before asking others to probe.
    pub probe_rtt: Duration,
    /// How long a suspect member has to refute before it is declared down.
    pub suspect_timeout: Duration,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        // Tuned for a data-centre network: a crashed node is declared down about 2 s after it
        // stops answering, while a pause of a few hundred ms only raises suspicion.
        DetectorConfig {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(200),
            suspect_timeout: Duration::from_millis(1500),
        }
    }
}

impl DetectorConfig {
    fn foca(&self, expected_members: u32) -> foca::Config {
        let mut config = foca::Config::new_lan(
            std::num::NonZeroU32::new(expected_members.max(1)).unwrap_or(std::num::NonZeroU32::MIN),
        );
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.suspect_to_down_after = self.suspect_timeout;
        config.max_packet_size =
            std::num::NonZeroUsize::new(MAX_PACKET_BYTES).unwrap_or(std::num::NonZeroUsize::MIN);
        // Down members are forgotten soon, so a node that restarts with the same name and a
        // new generation is not shadowed for long.
        config.remove_down_after = Duration::from_secs(15);
        config
    }
}

/// What changed in the membership, for logs and for whoever recomputes placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A member became reachable.
    Up(MemberId),
    /// A member was declared down (crashed or partitioned).
    Down(MemberId),
    /// We joined: at least one member knows us.
    Joined,
    /// Every other member is gone; the shell should announce to the seeds again.
    Isolated,
    /// We were declared down and rejoined under a new generation.
    Rejoined(MemberId),
}

/// What the core wants done after a call.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Packets to send, by destination address; hand them to [`Membership::handle_packet`] of
    /// the receiver as they are.
    pub packets: Vec<(SocketAddr, Vec<u8>)>,
    /// Timer events to hand back after the delay.
    pub timers: Vec<(Duration, Timer<MemberId>)>,
    /// Membership changes.
    pub changes: Vec<Change>,
}

impl Runtime<MemberId> for Outbox {
    fn notify(&mut self, notification: Notification<'_, MemberId>) {
        let change = match notification {
            Notification::MemberUp(id) => Change::Up(id.clone()),
            Notification::MemberDown(id) => Change::Down(id.clone()),
            Notification::Active => Change::Joined,
            Notification::Idle => Change::Isolated,
            Notification::Rejoin(id) => Change::Rejoined(id.clone()),
            Notification::Rename(..) | Notification::Defunct => return,
        };
        self.changes.push(change);
    }

    fn send_to(&mut self, to: MemberId, data: &[u8]) {
        let mut packet = Vec::with_capacity(data.len() + 1);
        packet.push(SWIM_PACKET);
        packet.extend_from_slice(data);
        self.packets.push((to.addr, packet));
    }

    fn submit_after(&mut self, event: Timer<MemberId>, after: Duration) {
        self.timers.push((after, event));
    }
}

/// Why the core refused an input.
#[derive(Debug, thiserror::Error)]
#[error("membership: {0}")]
pub struct MembershipError(String);

impl From<foca::Error> for MembershipError {
    fn from(e: foca::Error) -> Self {
        MembershipError(e.to_string())
    }
}

/// A live member and what it advertised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMember {
    /// Its identity.
    pub id: MemberId,
    /// Alive, or suspected of having failed.
    pub suspect: bool,
    /// Its latest advert, once one arrived.
    pub advert: Option<NodeAdvert>,
}

/// The sans-IO membership core of one node.
pub struct Membership {
    foca: Foca<MemberId, PostcardCodec, StdRng, AdvertHandler>,
    adverts: Arc<Mutex<AdvertTable>>,
    own_advert: Option<NodeAdvert>,
    last_broadcast: Option<Duration>,
    outbox: Outbox,
    changes_handled: usize,
    /// Addresses of members that went down, newest first: where the rest of a partitioned
    /// mesh, or a restarted node, may be found again.
    departed: std::collections::VecDeque<SocketAddr>,
}

/// How many departed members' addresses a node keeps announcing to.
const MAX_DEPARTED: usize = 32;

impl Membership {
    /// A core for `id`; `rng_seed` makes its random choices reproducible.
    pub fn new(
        id: MemberId,
        detector: DetectorConfig,
        expected_members: u32,
        rng_seed: u64,
    ) -> Membership {
        let adverts = Arc::new(Mutex::new(AdvertTable::default()));
        let foca = Foca::with_custom_broadcast(
            id,
            detector.foca(expected_members),
            StdRng::seed_from_u64(rng_seed),
            PostcardCodec,
            AdvertHandler::new(adverts.clone()),
        );
        Membership {
            foca,
            adverts,
            own_advert: None,
            last_broadcast: None,
            outbox: Outbox::default(),
            changes_handled: 0,
            departed: std::collections::VecDeque::new(),
        }
    }

    /// Where to announce ourselves again although we are not alone: the seeds and the last
    /// members that went down, unless a live member (or we) answers at that address. Someone
    /// on the other side of a healed partition, or a seed that restarted alone, is found
    /// this way; a mesh that only rejoined when fully isolated would stay split for good.
    pub fn rejoin_targets(&self, seeds: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut live: Vec<SocketAddr> = vec![self.foca.identity().addr];
        live.extend(self.foca.iter_members().map(|m| m.id().addr));
        let mut targets = Vec::new();
        for addr in seeds.iter().chain(&self.departed) {
            if !live.contains(addr) && !targets.contains(addr) {
                targets.push(*addr);
            }
        }
        targets
    }

    /// Our identity now (it changes when we rejoin after being declared down).
    pub fn id(&self) -> &MemberId {
        self.foca.identity()
    }

    /// Asks the member at `seed` to let us in.
    pub fn join(&mut self, seed: SocketAddr) -> Result<(), MembershipError> {
        Ok(self.foca.announce(MemberId::seed(seed), &mut self.outbox)?)
    }

    /// Handles a packet from the network.
    pub fn handle_packet(&mut self, packet: &[u8]) -> Result<(), MembershipError> {
        match packet.split_first() {
            Some((&SWIM_PACKET, data)) => {
                let result = self.foca.handle_data(data, &mut self.outbox);
                self.after_changes();
                Ok(result?)
            }
            Some((&ADVERT_PACKET, data)) => {
                let advert: NodeAdvert = postcard::from_bytes(data)
                    .map_err(|e| MembershipError(format!("malformed advert: {e}")))?;
                self.receive_direct_advert(advert)
            }
            Some((kind, _)) => Err(MembershipError(format!("unknown packet kind {kind}"))),
            None => Err(MembershipError("empty packet".into())),
        }
    }

    /// Handles a timer event the core scheduled earlier.
    pub fn handle_timer(&mut self, timer: Timer<MemberId>) -> Result<(), MembershipError> {
        let result = self.foca.handle_timer(timer, &mut self.outbox);
        self.after_changes();
        Ok(result?)
    }

    // A member sent us its advert directly. If it was news, answer with ours, so knowledge is
    // symmetric; if the sender is not yet a member we know, announce to it: its feed teaches us
    // it and more of the mesh sooner than gossip would. (A feed packet holds only a few dozen
    // members, so a node joining a large mesh learns most members this way.)
    fn receive_direct_advert(&mut self, advert: NodeAdvert) -> Result<(), MembershipError> {
        let me = self.foca.identity().clone();
        if advert.node == me.name {
            return Ok(());
        }
        let sender = advert.quic;
        let news = self
            .adverts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .offer(advert);
        if news && let Some(packet) = self.own_advert_packet() {
            self.outbox.packets.push((sender, packet));
        }
        let known = self.foca.iter_members().any(|m| m.id().addr == sender);
        if !known && sender != me.addr {
            self.foca
                .announce(MemberId::seed(sender), &mut self.outbox)?;
            self.after_changes();
        }
        Ok(())
    }

    fn own_advert_packet(&self) -> Option<Vec<u8>> {
        let advert = self.own_advert.as_ref()?;
        postcard::to_extend(advert, vec![ADVERT_PACKET]).ok()
    }

    /// Takes our current advert (addresses, catalog, load) at time `now` (any monotonic
    /// origin) and broadcasts it when the policy in the module docs says so.
    pub fn advertise(
        &mut self,
        mut advert: NodeAdvert,
        now: Duration,
    ) -> Result<(), MembershipError> {
        let previous = self.own_advert.as_ref();
        let material = previous.is_none_or(|old| {
            (
                &old.generation,
                &old.quic,
                &old.http,
                &old.http3,
                &old.catalog,
                &old.serving,
            ) != (
                &advert.generation,
                &advert.quic,
                &advert.http,
                &advert.http3,
                &advert.catalog,
                &advert.serving,
            )
        });
        let load_changed = previous.is_some_and(|old| {
            (old.queue_depth, old.ewma_latency_us) != (advert.queue_depth, advert.ewma_latency_us)
        });
        let since = self.last_broadcast.map(|at| now.saturating_sub(at));
        let due = match since {
            None => true,
            Some(since) => {
                material || (load_changed && since >= LOAD_ADVERT_PERIOD) || since >= REFRESH_PERIOD
            }
        };
        if !due {
            return Ok(());
        }
        advert.sequence = previous
            .filter(|old| old.generation == advert.generation)
            .map_or(0, |old| old.sequence + 1);
        let encoded = postcard::to_allocvec(&advert).map_err(|e| MembershipError(e.to_string()))?;
        self.own_advert = Some(advert);
        self.last_broadcast = Some(now);
        self.foca.add_broadcast(&encoded)?;
        // Gossip reaches each member only with high probability (a broadcast rides a few
        // messages to random members); a change placement depends on also goes straight to
        // every live member, so no one acts on our old catalog or serving list for up to the
        // refresh period.
        if material && let Some(packet) = self.own_advert_packet() {
            for member in self.foca.iter_members() {
                self.outbox.packets.push((member.id().addr, packet.clone()));
            }
        }
        Ok(())
    }

    /// Leaves the mesh gracefully: peers learn at once instead of suspecting us.
    pub fn leave(&mut self) -> Result<(), MembershipError> {
        Ok(self.foca.leave_cluster(&mut self.outbox)?)
    }

    /// Takes what the last calls want done.
    pub fn drain(&mut self) -> Outbox {
        self.changes_handled = 0;
        std::mem::take(&mut self.outbox)
    }

    /// Whether no other member is active.
    pub fn is_isolated(&self) -> bool {
        self.foca.num_members() == 0
    }

    /// Every active member (alive or suspect), ourselves first, with their adverts.
    pub fn live_members(&self) -> Vec<LiveMember> {
        let adverts = self.adverts.lock().unwrap_or_else(|e| e.into_inner());
        let me = self.foca.identity();
        let mut members = vec![LiveMember {
            id: me.clone(),
            suspect: false,
            advert: self.own_advert.clone(),
        }];
        for member in self.foca.iter_members() {
            let id = member.id();
            members.push(LiveMember {
                id: id.clone(),
                suspect: member.state() == State::Suspect,
                advert: adverts.get(&id.name).cloned(),
            });
        }
        members
    }

    // Forget the adverts of members that went down, so placement stops counting them even
    // before their identity is reaped; send ours straight to members that came up.
    fn after_changes(&mut self) {
        let own = self.own_advert_packet();
        let mut adverts = self.adverts.lock().unwrap_or_else(|e| e.into_inner());
        for change in &self.outbox.changes[self.changes_handled..] {
            match change {
                Change::Down(id) => {
                    adverts.forget(&id.name, id.generation);
                    self.departed.retain(|a| *a != id.addr);
                    self.departed.push_front(id.addr);
                    self.departed.truncate(MAX_DEPARTED);
                }
                Change::Up(id) => {
                    self.departed.retain(|a| *a != id.addr);
                    if let Some(packet) = &own {
                        self.outbox.packets.push((id.addr, packet.clone()));
                    }
                }
                // The mesh forgot our advert when it declared us down: broadcast it again.
                Change::Rejoined(_) => self.last_broadcast = None,
                Change::Joined | Change::Isolated => {}
            }
        }
        self.changes_handled = self.outbox.changes.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, port: u16, generation: u64) -> MemberId {
        MemberId {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            generation,
        }
    }

    /// Carries packets between `a` (port 1) and `b` (port 2) until both are quiet; timers are
    /// not needed for a join.
    fn shuttle(a: &mut Membership, b: &mut Membership) {
        for _ in 0..10 {
            for (to, packet) in b.drain().packets {
                assert_eq!(to.port(), 1);
                a.handle_packet(&packet).unwrap();
            }
            for (to, packet) in a.drain().packets {
                assert_eq!(to.port(), 2);
                b.handle_packet(&packet).unwrap();
            }
        }
    }

    /// Node a's advert, serving `serving`.
    fn advert_of_a(serving: &[&str]) -> NodeAdvert {
        NodeAdvert {
            node: "a".into(),
            generation: 1,
            sequence: 0,
            quic: id("a", 1, 1).addr,
            http: SocketAddr::from(([127, 0, 0, 1], 8000)),
            http3: None,
            catalog: vec![],
            serving: serving.iter().map(|s| s.to_string()).collect(),
            queue_depth: 0,
            ewma_latency_us: 0,
        }
    }

    #[test]
    fn a_later_generation_wins_the_address() {
        let old = id("a", 1, 10);
        let new = id("a", 1, 11);
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
        assert_eq!(old.renew().unwrap().generation, 11);
    }

    #[test]
    fn two_cores_join_and_exchange_adverts() {
        let mut a = Membership::new(id("a", 1, 1), DetectorConfig::default(), 2, 1);
        let mut b = Membership::new(id("b", 2, 1), DetectorConfig::default(), 2, 2);
        a.advertise(advert_of_a(&["fraud"]), Duration::ZERO)
            .unwrap();
        b.join(id("a", 1, 1).addr).unwrap();
        shuttle(&mut a, &mut b);
        let seen_by_b = b.live_members();
        assert_eq!(seen_by_b.len(), 2);
        assert_eq!(seen_by_b[1].id.name, "a");
        assert_eq!(seen_by_b[1].advert.as_ref().unwrap().serving, vec!["fraud"]);
        assert_eq!(a.live_members()[1].id.name, "b");
    }

    #[test]
    fn rejoin_targets_are_seeds_and_departed_members_not_answering_now() {
        let mut a = Membership::new(id("a", 1, 1), DetectorConfig::default(), 2, 1);
        let mut b = Membership::new(id("b", 2, 1), DetectorConfig::default(), 2, 2);
        let seeds = [id("a", 1, 1).addr, id("b", 2, 1).addr, id("s", 3, 1).addr];
        assert_eq!(
            a.rejoin_targets(&seeds),
            vec![seeds[1], seeds[2]],
            "never ourselves"
        );
        b.join(seeds[0]).unwrap();
        shuttle(&mut a, &mut b);
        assert_eq!(
            a.rejoin_targets(&seeds),
            vec![seeds[2]],
            "b answers at its address"
        );
        // Members that went down are tried again, seeds or not, newest first and bounded;
        // one that answers at that address again is not.
        let down = |a: &mut Membership, member: MemberId| {
            a.outbox.changes.push(Change::Down(member));
            a.after_changes();
        };
        down(&mut a, id("c", 4, 1));
        down(&mut a, id("d", 5, 1));
        assert_eq!(
            a.rejoin_targets(&[]),
            vec![id("d", 5, 1).addr, id("c", 4, 1).addr]
        );
        down(&mut a, id("b", 2, 1));
        assert!(
            !a.rejoin_targets(&[]).contains(&seeds[1]),
            "b still answers"
        );
        for n in 0..40u16 {
            down(&mut a, id("x", 100 + n, 1));
        }
        assert_eq!(a.departed.len(), MAX_DEPARTED, "bounded");
    }

    #[test]
    fn a_material_change_goes_straight_to_every_member() {
        let mut a = Membership::new(id("a", 1, 1), DetectorConfig::default(), 2, 1);
        let mut b = Membership::new(id("b", 2, 1), DetectorConfig::default(), 2, 2);
        a.advertise(advert_of_a(&["fraud"]), Duration::ZERO)
            .unwrap();
        b.join(id("a", 1, 1).addr).unwrap();
        shuttle(&mut a, &mut b);
        // a unloads fraud: the new advert leaves at once as a packet addressed to b...
        a.advertise(advert_of_a(&[]), Duration::from_millis(10))
            .unwrap();
        let direct: Vec<_> = a
            .drain()
            .packets
            .into_iter()
            .filter(|(to, packet)| {
                *to == id("b", 2, 1).addr && packet.first() == Some(&ADVERT_PACKET)
            })
            .collect();
        assert_eq!(direct.len(), 1, "one direct advert to the one member");
        // ...and b takes it, without waiting for gossip.
        b.handle_packet(&direct[0].1).unwrap();
        let seen = b.live_members();
        let a_seen = seen.iter().find(|m| m.id.name == "a").unwrap();
        assert!(a_seen.advert.as_ref().unwrap().serving.is_empty());
        // A load-only change does not go direct.
        let mut busier = advert_of_a(&[]);
        busier.queue_depth = 9;
        a.advertise(busier, Duration::from_secs(10)).unwrap();
        assert!(
            a.drain()
                .packets
                .iter()
                .all(|(_, packet)| packet.first() != Some(&ADVERT_PACKET)),
            "load alone rides gossip"
        );
    }

    #[test]
    fn garbage_packets_are_refused() {
        let mut a = Membership::new(id("a", 1, 1), DetectorConfig::default(), 2, 1);
        assert!(a.handle_packet(&[0xff; 40]).is_err());
        assert!(a.handle_packet(&[]).is_err());
        assert!(a.live_members().len() == 1);
    }
}
