//! The membership shell: one task owns the [`Membership`] core and feeds it datagrams (with
//! the node name their sender's certificate proves), timer events, fetched adverts and our
//! own; what the core asks for becomes QUIC datagrams, advert fetches over streams and tokio
//! timers, and every change of the live members is published as a new [`MeshView`].

use crate::cluster::MeshView;
use crate::membership::{AdvertFetch, Change, LiveMember, MemberId, Membership};
use crate::placement::scale::{self, Scaler};
use crate::placement::{self, Publishers};
use crate::transport::MeshEndpoint;
use crate::wire::{Message, NodeAdvert, ScaleStatus, Scaling, WIRE_VERSION};
use bytes::Bytes;
use foca::Timer;
use meshserve_host::metrics::Metrics;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// How often an isolated node announces itself to its seeds again.
const REJOIN_PERIOD: Duration = Duration::from_secs(1);

/// Every this many rejoin periods, a node that is not alone announces itself to the seeds and
/// departed members that are not live members now (see [`Membership::rejoin_targets`]).
const REANNOUNCE_EVERY: u32 = 5;

/// How long fetching one advert may take.
const ADVERT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Test-only: a node started with this variable set to a member's name tells every other
/// member, every rejoin period, that the named member is down, as a hostile member with a
/// valid node certificate could; the tests check that such reports change nothing.
pub const CLAIM_DOWN_ENV: &str = "MESHSERVE_TEST_CLAIM_DOWN";

/// A membership datagram from a peer (version byte removed), with the node its certificate
/// names.
pub(crate) type Packet = (Arc<str>, Bytes);

/// What the shell takes in.
pub(crate) enum Input {
    /// A membership datagram from a peer node.
    Packet(Packet),
    /// The answer to an advert fetch, from a peer whose certificate names the fetched node.
    Fetched(AdvertFetch, Result<NodeAdvert, String>),
    /// A timer the core scheduled.
    Timer(Timer<MemberId>),
    /// Our advert, to (re)publish.
    Advert(NodeAdvert),
    /// Leave the mesh, then confirm.
    Leave(oneshot::Sender<()>),
}

/// Membership datagrams waiting for the shell; past this, new ones are dropped (as a full
/// socket buffer would), so a peer flooding datagrams cannot grow the node's memory.
pub(crate) const PACKET_QUEUE: usize = 1024;

/// Prefixes a membership packet with the wire version, as every datagram is.
fn datagram(packet: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(packet.len() + 1);
    out.push(WIRE_VERSION);
    out.extend_from_slice(packet);
    Bytes::from(out)
}

/// What the rest of the node holds of a running shell.
pub(crate) struct ShellHandles {
    /// Inputs other than peers' datagrams.
    pub input: mpsc::UnboundedSender<Input>,
    /// The bounded queue for peers' datagrams.
    pub packets: mpsc::Sender<Packet>,
    /// The published view.
    pub view: watch::Receiver<Arc<MeshView>>,
    /// Our own advert as membership holds it (with its sequence), set before any notice of it
    /// goes out: what a member fetching it must get, even before the view includes it.
    pub own_advert: watch::Receiver<Option<Arc<NodeAdvert>>>,
}

/// Starts the shell.
pub(crate) fn spawn(
    core: Membership,
    endpoint: MeshEndpoint,
    seeds: watch::Receiver<Vec<SocketAddr>>,
    publishers: Publishers,
    metrics: Arc<Metrics>,
) -> ShellHandles {
    let (input_tx, input_rx) = mpsc::unbounded_channel();
    let (packet_tx, packet_rx) = mpsc::channel(PACKET_QUEUE);
    let members = core.live_members();
    let (view_tx, view_rx) = watch::channel(Arc::new(MeshView::from_members(
        members.clone(),
        &publishers,
        Vec::new(),
    )));
    let (members_tx, members_rx) = watch::channel(members);
    let (own_tx, own_rx) = watch::channel(None);
    tokio::spawn(build_views(members_rx, view_tx, publishers, metrics));
    let shell = Shell {
        core,
        endpoint,
        seeds,
        input: input_tx.clone(),
        members: members_tx,
        own_advert: own_tx,
        started: std::time::Instant::now(),
        claims_down: std::env::var(CLAIM_DOWN_ENV)
            .ok()
            .filter(|name| !name.is_empty()),
    };
    if let Some(name) = &shell.claims_down {
        tracing::warn!(member = %name, "{CLAIM_DOWN_ENV} is set: this node lies that the member is down (for tests only)");
    }
    tokio::spawn(shell.run(input_rx, packet_rx));
    ShellHandles {
        input: input_tx,
        packets: packet_tx,
        view: view_rx,
        own_advert: own_rx,
    }
}

