//! Membership and failure detection: SWIM, by the `foca` crate, plus each node's advert
//! (addresses, model catalog, what it serves, its load).
//!
//! [`Membership`] is the sans-IO core: it takes packets (with the node name the sender's
//! certificate proves), timer events, fetched adverts and our own advert (with the time, so it
//! needs no clock), and leaves what to send, what to schedule, which adverts to fetch and what
//! changed in its [`Outbox`].
//!
//! Who may say what: a SWIM packet counts only when its sender's identity is the node its
//! certificate names. Updates inside it about other members are hearsay: suspicion is SWIM's
//! own business (its subject refutes it), but a report that another member is down counts
//! only once [`DOWN_QUORUM`] distinct members made it; until then it is taken as suspicion
//! ([`demote_hearsay`]), and this node's own probes decide. A report that we are down never
//! counts: we refute it. So one member with a valid node certificate cannot remove another,
//! or make us rejoin. Adverts are never relayed: each node sends every member a small
//! [`AdvertNotice`] directly (when its advert changes, and every [`NOTICE_PERIOD`] with its load
//! figures), and a member holding an older advert fetches the new one from the node itself,
//! over a connection whose certificate names it. So a node certificate speaks only for its own
//! node, and an advert's size is bounded by the frame limit, not by a datagram. A member that
//! comes up is fetched from at once. [`sim`] drives many cores on virtual time;
//! `crate::cluster` drives one over QUIC datagrams, streams and tokio timers.

pub(crate) mod adverts;
pub mod sim;

use crate::wire::{AdvertNotice, ModelInFlight, NodeAdvert};
use adverts::AdvertTable;
use foca::{
    Codec, Foca, Identity, NoCustomBroadcast, Notification, PostcardCodec, Runtime, State, Timer,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

/// Largest membership packet: below the smallest QUIC datagram payload on common paths.
pub const MAX_PACKET_BYTES: usize = 1150;

/// Longest time between two notices of a node to each member (they carry its load figures,
/// and repair a lost notice of a changed advert).
pub const NOTICE_PERIOD: Duration = Duration::from_secs(5);

/// Shortest time between two notices whose only news is the requests in flight of models
/// whose replica count follows load: a little under the period the meters measure and the
/// mesh's scaling policy samples, so each new figure goes out before the next sample despite
/// timer jitter.
pub const LOAD_NOTICE_PERIOD: Duration =
    Duration::from_millis(meshserve_host::metrics::in_flight::PERIOD.as_millis() as u64 * 9 / 10);

/// Adverts fetched at once; more wait their turn, so a burst of notices (a large mesh
/// starting, or a peer that sends many) opens a bounded number of streams.
pub const MAX_FETCHES: usize = 16;

/// First byte of a membership packet: what follows.
const SWIM_PACKET: u8 = 0;
const NOTICE_PACKET: u8 = 1;

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

/// The mesh size foca's dissemination is first sized for; it grows with the members seen
/// (see [`Membership::resize`]).
const INITIAL_MESH_SIZE: u32 = 8;

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
    /// The mesh declared us down; until we rejoin, nothing we hear of others is trusted.
    Defunct,
    /// We were declared down and rejoined under a new generation.
    Rejoined(MemberId),
}

/// An advert to fetch: ask the member at `addr` for its own advert, over a connection whose
/// certificate names `node`, and hand the answer to [`Membership::advert_fetched`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertFetch {
    /// The node whose advert is wanted.
    pub node: String,
    /// Its QUIC address, as membership knows it.
    pub addr: SocketAddr,
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
    /// Adverts to fetch.
    pub fetches: Vec<AdvertFetch>,
}

