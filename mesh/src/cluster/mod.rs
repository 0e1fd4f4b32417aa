//! A node's part in the mesh: its QUIC endpoint, its membership shell ([`gossip`]), the
//! `meshserve/1` service ([`service`]), forwarding to replicas, and placement-driven loading
//! and unloading ([`reconcile`]).
//!
//! Everything a request needs to route is in one immutable [`MeshView`] (live members, their
//! adverts, the placement plan), replaced whenever membership changes, so the request path
//! reads a snapshot and never waits on the membership task.

mod adverts;
pub mod bundle;
mod connections;
mod gossip;
mod handshakes;
mod memory;
mod reconcile;
pub mod seeds;
mod service;

pub use gossip::CLAIM_DOWN_ENV;
pub use handshakes::{HANDSHAKE_TIMEOUT, HANDSHAKES_PER_ADDRESS};
pub use service::{
    CLIENT_CONNECTIONS_REFUSAL, CLIENT_DATAGRAM_REFUSAL, CONNECTIONS_PER_NODE_CERTIFICATE, Calls,
    NODE_CONNECTIONS_REFUSAL,
};

use crate::membership::{DetectorConfig, LiveMember, MemberId, Membership};
use crate::placement::{self, Publishers};
use crate::routing::balance::{Balancer, PeakEwma};
use crate::routing::replicas::{self, Attempt, Retry, Targets, Unanswered};
use crate::routing::retry::{self, Attempts, Decision, Failed, RetryPolicy};
use crate::transport::{MeshEndpoint, MeshIdentity, TransportError};
use crate::wire::{
    CatalogEntry, EndpointAnswer, EndpointCall, EndpointEntry, Failure, FailureClass, InferAnswer,
    InferCall, MemberStatus, MeshStatus, Message, MetadataQuery, ModelInFlight, ModelLoadReport,
    NodeAdvert, NodeLoads, Replica, RouteHint, RouteTable, ScaleStatus, Scaling,
};
use meshserve_host::{Engine, endpoint};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};

/// The longest queue wait a member's report can add to its replica's cost.
const MAX_REPORTED_WAIT: Duration = Duration::from_secs(10);

/// How often a node re-publishes its advert (with fresh load figures) and reconciles placement.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);

/// A fetch a holder refused: the holder, the model and the digest asked for.
type RefusedFetch = (String, String, [u8; 32]);

/// Model fetches (whole folders or chunks) a node serves at once; more wait a little and are
/// then refused (retry later), so peers asking for models cannot make it read many at once.
const MAX_FETCHES_SERVED: usize = 2;

/// Models a node fetches and loads at once; the others placed here wait their turn.
const MAX_ARRIVALS: usize = 2;

/// When to retry a model the mesh holds but no replica serves at the moment, in ms.
const NO_REPLICA_RETRY_MS: u64 = 1000;

/// What a node needs to join a mesh.
pub struct ClusterConfig {
    /// This node's name, unique in the mesh.
    pub name: String,
    /// UDP address to bind.
    pub listen: SocketAddr,
    /// Address peers reach us at; defaults to the bound address.
    pub advertise: Option<SocketAddr>,
    /// The HTTP front door's address, advertised to clients.
    pub http: SocketAddr,
    /// The HTTP/3 front door's address, when it is on.
    pub http3: Option<SocketAddr>,
    /// The seeds' mesh addresses, kept current by [`seeds::watch`].
    pub seeds: watch::Receiver<Vec<SocketAddr>>,
    /// Our certificate, key and the mesh CA.
    pub identity: MeshIdentity,
    /// Failure detection timing.
    pub detector: DetectorConfig,
    /// Largest frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Frame bytes buffered at once over every peer and stream.
    pub max_frame_bytes_in_flight: usize,
    /// Connections client certificates may hold open at once.
    pub max_client_connections: usize,
    /// Handshakes in progress at once on the mesh port (`mesh.max_handshakes`).
    pub max_handshakes: usize,
    /// Whose model repositories are authoritative (`mesh.publishers`).
    pub publishers: Publishers,
    /// Longest a forwarded request may take, when it sets no deadline itself.
    pub forward_timeout: Duration,
    /// Time a peer has to send a whole frame on a stream it opened.
    pub frame_read_timeout: Duration,
    /// Memory the models placed here may take (`mesh.max_model_memory_bytes`).
    pub model_memory_budget: Option<u64>,
}

/// Why a node could not join a mesh.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The endpoint could not start.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Our certificate is not this node's: peers would refuse everything we say.
    #[error(
        "the node certificate does not name node '{0}' (it must carry the DNS name {0}.node.meshserve); issue one with `meshserve certs --node {0}`"
    )]
    CertificateName(String),
    /// The advertised address cannot be reached by peers.
    #[error(
        "mesh address {0} is unspecified; set mesh.advertise (or --quic with a concrete address)"
    )]
    UnspecifiedAddress(SocketAddr),
}

/// A snapshot of the mesh as this node sees it. Routes are computed once per snapshot, since
/// every request reads them and membership changes rarely.
#[derive(Debug, Clone, Default)]
pub struct MeshView {
    /// Live members, ourselves first.
    pub members: Vec<LiveMember>,
    /// Placement computed from their adverts.
    pub plan: RouteTable,
    /// Where each model can be served now (see [`MeshView::route`]).
    served: BTreeMap<String, RouteHint>,
    /// Whose catalogs count.
    publishers: Publishers,
    /// The version of each model the publishers hold.
    published: BTreeMap<String, [u8; 32]>,
    /// The version of each endpoint the publishers hold.
    endpoints: BTreeMap<String, EndpointEntry>,
    /// The models whose replica count follows load, as this node's policy decided them.
    scaling: Vec<ScaleStatus>,
}