struct Shell {
    core: Membership,
    endpoint: MeshEndpoint,
    /// The seeds' current addresses, re-resolved by [`super::seeds::watch`].
    seeds: watch::Receiver<Vec<SocketAddr>>,
    input: mpsc::UnboundedSender<Input>,
    /// The live members, for [`build_views`].
    members: watch::Sender<Vec<LiveMember>>,
    own_advert: watch::Sender<Option<Arc<NodeAdvert>>>,
    started: std::time::Instant,
    /// See [`CLAIM_DOWN_ENV`].
    claims_down: Option<String>,
}

impl Shell {
    async fn run(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<Input>,
        mut packets: mpsc::Receiver<Packet>,
    ) {
        self.join_seeds();
        let mut rejoin = tokio::time::interval(REJOIN_PERIOD);
        rejoin.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                input = inputs.recv() => {
                    let Some(input) = input else { break };
                    let leaving = self.handle(input);
                    self.flush();
                    if let Some(done) = leaving {
                        let _ = done.send(());
                        break;
                    }
                }
                Some(packet) = packets.recv() => {
                    self.handle(Input::Packet(packet));
                    self.flush();
                }
                // New addresses under the seeds' names (a pod came up): announce to them now.
                Ok(()) = self.seeds.changed() => {
                    self.join_seeds();
                    self.flush();
                }
                _ = rejoin.tick() => {
                    ticks = ticks.wrapping_add(1);
                    if let Some(subject) = &self.claims_down {
                        self.claim_down(subject);
                    }
                    let isolated = self.core.is_isolated();
                    let seeds = self.seeds.borrow().clone();
                    if isolated && !seeds.is_empty() {
                        self.check_seeds(&seeds);
                    }
                    if isolated || ticks.is_multiple_of(REANNOUNCE_EVERY) {
                        for addr in self.core.rejoin_targets(&seeds) {
                            if let Err(e) = self.core.join(addr) {
                                tracing::debug!(%addr, error = %e, "cannot announce");
                            }
                        }
                        self.flush();
                    }
                }
            }
        }
    }

    fn handle(&mut self, input: Input) -> Option<oneshot::Sender<()>> {
        let result = match input {
            Input::Packet((sender, packet)) => self.core.handle_packet(&sender, &packet),
            Input::Fetched(fetch, answer) => {
                // The transport checked the answering certificate names the fetched node.
                let result = self.core.advert_fetched(&fetch, &fetch.node, answer);
                if let Err(e) = &result {
                    tracing::debug!(node = %fetch.node, addr = %fetch.addr, error = %e, "advert not taken");
                }
                result
            }
            Input::Timer(timer) => self.core.handle_timer(timer),
            Input::Advert(advert) => {
                let result = self.core.advertise(advert, self.started.elapsed());
                // Before `flush` sends the notice of it.
                let own = self.core.own_advert().cloned().map(Arc::new);
                self.own_advert.send_replace(own);
                result
            }
            Input::Leave(done) => {
                if let Err(e) = self.core.leave() {
                    tracing::warn!(error = %e, "could not announce our leave");
                }
                return Some(done);
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "membership input refused");
        }
        None
    }

    /// Tells every other live member that `subject` is down, at the incarnation we know it by.
    fn claim_down(&self, subject: &str) {
        let members = self.core.live_members();
        let Some(subject) = members.iter().find(|m| m.id.name == subject) else {
            return;
        };
        let incarnation = self.core.known_incarnation(&subject.id).unwrap_or_default();
        let claim = [foca::Member::new(
            subject.id.clone(),
            incarnation,
            foca::State::Down,
        )];
        for member in &members {
            if member.id != subject.id && member.id != *self.core.id() {
                let packet = crate::membership::swim_packet(self.core.id(), &member.id, &claim);
                self.endpoint
                    .send_datagram(member.id.addr, datagram(&packet));
            }
        }
    }

    fn join_seeds(&mut self) {
        let me = self.core.id().addr;
        let seeds = self.seeds.borrow_and_update().clone();
        for seed in seeds {
            if seed != me
                && let Err(e) = self.core.join(seed)
            {
                tracing::warn!(%seed, error = %e, "cannot announce to seed");
            }
        }
    }

    // While isolated, say why the seeds cannot be reached: a wrong certificate or a closed port
    // is something the operator must see, not a silent retry loop. In a task of its own, so a
    // slow handshake never holds up membership packets.
    fn check_seeds(&self, seeds: &[SocketAddr]) {
        let me = self.core.id().addr;
        let seeds: Vec<SocketAddr> = seeds.iter().copied().filter(|s| *s != me).collect();
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            for seed in seeds {
                if let Err(e) = endpoint.connection(seed).await {
                    tracing::warn!(%seed, error = %e, "no other member reachable; retrying seed");
                }
            }
        });
    }

    fn flush(&mut self) {
        let outbox = self.core.drain();
        for (addr, packet) in outbox.packets {
            self.endpoint.send_datagram(addr, datagram(&packet));
        }
        for fetch in outbox.fetches {
            let endpoint = self.endpoint.clone();
            let input = self.input.clone();
            tokio::spawn(async move {
                let answer = match endpoint
                    .call_node(
                        fetch.addr,
                        &fetch.node,
                        &Message::AdvertQuery,
                        ADVERT_FETCH_TIMEOUT,
                    )
                    .await
                {
                    Ok(Message::Advert(advert)) => Ok(advert),
                    Ok(Message::Failure(failure)) => Err(failure.message),
                    Ok(other) => Err(format!("answered an advert query with {other:?}")),
                    Err(e) => {
                        if matches!(e, crate::transport::TransportError::NotThatNode { .. }) {
                            crate::warn_throttled!(error = %e, "advert refused");
                        }
                        Err(e.to_string())
                    }
                };
                let _ = input.send(Input::Fetched(fetch, answer));
            });
        }
        for (after, timer) in outbox.timers {
            let input = self.input.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = input.send(Input::Timer(timer));
            });
        }
        for change in &outbox.changes {
            match change {
                Change::Up(id) => {
                    tracing::info!(member = %id.name, addr = %id.addr, "member up");
                }
                Change::Down(id) => {
                    tracing::warn!(member = %id.name, addr = %id.addr, "member down (left or failed)");
                    // Calls in flight to it fail now and go to another replica, instead of
                    // waiting for QUIC's idle timeout.
                    self.endpoint.drop_peer(id.addr);
                }
                Change::Joined => tracing::info!("joined the mesh"),
                Change::Isolated => {
                    tracing::warn!("no other member left; announcing to the seeds again");
                }
                Change::Defunct => {
                    tracing::warn!(
                        "declared down by the mesh (paused or cut off too long); rejoining"
                    );
                }
                Change::Rejoined(id) => {
                    tracing::warn!(
                        generation = id.generation,
                        "declared down by the mesh; rejoined"
                    );
                }
            }
        }
        let members = self.core.live_members();
        self.members.send_if_modified(|current| {
            let changed = *current != members;
            if changed {
                *current = members;
            }
            changed
        });
    }
}