impl Runtime<MemberId> for Outbox {
    fn notify(&mut self, notification: Notification<'_, MemberId>) {
        let change = match notification {
            Notification::MemberUp(id) => Change::Up(id.clone()),
            Notification::MemberDown(id) => Change::Down(id.clone()),
            Notification::Active => Change::Joined,
            Notification::Idle => Change::Isolated,
            Notification::Rejoin(id) => Change::Rejoined(id.clone()),
            Notification::Defunct => Change::Defunct,
            Notification::Rename(..) => return,
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

/// Distinct members whose reports that another member is down make it count: one member's
/// word is suspicion only.
pub const DOWN_QUORUM: usize = 2;

/// Down reports waited on at most; past it the oldest are forgotten (a report that is not
/// confirmed soon is not confirmed).
const MAX_DOWN_REPORTS: usize = 256;

/// A SWIM packet from `sender` with each report that *another* member is down (ourselves
/// included) that `counts` does not accept turned into suspicion at the same incarnation, or
/// `None` when nothing was changed. A member's own word about itself (leaving) stands.
/// Suspicion of a live member is refuted by the member; a dead one is declared down by this
/// node's own failed probe, or once enough members report it.
pub fn demote_hearsay(
    sender: &str,
    data: &[u8],
    mut counts: impl FnMut(&MemberId, foca::Incarnation) -> bool,
) -> Result<Option<Vec<u8>>, MembershipError> {
    let malformed = |e: postcard::Error| MembershipError(format!("malformed SWIM packet: {e}"));
    let mut rest = data;
    let header: foca::Header<MemberId> =
        PostcardCodec.decode_header(&mut rest).map_err(malformed)?;
    // foca reads updates after any header but a custom broadcast's, when two or more bytes
    // follow; it refuses what does not parse, so anything else is left to it unchanged.
    let Some((count, mut rest)) = rest
        .split_first_chunk::<2>()
        .filter(|_| header.message != foca::Message::Broadcast)
        .map(|(count, rest)| (u16::from_be_bytes(*count), rest))
    else {
        return Ok(None);
    };
    let mut updates = Vec::new();
    let mut demoted = false;
    for _ in 0..count {
        let Ok(update) = Codec::<MemberId>::decode_member(&mut PostcardCodec, &mut rest) else {
            return Ok(None);
        };
        if update.state() == State::Down
            && update.id().name != sender
            && !counts(update.id(), update.incarnation())
        {
            demoted = true;
            updates.push(foca::Member::new(
                update.id().clone(),
                update.incarnation(),
                State::Suspect,
            ));
        } else {
            updates.push(update);
        }
    }
    if !demoted {
        return Ok(None);
    }
    let mut packet = Vec::with_capacity(data.len());
    PostcardCodec
        .encode_header(&header, &mut packet)
        .map_err(malformed)?;
    packet.extend_from_slice(&count.to_be_bytes());
    for update in &updates {
        PostcardCodec
            .encode_member(update, &mut packet)
            .map_err(malformed)?;
    }
    packet.extend_from_slice(rest);
    Ok(Some(packet))
}

/// A SWIM ping from `from` to `to` carrying `updates`, encoded as foca encodes one: for the
/// simulation's hostile members and for tests.
pub(crate) fn swim_packet(
    from: &MemberId,
    to: &MemberId,
    updates: &[foca::Member<MemberId>],
) -> Vec<u8> {
    let header = foca::Header {
        src: from.clone(),
        src_incarnation: 0,
        dst: to.clone(),
        message: foca::Message::Ping(0),
    };
    let mut packet = vec![SWIM_PACKET];
    // Our own types always encode.
    let _ = PostcardCodec.encode_header(&header, &mut packet);
    packet.extend_from_slice(&u16::try_from(updates.len()).unwrap_or(0).to_be_bytes());
    for update in updates {
        let _ = PostcardCodec.encode_member(update, &mut packet);
    }
    packet
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

/// Who reported which member down, at which incarnation: [`DOWN_QUORUM`] distinct reporters
/// make a report count.
#[derive(Debug, Default)]
struct DownReports {
    reports: VecDeque<((MemberId, foca::Incarnation), BTreeSet<String>)>,
}

impl DownReports {
    /// Records that `sender` reports `subject` down at `incarnation`; whether enough
    /// members now have.
    fn confirm(
        &mut self,
        subject: &MemberId,
        incarnation: foca::Incarnation,
        sender: &str,
    ) -> bool {
        let key = (subject.clone(), incarnation);
        let index = match self.reports.iter().position(|(k, _)| *k == key) {
            Some(index) => index,
            None => {
                if self.reports.len() == MAX_DOWN_REPORTS {
                    self.reports.pop_front();
                }
                self.reports.push_back((key, BTreeSet::new()));
                self.reports.len() - 1
            }
        };
        let senders = &mut self.reports[index].1;
        senders.insert(sender.to_string());
        senders.len() >= DOWN_QUORUM
    }
}

/// Advert fetches in flight and waiting their turn.
#[derive(Debug, Default)]
struct Fetches {
    in_flight: BTreeSet<String>,
    waiting: VecDeque<AdvertFetch>,
    /// Nodes whose notice of a newer advert came while a fetch from them was in flight: that
    /// fetch may bring the older one, so they are asked once more when it ends (otherwise the
    /// news would wait for the node's next periodic notice).
    again: BTreeSet<String>,
}

/// The sans-IO membership core of one node.
pub struct Membership {
    foca: Foca<MemberId, PostcardCodec, StdRng, NoCustomBroadcast>,
    detector: DetectorConfig,
    /// The mesh size foca is configured for.
    sized_for: u32,
    adverts: AdvertTable,
    own_advert: Option<NodeAdvert>,
    last_notice: Option<Duration>,
    /// The requests in flight our last notice carried.
    noticed_in_flight: Vec<ModelInFlight>,
    fetches: Fetches,
    down_reports: DownReports,
    outbox: Outbox,
    changes_handled: usize,
    /// Addresses of members that went down, newest first: where the rest of a partitioned
    /// mesh, or a restarted node, may be found again.
    departed: VecDeque<SocketAddr>,
}

/// How many departed members' addresses a node keeps announcing to.
const MAX_DEPARTED: usize = 32;

impl Membership {
    /// A core for `id`; `rng_seed` makes its random choices reproducible. Real nodes and the
    /// simulation build their cores this one way.
    pub fn new(id: MemberId, detector: DetectorConfig, rng_seed: u64) -> Membership {
        let foca = Foca::new(
            id,
            detector.foca(INITIAL_MESH_SIZE),
            StdRng::seed_from_u64(rng_seed),
            PostcardCodec,
        );
        Membership {
            foca,
            detector,
            sized_for: INITIAL_MESH_SIZE,
            adverts: AdvertTable::default(),
            own_advert: None,
            last_notice: None,
            noticed_in_flight: Vec::new(),
            fetches: Fetches::default(),
            down_reports: DownReports::default(),
            outbox: Outbox::default(),
            changes_handled: 0,
            departed: VecDeque::new(),
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

    /// Our current advert, as members fetch it.
    pub fn own_advert(&self) -> Option<&NodeAdvert> {
        self.own_advert.as_ref()
    }

    /// Asks the member at `seed` to let us in.
    pub fn join(&mut self, seed: SocketAddr) -> Result<(), MembershipError> {
        Ok(self.foca.announce(MemberId::seed(seed), &mut self.outbox)?)
    }

    /// The node a packet says it comes from: what the receiver checks against the sender's
    /// certificate before the packet counts (see [`Membership::handle_packet`]).
    pub fn claimed_sender(packet: &[u8]) -> Result<String, MembershipError> {
        match packet.split_first() {
            Some((&SWIM_PACKET, data)) => {
                let header: foca::Header<MemberId> = PostcardCodec
                    .decode_header(data)
                    .map_err(|e| MembershipError(format!("malformed SWIM packet: {e}")))?;
                Ok(header.src.name)
            }
            Some((&NOTICE_PACKET, data)) => Ok(decode_notice(data)?.node),
            Some((kind, _)) => Err(MembershipError(format!("unknown packet kind {kind}"))),
            None => Err(MembershipError("empty packet".into())),
        }
    }

    /// Handles a packet from the network, sent by a peer whose certificate names node
    /// `certified`. A packet that claims to come from another node is refused: one node's
    /// certificate cannot speak for another node.
    pub fn handle_packet(&mut self, certified: &str, packet: &[u8]) -> Result<(), MembershipError> {
        let claimed = Membership::claimed_sender(packet)?;
        if claimed != certified {
            return Err(MembershipError(format!(
                "packet from the certificate of node '{certified}' claims to come from '{claimed}'"
            )));
        }
        match packet.split_first() {
            Some((&NOTICE_PACKET, data)) => self.receive_notice(decode_notice(data)?),
            Some((_, data)) => {
                // Disjoint fields: no copy of our name per packet.
                let me = &self.foca.identity().name;
                let reports = &mut self.down_reports;
                let demoted = demote_hearsay(&claimed, data, |subject, incarnation| {
                    subject.name != *me && reports.confirm(subject, incarnation, &claimed)
                })?;
                let data = demoted.as_deref().unwrap_or(data);
                let result = self.foca.handle_data(data, &mut self.outbox);
                self.after_changes();
                Ok(result?)
            }
            None => Err(MembershipError("empty packet".into())),
        }
    }

    /// Handles a timer event the core scheduled earlier.
    pub fn handle_timer(&mut self, timer: Timer<MemberId>) -> Result<(), MembershipError> {
        let result = self.foca.handle_timer(timer, &mut self.outbox);
        self.after_changes();
        Ok(result?)
    }

    // A member told us its current advert version (checked: the notice is about its sender).
    // Fetch the advert if ours is older; take the load figures if it is the same. A sender we
    // do not know yet is announced to: it then teaches us itself and more of the mesh sooner
    // than SWIM's gossip would.
    fn receive_notice(&mut self, notice: AdvertNotice) -> Result<(), MembershipError> {
        let me = self.foca.identity().clone();
        if notice.node == me.name {
            return Ok(());
        }
        let member = self
            .foca
            .iter_members()
            .find(|m| m.id().name == notice.node && m.id().addr == notice.quic)
            .map(|m| m.id().clone());
        let Some(member) = member else {
            if notice.quic != me.addr {
                self.foca
                    .announce(MemberId::seed(notice.quic), &mut self.outbox)?;
                self.after_changes();
            }
            return Ok(());
        };
        let held = self.adverts.version(&notice.node);
        if held.is_none_or(|held| held < (notice.generation, notice.sequence)) {
            self.fetch(AdvertFetch {
                node: member.name,
                addr: member.addr,
            });
        } else {
            self.adverts.update_load(&notice);
        }
        Ok(())
    }

    fn fetch(&mut self, fetch: AdvertFetch) {
        let fetches = &mut self.fetches;
        if fetches.in_flight.contains(&fetch.node) {
            fetches.again.insert(fetch.node);
            return;
        }
        if fetches.waiting.contains(&fetch) {
            return;
        }
        if fetches.in_flight.len() < MAX_FETCHES {
            fetches.in_flight.insert(fetch.node.clone());
            self.outbox.fetches.push(fetch);
        } else {
            fetches.waiting.push_back(fetch);
        }
    }

    /// Takes the answer to an [`AdvertFetch`]: `certified` is the node the answering peer's
    /// certificate names. The advert counts only when it is that node's own, at the address
    /// we asked, with names that pass the repository's rules; an error or a refused advert is
    /// fetched again at the node's next notice.
    pub fn advert_fetched(
        &mut self,
        fetch: &AdvertFetch,
        certified: &str,
        answer: Result<NodeAdvert, String>,
    ) -> Result<(), MembershipError> {
        self.fetches.in_flight.remove(&fetch.node);
        if self.fetches.again.remove(&fetch.node) {
            self.fetches.waiting.push_front(fetch.clone());
        }
        while self.fetches.in_flight.len() < MAX_FETCHES
            && let Some(next) = self.fetches.waiting.pop_front()
        {
            self.fetch(next);
        }
        let advert = answer.map_err(MembershipError)?;
        if certified != fetch.node || advert.node != fetch.node {
            return Err(MembershipError(format!(
                "asked for node '{}', the certificate of '{certified}' answered with the advert of '{}'",
                fetch.node, advert.node
            )));
        }
        if advert.quic != fetch.addr {
            return Err(MembershipError(format!(
                "node '{}' at {} advertised the address {}",
                fetch.node, fetch.addr, advert.quic
            )));
        }
        adverts::check(&advert).map_err(|e| MembershipError(e.to_string()))?;
        let still_member = self
            .foca
            .iter_members()
            .any(|m| m.id().name == advert.node && m.id().addr == advert.quic);
        if still_member {
            self.adverts.offer(advert);
        }
        Ok(())
    }

    /// Our notice as a datagram: the requests in flight it carries are cut, lightest first, to
    /// what fits in [`MAX_PACKET_BYTES`].
    fn notice_packet(&self) -> Option<Vec<u8>> {
        let advert = self.own_advert.as_ref()?;
        let mut notice = AdvertNotice::from(advert);
        let all = std::mem::take(&mut notice.in_flight);
        let base = postcard::to_allocvec(&notice).ok()?.len() + 1;
        // Postcard writes a u32 (a length prefix, a figure) in at most 5 bytes: the count
        // prefix, then per entry the name's length and two figures.
        let mut room = MAX_PACKET_BYTES.saturating_sub(base + 5);
        notice.in_flight = all
            .into_iter()
            .take_while(|load| {
                let size = load.model.len() + 3 * 5;
                let fits = size <= room;
                room = room.saturating_sub(size);
                fits
            })
            .collect();
        postcard::to_extend(&notice, vec![NOTICE_PACKET]).ok()
    }

    fn notify_members(&mut self) {
        if let Some(packet) = self.notice_packet() {
            for member in self.foca.iter_members() {
                self.outbox.packets.push((member.id().addr, packet.clone()));
            }
        }
    }

    /// Takes our current advert (addresses, catalog, load) at time `now` (any monotonic
    /// origin). A change other than load figures makes a new sequence and is noticed to every
    /// member at once; otherwise a notice goes out every [`NOTICE_PERIOD`].
    pub fn advertise(
        &mut self,
        mut advert: NodeAdvert,
        now: Duration,
    ) -> Result<(), MembershipError> {
        adverts::check(&advert).map_err(|e| MembershipError(e.to_string()))?;
        let previous = self.own_advert.as_ref();
        // Everything but the sequence and the load figures, so a field added later counts too.
        let content = |a: &NodeAdvert| NodeAdvert {
            sequence: 0,
            queue_depth: 0,
            ewma_latency_us: 0,
            in_flight: Vec::new(),
            ..a.clone()
        };
        let changed = previous.is_none_or(|old| content(old) != content(&advert));
        advert.sequence = match previous {
            Some(old) if old.generation == advert.generation => old.sequence + u64::from(changed),
            _ => 0,
        };
        let since_notice = self.last_notice.map(|at| now.saturating_sub(at));
        let due = since_notice.is_none_or(|since| {
            since >= NOTICE_PERIOD
                || (since >= LOAD_NOTICE_PERIOD && advert.in_flight != self.noticed_in_flight)
        });
        self.own_advert = Some(advert);
        if changed || due {
            self.last_notice = Some(now);
            self.noticed_in_flight = self
                .own_advert
                .as_ref()
                .map(|a| a.in_flight.clone())
                .unwrap_or_default();
            self.notify_members();
        }
        Ok(())
    }

    /// The incarnation this node knows `member` by, if it knows the member at all.
    pub(crate) fn known_incarnation(&self, member: &MemberId) -> Option<foca::Incarnation> {
        self.foca
            .iter_membership_state()
            .find(|m| m.id() == member)
            .map(foca::Member::incarnation)
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
        self.members()
            .map(|(id, suspect, advert)| LiveMember {
                id: id.clone(),
                suspect,
                advert: advert.cloned(),
            })
            .collect()
    }

    /// As [`Membership::live_members`], borrowed: each member's identity, whether it is
    /// suspect, and its advert (the one fetched from it at its current address).
    pub fn members(&self) -> impl Iterator<Item = (&MemberId, bool, Option<&NodeAdvert>)> {
        let me = (self.foca.identity(), false, self.own_advert.as_ref());
        let others = self.foca.iter_members().map(|member| {
            let id = member.id();
            let advert = self.adverts.get(&id.name).filter(|a| a.quic == id.addr);
            (id, member.state() == State::Suspect, advert)
        });
        std::iter::once(me).chain(others)
    }

    // Foca's dissemination (how many times an update is retransmitted) depends on the mesh
    // size; a node only knows its seeds when it starts, so the size follows what it sees.
    fn resize(&mut self) {
        let seen = u32::try_from(self.foca.num_members() + 1).unwrap_or(u32::MAX);
        let size = seen.checked_next_power_of_two().unwrap_or(u32::MAX);
        if size > self.sized_for && self.foca.set_config(self.detector.foca(size)).is_ok() {
            self.sized_for = size;
        }
    }

    // Forget the adverts of members that went down, so placement stops counting them even
    // before their identity is reaped; a member that comes up gets our notice and is fetched
    // from.
    fn after_changes(&mut self) {
        let changes = self.outbox.changes[self.changes_handled..].to_vec();
        self.changes_handled = self.outbox.changes.len();
        let notice = self.notice_packet();
        for change in changes {
            match change {
                Change::Down(id) => {
                    self.adverts.forget(&id.name, id.generation);
                    self.departed.retain(|a| *a != id.addr);
                    self.departed.push_front(id.addr);
                    self.departed.truncate(MAX_DEPARTED);
                    self.fetches.waiting.retain(|f| f.node != id.name);
                }
                Change::Up(id) => {
                    self.departed.retain(|a| *a != id.addr);
                    if let Some(packet) = &notice {
                        self.outbox.packets.push((id.addr, packet.clone()));
                    }
                    self.fetch(AdvertFetch {
                        node: id.name,
                        addr: id.addr,
                    });
                }
                Change::Defunct | Change::Rejoined(_) | Change::Joined | Change::Isolated => {}
            }
        }
        self.resize();
    }
}

fn decode_notice(data: &[u8]) -> Result<AdvertNotice, MembershipError> {
    postcard::from_bytes(data).map_err(|e| MembershipError(format!("malformed advert notice: {e}")))
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

    /// Carries packets and advert fetches between `a` (port 1) and `b` (port 2) until both
    /// are quiet, each packet certified as its sender's; timers are not needed for a join.
    fn shuttle(a: &mut Membership, b: &mut Membership) {
        for _ in 0..10 {
            deliver(b, a);
            deliver(a, b);
        }
    }

    /// Hands what `from` wants sent to `to`, answering its fetches with `to`'s advert.
    fn deliver(from: &mut Membership, to: &mut Membership) {
        let sender = from.id().name.clone();
        let outbox = from.drain();
        for (addr, packet) in outbox.packets {
            assert_eq!(addr, to.id().addr);
            to.handle_packet(&sender, &packet).unwrap();
        }
        for fetch in outbox.fetches {
            assert_eq!(fetch.addr, to.id().addr);
            let advert = to
                .own_advert()
                .cloned()
                .ok_or_else(|| "none yet".to_string());
            let certified = to.id().name.clone();
            let _ = from.advert_fetched(&fetch, &certified, advert);
        }
    }

    /// Node a's advert, serving `serving`.
    fn advert_of_a(serving: &[&str]) -> NodeAdvert {
        NodeAdvert {
            http: SocketAddr::from(([127, 0, 0, 1], 8000)),
            serving: serving.iter().map(|s| s.to_string()).collect(),
            ..NodeAdvert::empty("a", id("a", 1, 1).addr)
        }
    }

    fn core(name: &str, port: u16) -> Membership {
        Membership::new(
            id(name, port, 1),
            DetectorConfig::default(),
            u64::from(port),
        )
    }

    /// a (serving `serving`) and b, joined through a.
    fn joined_pair(serving: &[&str]) -> (Membership, Membership) {
        let (mut a, mut b) = (core("a", 1), core("b", 2));
        a.advertise(advert_of_a(serving), Duration::ZERO).unwrap();
        b.join(id("a", 1, 1).addr).unwrap();
        shuttle(&mut a, &mut b);
        (a, b)
    }

    fn seen<'a>(members: &'a [LiveMember], name: &str) -> Option<&'a NodeAdvert> {
        members.iter().find(|m| m.id.name == name)?.advert.as_ref()
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
        let (a, b) = joined_pair(&["fraud"]);
        let seen_by_b = b.live_members();
        assert_eq!(seen_by_b.len(), 2);
        assert_eq!(seen_by_b[1].id.name, "a");
        assert_eq!(seen(&seen_by_b, "a").unwrap().serving, vec!["fraud"]);
        assert_eq!(a.live_members()[1].id.name, "b");
    }

    #[test]
    fn rejoin_targets_are_seeds_and_departed_members_not_answering_now() {
        let (mut a, mut b) = (core("a", 1), core("b", 2));
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
    fn a_changed_advert_is_noticed_to_every_member_and_fetched_from_its_node() {
        let (mut a, mut b) = joined_pair(&["fraud"]);
        // a unloads fraud: a notice leaves at once for b...
        a.advertise(advert_of_a(&[]), Duration::from_millis(10))
            .unwrap();
        let notices: Vec<_> = a.drain().packets;
        assert_eq!(notices.len(), 1, "one notice to the one member");
        assert_eq!(notices[0].0, id("b", 2, 1).addr);
        assert_eq!(notices[0].1.first(), Some(&NOTICE_PACKET));
        // ...b asks a for the new advert, and takes it.
        b.handle_packet("a", &notices[0].1).unwrap();
        let fetches = b.drain().fetches;
        assert_eq!(
            fetches,
            vec![AdvertFetch {
                node: "a".into(),
                addr: id("a", 1, 1).addr
            }]
        );
        b.advert_fetched(&fetches[0], "a", Ok(a.own_advert().unwrap().clone()))
            .unwrap();
        assert!(seen(&b.live_members(), "a").unwrap().serving.is_empty());
        // A load-only change makes no new sequence and waits for the notice period; its
        // notice carries the load, which b takes without fetching.
        let mut busier = advert_of_a(&[]);
        busier.queue_depth = 9;
        a.advertise(busier.clone(), Duration::from_secs(1)).unwrap();
        assert!(a.drain().packets.is_empty(), "load alone waits");
        a.advertise(busier, NOTICE_PERIOD + Duration::from_millis(10))
            .unwrap();
        let notice = a.drain().packets.remove(0).1;
        b.handle_packet("a", &notice).unwrap();
        assert!(
            b.drain().fetches.is_empty(),
            "same sequence: nothing to fetch"
        );
        assert_eq!(seen(&b.live_members(), "a").unwrap().queue_depth, 9);
        // A changed endpoint folder is news at once, as a changed model is.
        let mut with_endpoint = advert_of_a(&[]);
        with_endpoint.endpoints.push(crate::wire::EndpointEntry {
            name: "fraud-check".into(),
            model: "fraud".into(),
            digest: [3; 32],
            bytes: 10,
            headers: Vec::new(),
        });
        let before = a.own_advert().unwrap().sequence;
        a.advertise(with_endpoint, NOTICE_PERIOD + Duration::from_millis(20))
            .unwrap();
        assert_eq!(a.own_advert().unwrap().sequence, before + 1);
        assert_eq!(a.drain().packets.len(), 1, "noticed at once");
    }

    #[test]
    fn load_figures_are_noticed_each_period_and_cut_to_fit_a_datagram() {
        let (mut a, mut b) = joined_pair(&["fraud"]);
        let loaded = |milli: u32, models: usize| {
            let mut advert = advert_of_a(&["fraud"]);
            advert.in_flight = (0..models)
                .map(|i| ModelInFlight {
                    model: format!("m{i:04}"),
                    milli: milli - i as u32,
                    // The longest encoding of a figure.
                    wait_us: u32::MAX,
                })
                .collect();
            advert
        };
        a.advertise(loaded(5_000, 1), Duration::from_secs(10))
            .unwrap();
        a.drain();
        // New figures wait for LOAD_NOTICE_PERIOD, not NOTICE_PERIOD; the same figures wait.
        a.advertise(
            loaded(6_000, 1),
            Duration::from_secs(10) + LOAD_NOTICE_PERIOD / 2,
        )
        .unwrap();
        assert!(a.drain().packets.is_empty(), "too soon");
        let second = Duration::from_secs(10) + LOAD_NOTICE_PERIOD;
        a.advertise(loaded(6_000, 1), second).unwrap();
        let notice = a.drain().packets.remove(0).1;
        b.handle_packet("a", &notice).unwrap();
        let held = seen(&b.live_members(), "a").cloned().unwrap();
        assert_eq!(held.in_flight[0].milli, 6_000);
        a.advertise(loaded(6_000, 1), second + LOAD_NOTICE_PERIOD)
            .unwrap();
        assert!(a.drain().packets.is_empty(), "unchanged figures wait");
        // A thousand busy models, every figure at its longest encoding: the busiest that fit,
        // in one datagram.
        a.advertise(loaded(u32::MAX, 1000), second + 2 * LOAD_NOTICE_PERIOD)
            .unwrap();
        let notice = a.drain().packets.remove(0).1;
        assert!(notice.len() <= MAX_PACKET_BYTES, "{} bytes", notice.len());
        b.handle_packet("a", &notice).unwrap();
        let held = seen(&b.live_members(), "a").cloned().unwrap();
        assert!(held.in_flight.len() >= 10, "{}", held.in_flight.len());
        assert_eq!(held.in_flight[0].milli, u32::MAX, "the busiest first");
    }

    #[test]
    fn packets_claiming_another_node_than_the_certificate_are_refused() {
        let (mut a, mut b) = joined_pair(&["fraud"]);
        // A member with the certificate of "evil" announces itself as "a2" and as "a".
        for name in ["a2", "a"] {
            let mut impostor = Membership::new(id(name, 9, 99), DetectorConfig::default(), 9);
            impostor.join(id("b", 2, 1).addr).unwrap();
            let (_, join) = impostor.drain().packets.remove(0);
            let error = b.handle_packet("evil", &join).unwrap_err().to_string();
            assert!(error.contains("claims to come from"), "{error}");
        }
        assert_eq!(b.live_members().len(), 2, "no member was added");
        // A notice about a, sent by a's peer b: refused too.
        a.advertise(advert_of_a(&[]), Duration::from_millis(10))
            .unwrap();
        let notice = a.drain().packets.remove(0).1;
        assert!(b.handle_packet("c", &notice).is_err());
        assert!(b.drain().fetches.is_empty());
        // The same notice with a's certificate counts.
        b.handle_packet("a", &notice).unwrap();
        assert_eq!(b.drain().fetches.len(), 1);
    }

    #[test]
    fn a_fetched_advert_counts_only_from_its_node_at_its_address() {
        let (a, mut b) = joined_pair(&[]);
        let fetch = AdvertFetch {
            node: "a".into(),
            addr: id("a", 1, 1).addr,
        };
        let mut forged = advert_of_a(&["fraud"]);
        forged.sequence = 99;
        // Answered by the certificate of another node.
        assert!(b.advert_fetched(&fetch, "c", Ok(forged.clone())).is_err());
        // a's certificate, but another node's advert.
        let mut other = forged.clone();
        other.node = "c".into();
        assert!(b.advert_fetched(&fetch, "a", Ok(other)).is_err());
        // Another address than the member's.
        let mut moved = forged.clone();
        moved.quic = id("a", 9, 1).addr;
        assert!(b.advert_fetched(&fetch, "a", Ok(moved)).is_err());
        // A path for a model name.
        let mut path = forged.clone();
        path.serving = vec!["../../x".into()];
        assert!(b.advert_fetched(&fetch, "a", Ok(path)).is_err());
        assert!(seen(&b.live_members(), "a").unwrap().serving.is_empty());
        // From a itself: taken.
        b.advert_fetched(&fetch, "a", Ok(forged)).unwrap();
        assert_eq!(seen(&b.live_members(), "a").unwrap().serving, vec!["fraud"]);
        drop(a);
    }

    #[test]
    fn an_advert_of_200_models_reaches_the_mesh() {
        let (mut a, mut b) = (core("a", 1), core("b", 2));
        let mut advert = advert_of_a(&[]);
        advert.catalog = (0..200)
            .map(|i| crate::wire::CatalogEntry {
                model: format!("model-with-a-long-name-{i:04}"),
                replicas: 2,
                digest: [7; 32],
                bytes: 1 << 20,
                scaling: None,
            })
            .collect();
        advert.serving = advert.catalog.iter().map(|e| e.model.clone()).collect();
        assert!(postcard::to_allocvec(&advert).unwrap().len() > 4 * MAX_PACKET_BYTES);
        a.advertise(advert, Duration::ZERO).unwrap();
        b.join(id("a", 1, 1).addr).unwrap();
        shuttle(&mut a, &mut b);
        let held = seen(&b.live_members(), "a").cloned().unwrap();
        assert_eq!((held.catalog.len(), held.serving.len()), (200, 200));
        assert!(
            b.drain()
                .packets
                .iter()
                .chain(&a.drain().packets)
                .all(|(_, p)| p.len() <= MAX_PACKET_BYTES),
            "every datagram still fits"
        );
    }

    #[test]
    fn advert_fetches_in_flight_are_bounded() {
        let mut b = core("b", 2);
        for n in 0..(MAX_FETCHES as u16 + 4) {
            let fetch = AdvertFetch {
                node: format!("n{n}"),
                addr: id("n", 100 + n, 1).addr,
            };
            b.fetch(fetch.clone());
            b.fetch(fetch);
        }
        let issued = b.drain().fetches;
        assert_eq!(
            issued.len(),
            MAX_FETCHES,
            "the rest wait; duplicates are one fetch"
        );
        b.advert_fetched(&issued[0], "n0", Err("gone".into()))
            .unwrap_err();
        assert_eq!(b.drain().fetches.len(), 1, "an answer lets the next one go");
    }

    #[test]
    fn a_notice_that_comes_while_its_nodes_advert_is_being_fetched_is_fetched_after() {
        let (mut a, mut b) = joined_pair(&[]);
        a.advertise(advert_of_a(&["fraud"]), Duration::from_millis(10))
            .unwrap();
        let first = a.own_advert().unwrap().clone();
        b.handle_packet("a", &a.drain().packets.remove(0).1)
            .unwrap();
        let fetches = b.drain().fetches;
        assert_eq!(fetches.len(), 1);
        // a changes again while b's fetch is on its way, and the fetch brings the first.
        a.advertise(advert_of_a(&[]), Duration::from_millis(20))
            .unwrap();
        b.handle_packet("a", &a.drain().packets.remove(0).1)
            .unwrap();
        assert!(b.drain().fetches.is_empty(), "one fetch per node at a time");
        b.advert_fetched(&fetches[0], "a", Ok(first)).unwrap();
        let again = b.drain().fetches;
        assert_eq!(again, fetches, "asked once more");
        b.advert_fetched(&again[0], "a", Ok(a.own_advert().unwrap().clone()))
            .unwrap();
        assert!(seen(&b.live_members(), "a").unwrap().serving.is_empty());
        assert!(b.drain().fetches.is_empty(), "and no more");
    }

    #[test]
    fn garbage_packets_are_refused() {
        let mut a = core("a", 1);
        assert!(a.handle_packet("b", &[0xff; 40]).is_err());
        assert!(a.handle_packet("b", &[0, 0xff, 0xff]).is_err());
        assert!(a.handle_packet("b", &[]).is_err());
        assert!(a.live_members().len() == 1);
    }
}