impl MeshView {
    fn from_members(
        members: Vec<LiveMember>,
        publishers: &Publishers,
        scaling: Vec<ScaleStatus>,
    ) -> MeshView {
        let adverts: Vec<&NodeAdvert> = members.iter().filter_map(|m| m.advert.as_ref()).collect();
        let counts = scaling.iter().map(|s| (s.model.clone(), s.count)).collect();
        let plan = placement::plan(&adverts, publishers, &counts);
        let published = placement::published_digests(&adverts, publishers);
        let endpoints = placement::published_endpoints(&adverts, publishers);
        let models: BTreeSet<String> = adverts
            .iter()
            .flat_map(|a| a.serving.iter().cloned())
            .chain(plan.routes.iter().map(|r| r.model.clone()))
            .collect();
        let mut view = MeshView {
            members,
            plan,
            served: BTreeMap::new(),
            publishers: publishers.clone(),
            published,
            endpoints,
            scaling,
        };
        view.served = models
            .into_iter()
            .filter_map(|model| Some((model.clone(), view.compute_route(&model)?)))
            .collect();
        view
    }

    /// Whether the placement plan puts `model` on `node`.
    pub fn placed_on(&self, model: &str, node: &str) -> bool {
        self.plan
            .routes
            .iter()
            .any(|r| r.model == model && r.replicas.iter().any(|x| x.node == node))
    }

    /// The endpoint `name` as the publishers hold it.
    pub fn endpoint(&self, name: &str) -> Option<&EndpointEntry> {
        self.endpoints.get(name)
    }

    /// Every endpoint the publishers hold, by name.
    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointEntry> {
        self.endpoints.values()
    }

    /// Whether any live member holds or serves `model`, whether or not one serves it now.
    pub fn knows(&self, model: &str) -> bool {
        self.plan.routes.iter().any(|r| r.model == model) || self.served.contains_key(model)
    }

    /// The queue wait `node` last reported for a new request of `model` (zero when it
    /// reported none), at most [`MAX_REPORTED_WAIT`]: a member's claim can steer this node's
    /// choice among replicas, not outweigh what it measures itself without bound.
    fn reported_wait(&self, node: &str, model: &str) -> Duration {
        let reported = self
            .members
            .iter()
            .find(|m| m.id.name == node)
            .and_then(|m| m.advert.as_ref())
            .and_then(|a| a.in_flight.iter().find(|load| load.model == model))
            .map_or(0, |load| load.wait_us);
        Duration::from_micros(u64::from(reported)).min(MAX_REPORTED_WAIT)
    }

    fn serving(&self, node: &str, model: &str) -> bool {
        self.members.iter().any(|m| {
            m.id.name == node
                && m.advert
                    .as_ref()
                    .is_some_and(|a| a.serving.iter().any(|s| s == model))
        })
    }