/// Turns each new membership into the view requests and placement read, off the membership
/// task: computing a plan over hundreds of models takes a while, and a burst of adverts must
/// not delay the answers to probes (a node slow to answer is suspected). Changes that arrive
/// while a view is being built are taken together in the next one. Every
/// [`scale::SAMPLE_PERIOD`] the load-following replica counts take a sample of the members'
/// load, and a changed count makes a new view too.
async fn build_views(
    mut members: watch::Receiver<Vec<LiveMember>>,
    view: watch::Sender<Arc<MeshView>>,
    publishers: Publishers,
    metrics: Arc<Metrics>,
) {
    let mut scaler = Scaler::default();
    let mut sample = tokio::time::interval(scale::SAMPLE_PERIOD);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = members.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = sample.tick() => {
                let latest = members.borrow().clone();
                let adverts: Vec<&NodeAdvert> =
                    latest.iter().filter_map(|m| m.advert.as_ref()).collect();
                let scaled = placement::published_scaling(&adverts, &publishers);
                let changes = scaler.sample(&scaled, &adverts);
                for change in &changes {
                    tracing::info!(
                        model = %change.model,
                        from = change.from,
                        to = change.to,
                        in_flight = format!("{:.1}", change.in_flight),
                        reason = %change.reason,
                        "replica count changed"
                    );
                    metrics.record_replica_change(&change.model, change.to > change.from);
                }
                for (model, count) in scaler.counts() {
                    metrics.set_replicas_target(&model, count);
                }
                let shown = scale_status(&scaler, &scaled);
                if changes.is_empty() && view.borrow().scaling == shown {
                    continue;
                }
            }
        }
        let latest = members.borrow_and_update().clone();
        let scaled = {
            let adverts: Vec<&NodeAdvert> =
                latest.iter().filter_map(|m| m.advert.as_ref()).collect();
            placement::published_scaling(&adverts, &publishers)
        };
        let next = Arc::new(MeshView::from_members(
            latest,
            &publishers,
            scale_status(&scaler, &scaled),
        ));
        let previous = view.send_replace(next.clone());
        log_suspicion(&previous.members, &next.members);
        log_moves(&placement::moves(&previous.plan, &next.plan));
        // Let the membership task (and requests) run between two views.
        tokio::task::yield_now().await;
    }
}