    // Its placed replicas that have it loaded, else any live member that serves it (placement
    // may still be moving it); `None` when nobody does.
    fn compute_route(&self, model: &str) -> Option<RouteHint> {
        let placed = self.plan.routes.iter().find(|r| r.model == model);
        let mut replicas: Vec<Replica> = placed
            .map(|r| {
                r.replicas
                    .iter()
                    .filter(|x| self.serving(&x.node, model))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if replicas.is_empty() {
            let published = self.published.get(model);
            replicas = self
                .members
                .iter()
                .filter_map(|m| m.advert.as_ref())
                .filter(|a| {
                    a.serving.iter().any(|s| s == model)
                        && self.publishers.may_serve(a, model, published)
                })
                .map(Replica::from)
                .collect();
        }
        (!replicas.is_empty()).then(|| RouteHint {
            model: model.to_string(),
            epoch: self.plan.epoch,
            replicas,
        })
    }

    /// Where `model` can be served now: its placed replicas that have it loaded, else any live
    /// member that serves it (placement may still be moving it); `None` when nobody does.
    pub fn route(&self, model: &str) -> Option<RouteHint> {
        self.served.get(model).cloned()
    }

    /// The route of every model the mesh serves.
    pub fn routes(&self) -> RouteTable {
        RouteTable {
            epoch: self.plan.epoch,
            routes: self.served.values().cloned().collect(),
        }
    }
}

/// `value` in thousandths, saturating (a load figure on the wire).
fn milli(value: f64) -> u32 {
    (value * 1000.0).round().clamp(0.0, f64::from(u32::MAX)) as u32
}

/// A replica's answer of the wrong kind: a broken peer.
fn unexpected(model: &str, answer: &Message, route: RouteHint) -> Failure {
    let mut failure = Failure::new(
        FailureClass::Internal,
        format!("a replica of '{model}' answered with {}", answer.kind()),
    );
    failure.route = Some(route);
    failure
}

/// This node's membership in the mesh.
pub struct Cluster {
    name: String,
    generation: u64,
    quic: SocketAddr,
    http: SocketAddr,
    http3: Option<SocketAddr>,
    endpoint: MeshEndpoint,
    engine: Arc<Engine>,
    view: watch::Receiver<Arc<MeshView>>,
    /// Our advert as membership last took it: what a member fetching it gets.
    own_advert: watch::Receiver<Option<Arc<NodeAdvert>>>,
    gossip: mpsc::UnboundedSender<gossip::Input>,
    /// Peers' membership datagrams, bounded (see [`gossip::PACKET_QUEUE`]).
    packets: mpsc::Sender<gossip::Packet>,
    /// Time a peer has to send a whole `meshserve/1` frame on a stream.
    frame_read_timeout: Duration,
    /// One permit for each connection a client certificate may hold open.
    client_connections: Arc<tokio::sync::Semaphore>,
    /// Connections open by node certificate.
    node_connections: connections::ConnectionCounts,
    handshakes: handshakes::Handshakes,
    balancer: Balancer,
    /// When a forwarded request goes to another replica.
    retry: RetryPolicy,
    forward_timeout: Duration,
    local_latency: Mutex<PeakEwma>,
    digests: bundle::DigestCache,
    /// Model fetches this node serves at once.
    fetches_served: Arc<tokio::sync::Semaphore>,
    /// Models this node fetches and loads at once.
    arrivals: tokio::sync::Semaphore,
    /// Models placed here that are being fetched or loaded (or wait to be).
    arriving: Mutex<BTreeSet<String>>,
    /// Fetches a holder refused for good (too large, another version), by holder, model and
    /// digest, and when: not asked again for [`reconcile::REFUSAL_MEMORY`].
    refused_fetches: Mutex<HashMap<RefusedFetch, Instant>>,
    /// Config errors already logged, by model.
    config_errors: Mutex<HashMap<String, String>>,
    /// Models still loaded but no longer advertised, while they are being unloaded.
    leaving: Mutex<BTreeSet<String>>,
    /// Answers the calls that run models and endpoints; set once the node's door for them is.
    calls: std::sync::OnceLock<Arc<dyn Calls>>,
    /// Set when the node begins to stop: its advert says so, and nothing is placed here.
    departing: AtomicBool,
    /// Requests to republish our advert, served at most once per [`adverts::MIN_INTERVAL`].
    adverts: adverts::AdvertRequests,
    /// The catalog of the last repository scan, which adverts for load figures reuse.
    last_scan: Mutex<Option<(Vec<CatalogEntry>, Vec<EndpointEntry>)>>,
    /// What the models placed here may take, and what they do.
    memory: memory::ModelMemory,
}

/// Whether a forwarded request may be sent to another replica after one attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// Whenever the retry rule allows: running it twice is harmless (inference).
    Safe,
    /// Only when the first replica cannot have started on it (not reached, or it declined).
    BeforeSent,
}

/// The replicas of a route other than this node, in the order the node's balancer picks them
/// (p2c over peak-EWMA plus the queue wait each reports, suspects last).
struct Balanced<'a> {
    balancer: &'a Balancer,
    view: &'a MeshView,
    model: &'a str,
    candidates: Vec<&'a Replica>,
}

impl<'a> Targets for Balanced<'a> {
    type Target = &'a Replica;

    fn next(&mut self) -> Option<&'a Replica> {
        let view = self.view;
        let suspect = |node: &str| view.members.iter().any(|m| m.id.name == node && m.suspect);
        let names: Vec<&str> = self.candidates.iter().map(|r| r.node.as_str()).collect();
        let queue_wait = |node: &str| view.reported_wait(node, self.model);
        let chosen = self
            .balancer
            .pick_avoiding(&names, suspect, queue_wait, Instant::now())?;
        let index = names.iter().position(|n| *n == chosen).unwrap_or(0);
        Some(self.candidates.remove(index))
    }

    fn another(&self) -> bool {
        !self.candidates.is_empty()
    }
}

impl Cluster {
    /// Binds the endpoint, starts membership (announcing to the seeds), the `meshserve/1`
    /// service and the housekeeping loop.
    pub async fn start(
        config: ClusterConfig,
        engine: Arc<Engine>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        if !config.identity.is_node(&config.name) {
            return Err(ClusterError::CertificateName(config.name));
        }
        let endpoint = MeshEndpoint::bind(config.listen, &config.identity, config.max_frame_bytes)?
            .with_frame_budget(config.max_frame_bytes_in_flight);
        let quic = config
            .advertise
            .or_else(|| endpoint.local_addr())
            .unwrap_or(config.listen);
        if quic.ip().is_unspecified() {
            return Err(ClusterError::UnspecifiedAddress(quic));
        }
        let generation = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let id = MemberId {
            name: config.name.clone(),
            addr: quic,
            generation,
        };
        let core = Membership::new(
            id,
            config.detector,
            generation ^ placement::score(&config.name, "rng"),
        );
        let seeds = config.seeds.borrow().clone();
        let shell = gossip::spawn(
            core,
            endpoint.clone(),
            config.seeds,
            config.publishers,
            engine.metrics().clone(),
        );
        let cluster = Arc::new(Cluster {
            name: config.name,
            generation,
            quic,
            http: config.http,
            http3: config.http3,
            endpoint,
            engine,
            view: shell.view,
            own_advert: shell.own_advert,
            gossip: shell.input,
            packets: shell.packets,
            frame_read_timeout: config.frame_read_timeout,
            client_connections: Arc::new(tokio::sync::Semaphore::new(
                config.max_client_connections,
            )),
            node_connections: connections::ConnectionCounts::default(),
            handshakes: handshakes::Handshakes::new(config.max_handshakes),
            balancer: Balancer::new(generation),
            retry: RetryPolicy::default(),
            forward_timeout: config.forward_timeout,
            local_latency: Mutex::new(PeakEwma::starting_at(Duration::ZERO, Instant::now())),
            digests: bundle::DigestCache::default(),
            fetches_served: Arc::new(tokio::sync::Semaphore::new(MAX_FETCHES_SERVED)),
            arrivals: tokio::sync::Semaphore::new(MAX_ARRIVALS),
            arriving: Mutex::default(),
            refused_fetches: Mutex::default(),
            config_errors: Mutex::default(),
            leaving: Mutex::default(),
            calls: std::sync::OnceLock::new(),
            departing: AtomicBool::new(false),
            adverts: adverts::AdvertRequests::new(),
            last_scan: Mutex::new(None),
            memory: memory::ModelMemory::new(config.model_memory_budget),
        });
        cluster.publish_advert_now().await;
        let publisher = cluster.clone();
        tokio::spawn(async move {
            let publish = || {
                let cluster = publisher.clone();
                async move { cluster.publish_advert_now().await }
            };
            publisher
                .adverts
                .serve(publish, || publisher.gossip.is_closed())
                .await;
        });
        tokio::spawn(service::serve(cluster.clone()));
        tokio::spawn(reconcile::run(cluster.clone(), HOUSEKEEPING_PERIOD));
        tracing::info!(
            node = %cluster.name,
            quic = %quic,
            ?seeds,
            "mesh endpoint up (meshserve/1, mutual TLS)"
        );
        Ok(cluster)
    }

    /// This node's name.
    /// Longest a forwarded request may take when it sets no deadline itself.
    pub fn forward_timeout(&self) -> Duration {
        self.forward_timeout
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Swaps in a reloaded identity for new mesh connections; refused, changing nothing, when
    /// the certificate does not name this node.
    pub fn set_identity(&self, identity: &MeshIdentity) -> Result<(), ClusterError> {
        if !identity.is_node(&self.name) {
            return Err(ClusterError::CertificateName(self.name.clone()));
        }
        Ok(self.endpoint.set_identity(identity)?)
    }

    /// The address peers reach us at.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic
    }

    /// The current view of the mesh.
    pub fn view(&self) -> Arc<MeshView> {
        self.view.borrow().clone()
    }

    /// Whether a live member of the mesh (ourselves aside) is at `ip`.
    fn is_member_address(&self, ip: std::net::IpAddr) -> bool {
        self.view
            .borrow()
            .members
            .iter()
            .skip(1)
            .any(|member| member.id.addr.ip() == ip)
    }

    /// Our advert as membership holds it (with its sequence), once made.
    pub(crate) fn own_advert(&self) -> Option<Arc<NodeAdvert>> {
        self.own_advert.borrow().clone()
    }

    /// Where `model` is served, for route hints.
    pub fn route(&self, model: &str) -> Option<RouteHint> {
        self.view().route(model)
    }

    /// Our advert: the catalog of models and endpoints from a repository scan when `rescan`
    /// (or before any), else the last scan's, and the load figures of now.
    fn advert(&self, rescan: bool) -> NodeAdvert {
        let (catalog, endpoints) = {
            let mut last = self.last_scan.lock().unwrap_or_else(|e| e.into_inner());
            match &*last {
                Some(scan) if !rescan => scan.clone(),
                _ => {
                    let scan = self.scan_repository();
                    *last = Some(scan.clone());
                    scan
                }
            }
        };
        self.advert_with(catalog, endpoints)
    }