/// What the view shows of each load-following model: its bounds, the count this node's
/// policy decided (the minimum before its first sample), the load and the last change.
fn scale_status(scaler: &Scaler, scaled: &BTreeMap<String, Scaling>) -> Vec<ScaleStatus> {
    scaled
        .iter()
        .map(|(model, scaling)| {
            let (count, in_flight, last) = scaler.state(model).unwrap_or((scaling.min, 0.0, None));
            ScaleStatus {
                model: model.clone(),
                scaling: *scaling,
                count,
                in_flight_milli: (in_flight * 1000.0).round().clamp(0.0, f64::from(u32::MAX))
                    as u32,
                last_change: last.map(|c| format!("{} -> {}: {}", c.from, c.to, c.reason)),
            }
        })
        .collect()
}

/// Members that became suspect, or were cleared, between two views (up and down are
/// logged from membership's own notifications).
fn log_suspicion(before: &[LiveMember], after: &[LiveMember]) {
    for member in after {
        let was = before.iter().find(|b| b.id == member.id).map(|b| b.suspect);
        match (was, member.suspect) {
            (Some(false), true) => {
                tracing::warn!(member = %member.id.name, addr = %member.id.addr, "member suspected (not answering probes)");
            }
            (Some(true), false) => {
                tracing::info!(member = %member.id.name, "member no longer suspected");
            }
            _ => {}
        }
    }
}

/// Placement changes logged one by one, at most this many per change of the view; the rest
/// are counted in one line (a node joining a mesh of 200-model catalogs moves about half).
const MOVES_LOGGED: usize = 16;

fn log_moves(moves: &[placement::Move]) {
    for moved in moves.iter().take(MOVES_LOGGED) {
        tracing::info!(model = %moved.model, from = ?moved.from, to = ?moved.to, "placement changed");
    }
    if moves.len() > MOVES_LOGGED {
        tracing::info!(
            more = moves.len() - MOVES_LOGGED,
            "placement changed for more models"
        );
    }
}