    /// The models and endpoints our repository offers the mesh, sorted.
    fn scan_repository(&self) -> (Vec<CatalogEntry>, Vec<EndpointEntry>) {
        let repository = self.engine.repository();
        let mut catalog: Vec<CatalogEntry> = repository
            .model_names()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|model| {
                // A config that does not parse must not advertise as `replicas = 0` ("every
                // holder"): the model stays out of placement until it is fixed, and the
                // engine's load reports the parse error.
                let (replicas, scaling) = match repository.config(&model) {
                    Ok(config) => match config.replica_range() {
                        Some((min, max)) => (
                            min,
                            Some(Scaling {
                                min,
                                max,
                                target_in_flight_milli: milli(config.target_in_flight),
                                down_window_s: config.scale_down_window_s,
                            }),
                        ),
                        None => (config.replicas, None),
                    },
                    Err(e) => {
                        self.report_config_error(&model, &e.to_string());
                        return None;
                    }
                };
                let (digest, bytes) = self
                    .digests
                    .get(repository.root(), &model)
                    .map_err(|e| tracing::warn!(%model, error = %e, "cannot hash model files"))
                    .ok()?;
                Some(CatalogEntry {
                    replicas,
                    model,
                    digest,
                    bytes,
                    scaling,
                })
            })
            .collect();
        catalog.sort();
        (catalog, self.endpoint_catalog(repository.root()))
    }

    fn advert_with(&self, catalog: Vec<CatalogEntry>, endpoints: Vec<EndpointEntry>) -> NodeAdvert {
        let latency = self
            .local_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .latency();
        let serving = self.serving();
        let metrics = self.engine.metrics();
        // Figures for the models other nodes choose a replica of (or scale): those with more
        // than one.
        let mut in_flight: Vec<ModelInFlight> = catalog
            .iter()
            .filter(|entry| {
                (entry.scaling.is_some() || entry.replicas != 1) && serving.contains(&entry.model)
            })
            .map(|entry| ModelInFlight {
                model: entry.model.clone(),
                milli: milli(metrics.in_flight(&entry.model)),
                wait_us: self.predicted_wait(&entry.model).map_or(0, |wait| {
                    u32::try_from(wait.as_micros()).unwrap_or(u32::MAX)
                }),
            })
            .filter(|load| load.milli > 0 || load.wait_us > 0)
            .collect();
        in_flight.sort_by(|a, b| b.milli.cmp(&a.milli).then_with(|| a.model.cmp(&b.model)));
        NodeAdvert {
            node: self.name.clone(),
            generation: self.generation,
            sequence: 0,
            quic: self.quic,
            http: self.http,
            http3: self.http3,
            catalog,
            serving,
            queue_depth: u32::try_from(self.engine.queue_depth()).unwrap_or(u32::MAX),
            ewma_latency_us: u32::try_from(latency.as_micros()).unwrap_or(u32::MAX),
            endpoints,
            leaving: self.departing.load(Ordering::Relaxed),
            in_flight,
            declined: self.memory.declined(),
        }
    }

    /// The endpoint folders of our repository that read and hash; one that does not is not
    /// offered to the mesh (the node's own load reports why).
    fn endpoint_catalog(&self, root: &std::path::Path) -> Vec<EndpointEntry> {
        let mut entries: Vec<EndpointEntry> = endpoint::folder::names(root)
            .into_iter()
            .filter_map(|name| {
                let read = endpoint::folder::read(root, &name).ok()?;
                let (digest, bytes) = self
                    .digests
                    .get(root, &name)
                    .map_err(|e| tracing::warn!(endpoint = %name, error = %e, "cannot hash endpoint files"))
                    .ok()?;
                let headers: BTreeSet<String> = [&read.config.pre, &read.config.post]
                    .into_iter()
                    .flatten()
                    .flat_map(|spec| spec.headers.iter().map(|h| h.to_ascii_lowercase()))
                    .collect();
                Some(EndpointEntry {
                    name,
                    model: read.config.model,
                    digest,
                    bytes,
                    headers: headers.into_iter().collect(),
                })
            })
            .collect();
        entries.sort();
        entries
    }

    /// What we advertise as served: the loaded models, less those being unloaded.
    /// How long a request for `model` joining its queue here now would wait, as admission
    /// predicts it; `None` when it is not loaded or has not run.
    fn predicted_wait(&self, model: &str) -> Option<Duration> {
        self.engine
            .model(model)?
            .version(None)
            .ok()?
            .predicted_wait()
    }

    fn serving(&self) -> Vec<String> {
        let leaving = self.leaving.lock().unwrap_or_else(|e| e.into_inner());
        let mut serving = self.engine.loaded_models();
        serving.retain(|model| !leaving.contains(model));
        serving
    }

    fn is_leaving(&self, model: &str) -> bool {
        self.leaving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(model)
    }

    fn set_leaving(&self, model: &str, leaving: bool) {
        let mut set = self.leaving.lock().unwrap_or_else(|e| e.into_inner());
        if leaving {
            set.insert(model.to_string());
        } else {
            set.remove(model);
        }
    }

    /// Logs a model's config error once per distinct message (adverts are rebuilt every
    /// second).
    fn report_config_error(&self, model: &str, error: &str) {
        if self.first_report(model, error) {
            tracing::error!(%model, %error, "model config unusable; the model stays out of placement");
        }
    }

    /// Whether `message` about the repository folder `name` is new: adverts and placement are
    /// rebuilt every second, and a standing problem is logged once per distinct message.
    fn first_report(&self, name: &str, message: &str) -> bool {
        let mut reported = self.config_errors.lock().unwrap_or_else(|e| e.into_inner());
        if reported.get(name).map(String::as_str) == Some(message) {
            return false;
        }
        reported.insert(name.to_string(), message.to_string());
        true
    }

    /// Republishes our advert (coalesced with other requests, [`adverts`]), and waits until an
    /// advert built after this call is out.
    async fn publish_advert(&self) {
        self.adverts.request().await;
    }

    // Hashing model files (cached, but the first time reads them all) is blocking work.
    async fn publish_advert_now(self: &Arc<Self>) {
        let this = self.clone();
        let rescan = self.adverts.take_rescan();
        if let Ok(advert) = tokio::task::spawn_blocking(move || this.advert(rescan)).await {
            let _ = self.gossip.send(gossip::Input::Advert(advert));
        }
    }

    /// Records the latency of a request this node served itself, for its advert.
    pub fn observe_local(&self, latency: Duration) {
        self.local_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(latency, Instant::now());
    }

    /// Runs `call` on a replica of its model (never this node). Inference is idempotent, so a
    /// retry on another replica is safe.
    pub async fn forward(&self, mut call: InferCall) -> Result<InferAnswer, Failure> {
        let timeout = call.timeout_or(self.forward_timeout);
        let model = call.model.clone();
        call.forwarded = true;
        match self
            .call_replicas(&model, &Message::Infer(call), timeout, Replay::Safe)
            .await?
        {
            (Message::Answer(mut answer), route) => {
                answer.route = Some(route);
                Ok(answer)
            }
            (other, route) => Err(unexpected(&model, &other, route)),
        }
    }

    /// The OIP metadata of a model served elsewhere, from one of its replicas.
    pub async fn remote_metadata(
        &self,
        model: &str,
        version: Option<String>,
    ) -> Result<serde_json::Value, Failure> {
        let query = Message::MetadataQuery(MetadataQuery {
            model: model.to_string(),
            version,
        });
        match self
            .call_replicas(model, &query, self.forward_timeout, Replay::Safe)
            .await?
        {
            (Message::Metadata(text), route) => serde_json::from_str(&text).map_err(|e| {
                let mut failure = Failure::new(
                    FailureClass::Internal,
                    format!("a replica of '{model}' sent malformed metadata: {e}"),
                );
                failure.route = Some(route);
                failure
            }),
            (other, route) => Err(unexpected(model, &other, route)),
        }
    }

    /// Sends `request` about `model` to its replicas other than this node, one at a time, until
    /// one answers: replicas chosen by the balancer (suspects last), at most one retry, within
    /// `timeout` in all, under the node's retry budget ([`crate::routing::retry`]). Gives the answer (anything
    /// but a failure) and the model's route.
    async fn call_replicas(
        &self,
        model: &str,
        request: &Message,
        timeout: Duration,
        replay: Replay,
    ) -> Result<(Message, RouteHint), Failure> {
        let metrics = self.engine.metrics().clone();
        let view = self.view();
        let Some(route) = view.route(model) else {
            if view.knows(model) {
                // Held by a member, served by none right now (loading, restarting, failing to
                // load): come back, rather than "no such model".
                metrics.record_forward(model, "no_replica");
                let mut failure = Failure::new(
                    FailureClass::Unavailable,
                    format!(
                        "model '{model}' is in the mesh but no replica serves it right now; retry shortly"
                    ),
                );
                failure.retry_after_ms = Some(NO_REPLICA_RETRY_MS);
                return Err(failure);
            }
            metrics.record_forward("_unknown", "no_route");
            return Err(Failure::new(
                FailureClass::NotFound,
                format!("unknown model '{model}': no node of the mesh serves it"),
            ));
        };
        let mut targets = Balanced {
            balancer: &self.balancer,
            view: &view,
            model,
            candidates: route
                .replicas
                .iter()
                .filter(|r| r.node != self.name)
                .collect(),
        };
        let mut attempts = Attempts::start(&self.retry, timeout, Instant::now());
        let outcome = replicas::run(
            &mut targets,
            &mut attempts,
            |replica: &Replica, left| async move {
                let started = Instant::now();
                let pending = self.balancer.start(&replica.node, started);
                let result = self.endpoint.call(replica.quic, request, left).await;
                let now = Instant::now();
                match result {
                    Ok(Message::Failure(failure)) => {
                        // A replica that ran the request has a latency to report; one that
                        // declined counts as a failure for the balancer.
                        let ran = !matches!(
                            failure.class,
                            FailureClass::NotHere | FailureClass::Unavailable
                        );
                        pending.finish(ran.then(|| now - started), now);
                        let retryable = retry::retryable(Failed::Answered(&failure));
                        Attempt::Failed(failure, Retry::Rule { retryable })
                    }
                    Ok(answer) => {
                        pending.finish(Some(now - started), now);
                        Attempt::Answered(answer)
                    }
                    Err(e) => {
                        pending.finish(None, now);
                        // Past connecting, the replica may have started on it.
                        let sent = !matches!(e, TransportError::Connect { .. });
                        let retry = if replay == Replay::BeforeSent && sent {
                            Retry::Never
                        } else {
                            Retry::Rule {
                                retryable: retry::retryable(Failed::Transport(&e)),
                            }
                        };
                        let failure = Failure::new(FailureClass::Unavailable, e.to_string());
                        Attempt::Failed(failure, retry)
                    }
                }
            },
            |replica, failure, decision| {
                let (node, reason) = (&replica.node, &failure.message);
                match decision {
                    Decision::Retry => {
                        tracing::debug!(replica = %node, %model, %reason, "retrying elsewhere");
                        metrics.record_forward(model, "retried");
                    }
                    Decision::BudgetSpent => {
                        crate::warn_throttled!(replica = %node, %model, %reason, "retry budget spent");
                        metrics.record_forward(model, "retry_budget_spent");
                    }
                    Decision::GiveUp => {}
                }
            },
        )
        .await;
        let mut failure = match outcome {
            Ok(answer) => {
                metrics.record_forward(model, "ok");
                return Ok((answer, route));
            }
            Err(Unanswered { last, .. }) => last.unwrap_or_else(|| {
                Failure::new(
                    FailureClass::Unavailable,
                    format!("no other replica of '{model}' is reachable"),
                )
            }),
        };
        let outcome = match failure.class {
            FailureClass::NotHere | FailureClass::Unavailable => "unavailable",
            _ => "failed",
        };
        metrics.record_forward(model, outcome);
        if failure.class == FailureClass::NotHere {
            // The caller sent its request to the right node; that the replicas moved is the
            // mesh's business.
            failure.class = FailureClass::Unavailable;
        }
        failure.route = Some(route);
        Err(failure)
    }

    /// Runs a whole endpoint request on a replica of the endpoint's model (never this node),
    /// which runs pre → model → post: no tensor crosses the mesh. Retried on another replica
    /// only when the first refused it before running anything (it does not serve the
    /// endpoint, or could not be reached): plugins need not be idempotent, and a request whose
    /// connection broke after it was sent may have run them.
    pub async fn forward_endpoint(
        &self,
        model: &str,
        call: EndpointCall,
        timeout: Duration,
    ) -> Result<(EndpointAnswer, RouteHint), Failure> {
        let name = call.endpoint.clone();
        match self
            .call_replicas(model, &Message::Invoke(call), timeout, Replay::BeforeSent)
            .await?
        {
            (Message::Invoked(answer), mut route) => {
                route.model = name;
                Ok((answer, route))
            }
            (other, route) => Err(unexpected(&name, &other, route)),
        }
    }

    /// Hands the cluster what answers the calls that run models and endpoints (once; later
    /// calls are ignored). Until then such calls are answered "starting, retry".
    pub fn serve_calls(&self, calls: Arc<dyn Calls>) {
        let _ = self.calls.set(calls);
    }

    /// This node's load per model it serves, for `meshserve status`.
    pub fn loads(&self) -> NodeLoads {
        let metrics = self.engine.metrics();
        let models = self
            .serving()
            .into_iter()
            .map(|model| {
                let load = metrics.load_of(&model);
                ModelLoadReport {
                    queue_depth: u64::try_from(load.queue_depth).unwrap_or(0),
                    requests_per_second: load.recent.requests_per_second,
                    p99_us: load
                        .recent
                        .p99
                        .map(|p| u64::try_from(p.as_micros()).unwrap_or(u64::MAX)),
                    predicted_wait_us: self
                        .predicted_wait(&model)
                        .map(|w| u64::try_from(w.as_micros()).unwrap_or(u64::MAX)),
                    model,
                }
            })
            .collect();
        NodeLoads {
            node: self.name.clone(),
            models,
        }
    }

    /// This node's view of the mesh, for `meshserve status`.
    pub fn status(&self) -> MeshStatus {
        let view = self.view();
        MeshStatus {
            node: self.name.clone(),
            members: view
                .members
                .iter()
                .map(|m| MemberStatus {
                    node: m.id.name.clone(),
                    state: if m.suspect {
                        "suspect"
                    } else if m.advert.as_ref().is_some_and(|a| a.leaving) {
                        "leaving"
                    } else {
                        "alive"
                    }
                    .to_string(),
                    advert: m.advert.clone(),
                })
                .collect(),
            routes: view.routes(),
            scaling: view.scaling.clone(),
        }
    }

    /// The first step of a graceful stop: the advert says this node is leaving, so every node
    /// places its models elsewhere at once, while this one stays a member: it still serves
    /// what it has loaded (to peers that forward here while the new replicas load), and
    /// forwards its own clients' requests, until [`Cluster::leave`].
    pub async fn begin_leaving(self: &Arc<Self>) {
        if !self.departing.swap(true, Ordering::AcqRel) {
            tracing::info!(
                "leaving the mesh: placed nowhere from now; serving what is loaded here until other replicas do"
            );
            self.publish_advert().await;
        }
    }

    /// Whether this node is leaving the mesh ([`Cluster::begin_leaving`]).
    pub fn is_departing(&self) -> bool {
        self.departing.load(Ordering::Acquire)
    }

    /// Waits, at most `within`, until every model served here is served by another member as
    /// well (its route names another replica), so that stopping loses none of them. Gives the
    /// models that were not handed over in time.
    pub async fn handed_over(&self, within: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut views = self.view.clone();
        loop {
            let view = views.borrow_and_update().clone();
            let pending: Vec<String> = self
                .serving()
                .into_iter()
                .filter(|model| {
                    view.route(model)
                        .is_none_or(|route| route.replicas.iter().all(|r| r.node == self.name))
                })
                .collect();
            if pending.is_empty() {
                return pending;
            }
            if tokio::time::timeout_at(deadline, views.changed())
                .await
                .is_err()
            {
                tracing::warn!(models = ?pending, ?within, "no other replica serves these yet; stopping anyway");
                return pending;
            }
        }
    }

    /// Leaves the mesh (peers learn at once) and closes the endpoint.
    pub async fn leave(&self) {
        let (done, confirmed) = oneshot::channel();
        if self.gossip.send(gossip::Input::Leave(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), confirmed).await;
            // Give the goodbye datagrams a moment to leave the socket.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.endpoint.close();
    }
}

/// `meshserve status` as a table: members and their load, then per model each replica with
/// its queue, requests per second and p99 over the last seconds (from `loads`, the members'
/// own reports; `?` where one did not answer), and the members in `silent` that did not
/// answer in time.
pub fn format_status(status: &MeshStatus, loads: &[NodeLoads], silent: &[String]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mesh as seen by {} (placement epoch {:016x})\n",
        status.node, status.routes.epoch
    );
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<22} {:<22} {:>6} {:>9}  SERVING",
        "MEMBER", "STATE", "QUIC", "HTTP", "QUEUE", "EWMA µs"
    );
    for member in &status.members {
        let (quic, http, queue, ewma, serving) = match &member.advert {
            Some(a) => (
                a.quic.to_string(),
                a.http.to_string(),
                a.queue_depth.to_string(),
                a.ewma_latency_us.to_string(),
                a.serving.join(","),
            ),
            None => (
                "?".into(),
                "?".into(),
                "?".into(),
                "?".into(),
                String::new(),
            ),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<22} {:<22} {:>6} {:>9}  {}",
            member.node, member.state, quic, http, queue, ewma, serving
        );
    }
    for advert in status.members.iter().filter_map(|m| m.advert.as_ref()) {
        if !advert.declined.is_empty() {
            let _ = writeln!(
                out,
                "{} declines (memory budget for models): {}",
                advert.node,
                advert.declined.join(", ")
            );
        }
    }
    if !silent.is_empty() {
        let _ = writeln!(
            out,
            "\nno answer in time from: {} (their load is shown as ?)",
            silent.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\n{:<24} {:<16} {:>6} {:>9} {:>10} {:>10}",
        "MODEL", "REPLICA", "QUEUE", "REQ/S", "P99", "WAIT"
    );
    let by_node: BTreeMap<&str, &NodeLoads> = loads.iter().map(|l| (l.node.as_str(), l)).collect();
    for route in &status.routes.routes {
        for replica in &route.replicas {
            let load = by_node
                .get(replica.node.as_str())
                .and_then(|l| l.models.iter().find(|m| m.model == route.model));
            let ms = |us: Option<u64>| {
                us.map_or("-".into(), |us| format!("{:.2} ms", us as f64 / 1000.0))
            };
            let (queue, rate, p99, wait) = match load {
                Some(m) => (
                    m.queue_depth.to_string(),
                    format!("{:.1}", m.requests_per_second),
                    ms(m.p99_us),
                    ms(m.predicted_wait_us),
                ),
                // Placed but not loaded there yet, or the node did not answer.
                None => ("?".into(), "?".into(), "?".into(), "?".into()),
            };
            let _ = writeln!(
                out,
                "{:<24} {:<16} {:>6} {:>9} {:>10} {:>10}",
                route.model, replica.node, queue, rate, p99, wait
            );
        }
    }
    if !status.scaling.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<24} {:>8} {:>9} {:>8} {:>12}  LAST CHANGE",
            "LOAD-FOLLOWING MODEL", "REPLICAS", "SERVING", "MIN-MAX", "IN FLIGHT"
        );
        for scaled in &status.scaling {
            let serving = status
                .routes
                .routes
                .iter()
                .find(|r| r.model == scaled.model)
                .map_or(0, |r| r.replicas.len());
            let _ = writeln!(
                out,
                "{:<24} {:>8} {:>9} {:>8} {:>12}  {}",
                scaled.model,
                scaled.count,
                serving,
                format!("{}-{}", scaled.scaling.min, scaled.scaling.max),
                format!(
                    "{:.1}/{:.1}",
                    f64::from(scaled.in_flight_milli) / 1000.0,
                    f64::from(scaled.scaling.target_in_flight_milli) / 1000.0
                ),
                scaled.last_change.as_deref().unwrap_or("-")
            );
        }
    }
    // Endpoints by version: who holds each, and which of its model's replicas run it.
    let mut versions: BTreeMap<(&str, &str, [u8; 32]), Vec<&str>> = BTreeMap::new();
    for advert in status.members.iter().filter_map(|m| m.advert.as_ref()) {
        for entry in &advert.endpoints {
            versions
                .entry((&entry.name, &entry.model, entry.digest))
                .or_default()
                .push(&advert.node);
        }
    }
    if !versions.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<24} {:<16} {:<13} {:<24} RUNS ON",
            "ENDPOINT", "MODEL", "VERSION", "HELD BY"
        );
    }
    for ((name, model, digest), holders) in &versions {
        let runs_on: Vec<&str> = status
            .routes
            .routes
            .iter()
            .filter(|r| r.model == *model)
            .flat_map(|r| r.replicas.iter().map(|x| x.node.as_str()))
            .filter(|node| holders.contains(node))
            .collect();
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:<13} {:<24} {}",
            name,
            model,
            &bundle::hex(digest)[..12],
            holders.join(", "),
            runs_on.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporting(node: &str, port: u16, wait_us: u32) -> LiveMember {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        LiveMember {
            id: MemberId {
                name: node.into(),
                addr,
                generation: 1,
            },
            suspect: false,
            advert: Some(NodeAdvert {
                serving: vec!["heavy".into()],
                in_flight: vec![ModelInFlight {
                    model: "heavy".into(),
                    milli: 1_000,
                    wait_us,
                }],
                ..NodeAdvert::empty(node, addr)
            }),
        }
    }

    #[test]
    fn a_reported_queue_wait_counts_for_its_node_and_model_only_and_is_capped() {
        let members = vec![reporting("a", 1, 3_000), reporting("b", 2, u32::MAX)];
        let view = MeshView::from_members(members, &Publishers::Anyone, Vec::new());
        assert_eq!(view.reported_wait("a", "heavy"), Duration::from_millis(3));
        assert_eq!(view.reported_wait("a", "fraud"), Duration::ZERO);
        assert_eq!(view.reported_wait("c", "heavy"), Duration::ZERO);
        assert_eq!(view.reported_wait("b", "heavy"), MAX_REPORTED_WAIT);
    }
}
