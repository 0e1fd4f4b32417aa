//! Prometheus metrics of a node. One registry per [`Metrics`]; the engine records queue,
//! inference and batch figures, the front doors record requests and end-to-end latency.
//! Per-model handles are resolved once at load ([`ModelMetrics`]) so the hot path does no
//! label lookups.

use in_flight::InFlightMeter;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use recent::{RecentLoad, RecentWindow};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};
use totals::{ModelTotals, TotalsSnapshot};

pub mod in_flight;
pub mod recent;
pub mod totals;

/// Labels of per-model metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The model name.
    pub model: String,
}

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The model name (or `-` where the request named none that exists).
    pub model: String,
    /// The HTTP status code returned.
    pub status: u16,
    /// The protocol the request came by ([`Protocol::label`]).
    pub protocol: &'static str,
}

/// The protocol a request came by, as the `protocol` label of the request counter names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// REST over HTTP/1.1 (or 1.0).
    Http1,
    /// REST over HTTP/2.
    Http2,
    /// REST over HTTP/3.
    Http3,
    /// The Open Inference Protocol over gRPC.
    Grpc,
    /// The mesh's own protocol (route-aware clients and other nodes).
    Mesh,
}

impl Protocol {
    const COUNT: usize = 5;

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "h2",
            Protocol::Http3 => "h3",
            Protocol::Grpc => "grpc",
            Protocol::Mesh => "mesh",
        }
    }
}

/// Labels of the mesh counters: a model and what happened to its request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeshLabels {
    /// The model name.
    pub model: String,
    /// The outcome (forwarding) or the sender (requests served from the mesh).
    pub kind: String,
}

/// Labels of connection counters (the HTTP/3 door's and the mesh port's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `h3`, or `mesh` for the mesh port.
    pub protocol: String,
    /// `accepted`, `refused` (over a connection or handshake cap), `retry` (address
    /// validation sent), `handshake_failed`, `handshake_timed_out` (mesh only; HTTP/3 counts
    /// those as failed).
    pub outcome: String,
}

/// Labels of plugin stage timings.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// The endpoint.
    pub endpoint: String,
    /// `pre` or `post`.
    pub stage: String,
}

/// Labels of plugin failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The plugin.
    pub plugin: String,
    /// deadline, wall-clock, memory, fuel, limit, panic, trap, output, init, rejected, busy.
    pub kind: String,
}

/// Labels of per-plugin counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// The plugin.
    pub plugin: String,
}

/// Labels of feature lookups.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// The table (`_unknown` for a name no table has).
    pub table: String,
    /// `hit` or `miss`.
    pub result: String,
}

type HistogramFamily = Family<ModelLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 10 µs to about 10 s, doubling.
    Histogram::new(exponential_buckets(1e-5, 2.0, 21))
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 10))
}

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: HistogramFamily,
    queue_seconds: HistogramFamily,
    inference_seconds: HistogramFamily,
    batch_size: HistogramFamily,
    queue_depth: Family<ModelLabels, Gauge>,
    plugin_seconds: Family<StageLabels, Histogram, fn() -> Histogram>,
    plugin_failures: Family<FailureLabels, Counter>,
    feature_lookups: Family<LookupLabels, Counter>,
    plugin_log_dropped: Family<PluginLabels, Counter>,
    forwarded: Family<MeshLabels, Counter>,
    mesh_served: Family<MeshLabels, Counter>,
    connections: Family<ConnectionLabels, Counter>,
    replicas_target: Family<ModelLabels, Gauge>,
    replica_changes: Family<MeshLabels, Counter>,
    refusals: Family<MeshLabels, Counter>,
    grpc_streams: Gauge,
    /// Each model's request metrics, resolved once (names bounded as the labels are), so a
    /// request costs no label allocation or family lookup.
    per_model: RwLock<HashMap<String, Arc<RequestHandles>>>,
    /// `feature_lookups_total` per table, hit and miss, resolved once per table: a lookup is
    /// a host call on a plugin's hot path, and the family would build two label strings for
    /// each. Only tables that exist and `_unknown` are keys, so the map is bounded as the
    /// labels are.
    lookups_by_table: RwLock<HashMap<String, [Counter; 2]>>,
    started: Instant,
}

/// One model's request metrics.
struct RequestHandles {
    /// `requests_total{status="200"}` per protocol, made on first use; other statuses are rare
    /// and looked up by label.
    ok: [OnceLock<Counter>; Protocol::COUNT],
    seconds: Histogram,
    /// The last seconds of answered requests.
    recent: Mutex<RecentWindow>,
    /// Totals since the node started, for the statistics extension.
    totals: Arc<ModelTotals>,
    /// Requests in flight in the engine, per period.
    in_flight: Arc<InFlightMeter>,
    /// `plugin_seconds` of an endpoint's pre and post stages, made on first use.
    plugin_stages: [OnceLock<Histogram>; 2],
}

/// A model's load on this node now, as `meshserve status` shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelLoad {
    /// Requests waiting in its queue.
    pub queue_depth: i64,
    /// Requests per second and p99 over the last seconds.
    pub recent: RecentLoad,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates the metrics and their registry.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("meshserve");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds = HistogramFamily::new_with_constructor(latency_histogram);
        let queue_seconds = HistogramFamily::new_with_constructor(latency_histogram);
        let inference_seconds = HistogramFamily::new_with_constructor(latency_histogram);
        let batch_size = HistogramFamily::new_with_constructor(batch_histogram);
        let queue_depth = Family::<ModelLabels, Gauge>::default();
        let plugin_seconds =
            Family::<StageLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let plugin_failures = Family::<FailureLabels, Counter>::default();
        let feature_lookups = Family::<LookupLabels, Counter>::default();
        let plugin_log_dropped = Family::<PluginLabels, Counter>::default();
        registry.register(
            "plugin_log_dropped",
            "Log lines of plugins dropped by their rate limit",
            plugin_log_dropped.clone(),
        );
        let forwarded = Family::<MeshLabels, Counter>::default();
        let mesh_served = Family::<MeshLabels, Counter>::default();
        registry.register(
            "forwarded_requests",
            "Requests this node forwarded to a replica over the mesh, by outcome (kind)",
            forwarded.clone(),
        );
        registry.register(
            "mesh_served_requests",
            "Requests served here that arrived over the mesh, by sender (kind: node or client)",
            mesh_served.clone(),
        );
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections to a front door or the mesh port, by protocol and outcome",
            connections.clone(),
        );
        let replicas_target = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "mesh_replicas_target",
            "Replicas this node's load policy wants for a model whose replica count follows load",
            replicas_target.clone(),
        );
        let replica_changes = Family::<MeshLabels, Counter>::default();
        registry.register(
            "mesh_replica_changes",
            "Changes of a load-following model's replica count decided here, by direction (kind: up or down)",
            replica_changes.clone(),
        );
        let refusals = Family::<MeshLabels, Counter>::default();
        registry.register(
            "refused_requests",
            "Requests a model's admission refused at once (503), by reason (kind: queue_full, queue_wait, deadline)",
            refusals.clone(),
        );
        let grpc_streams = Gauge::default();
        registry.register(
            "grpc_streams_open",
            "gRPC streaming inference calls open now",
            grpc_streams.clone(),
        );
        registry.register(
            "plugin_duration_seconds",
            "Time in a pre- or post-processing plugin call, instantiation included",
            plugin_seconds.clone(),
        );
        registry.register(
            "plugin_failures",
            "Plugin calls that failed, by cause",
            plugin_failures.clone(),
        );
        registry.register(
            "feature_lookups",
            "Feature-table lookups made by plugins",
            feature_lookups.clone(),
        );
        registry.register(
            "requests",
            "Inference requests answered, by model, HTTP status and the protocol they came by",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request received to response ready",
            request_seconds.clone(),
        );
        registry.register(
            "queue_duration_seconds",
            "Time a request waited in its model's queue",
            queue_seconds.clone(),
        );
        registry.register(
            "inference_duration_seconds",
            "Time a batch spent in ONNX Runtime, stacking and splitting included",
            inference_seconds.clone(),
        );
        registry.register("batch_size", "Requests per batch run", batch_size.clone());
        registry.register(
            "queue_depth",
            "Requests waiting in a model's queue",
            queue_depth.clone(),
        );
        Metrics {
            registry,
            requests,
            request_seconds,
            queue_seconds,
            inference_seconds,
            batch_size,
            queue_depth,
            plugin_seconds,
            plugin_failures,
            feature_lookups,
            plugin_log_dropped,
            forwarded,
            mesh_served,
            connections,
            replicas_target,
            replica_changes,
            refusals,
            grpc_streams,
            per_model: RwLock::default(),
            lookups_by_table: RwLock::default(),
            started: Instant::now(),
        }
    }

    fn second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn handles(&self, model: &str) -> Arc<RequestHandles> {
        if let Some(handles) = self
            .per_model
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
        {
            return handles.clone();
        }
        let labels = ModelLabels {
            model: model.to_string(),
        };
        let handles = Arc::new(RequestHandles {
            ok: Default::default(),
            seconds: self.request_seconds.get_or_create(&labels).clone(),
            recent: Mutex::default(),
            totals: Arc::default(),
            in_flight: Arc::default(),
            plugin_stages: Default::default(),
        });
        self.per_model
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(labels.model)
            .or_insert(handles)
            .clone()
    }

    /// `model`'s load on this node now: its queue, and its requests over the last seconds.
    pub fn load_of(&self, model: &str) -> ModelLoad {
        let queue_depth = self
            .queue_depth
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .get();
        let recent = self
            .handles(model)
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .load(self.second());
        ModelLoad {
            queue_depth,
            recent,
        }
    }

    /// Counts a connection of `protocol` (a front door's or the mesh port's) by what happened
    /// to it.
    pub fn record_connection(&self, protocol: &str, outcome: &str) {
        self.connections
            .get_or_create(&ConnectionLabels {
                protocol: protocol.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Sets the replica count this node's load policy wants for `model`.
    pub fn set_replicas_target(&self, model: &str, count: u16) {
        self.replicas_target
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .set(i64::from(count));
    }

    /// Counts a request `model`'s admission refused, and why.
    pub fn record_refusal(&self, model: &str, reason: &str) {
        self.refusals
            .get_or_create(&MeshLabels {
                model: model.to_string(),
                kind: reason.to_string(),
            })
            .inc();
    }

    /// Counts a change of `model`'s replica count, `up` or down.
    pub fn record_replica_change(&self, model: &str, up: bool) {
        self.replica_changes
            .get_or_create(&MeshLabels {
                model: model.to_string(),
                kind: if up { "up" } else { "down" }.to_string(),
            })
            .inc();
    }

    /// The gauge of gRPC streaming calls open now.
    pub fn grpc_streams(&self) -> &Gauge {
        &self.grpc_streams
    }

    /// Counts a request forwarded to another node, by outcome.
    pub fn record_forward(&self, model: &str, outcome: &str) {
        self.forwarded
            .get_or_create(&MeshLabels {
                model: model.to_string(),
                kind: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a request served here that arrived over the mesh from a `node` or a `client`.
    pub fn record_mesh_served(&self, model: &str, source: &str) {
        self.mesh_served
            .get_or_create(&MeshLabels {
                model: model.to_string(),
                kind: source.to_string(),
            })
            .inc();
    }

    /// Records one plugin call's time for `endpoint` at `stage` (`pre` or `post`).
    pub fn record_plugin_stage(&self, endpoint: &str, stage: &str, elapsed: Duration) {
        let labels = || StageLabels {
            endpoint: endpoint.to_string(),
            stage: stage.to_string(),
        };
        // An endpoint's requests are counted under its name: its stages' histograms are kept
        // beside them, so a call costs no label allocation.
        let slot = match stage {
            "pre" => 0,
            "post" => 1,
            _ => {
                self.plugin_seconds
                    .get_or_create(&labels())
                    .observe(elapsed.as_secs_f64());
                return;
            }
        };
        self.handles(endpoint).plugin_stages[slot]
            .get_or_init(|| self.plugin_seconds.get_or_create(&labels()).clone())
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a failed plugin call.
    pub fn record_plugin_failure(&self, plugin: &str, kind: &str) {
        self.plugin_failures
            .get_or_create(&FailureLabels {
                plugin: plugin.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Counts a plugin log line dropped by the plugin's rate limit.
    pub fn record_plugin_log_dropped(&self, plugin: &str) {
        self.plugin_log_dropped
            .get_or_create(&PluginLabels {
                plugin: plugin.to_string(),
            })
            .inc();
    }

    /// Counts a feature lookup; `table_known` keeps plugin-chosen names out of the labels.
    pub fn record_lookup(&self, table: &str, hit: bool, table_known: bool) {
        let table = if table_known { table } else { "_unknown" };
        let result = usize::from(!hit);
        if let Some(counters) = self
            .lookups_by_table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(table)
        {
            counters[result].inc();
            return;
        }
        let counter = |result: &str| {
            self.feature_lookups.get_or_create_owned(&LookupLabels {
                table: table.to_string(),
                result: result.to_string(),
            })
        };
        let counters = [counter("hit"), counter("miss")];
        counters[result].inc();
        self.lookups_by_table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(table.to_string())
            .or_insert(counters);
    }

    /// Handles for one model, resolved once.
    pub fn model(&self, model: &str) -> ModelMetrics {
        let handles = self.handles(model);
        let labels = ModelLabels {
            model: model.to_string(),
        };
        ModelMetrics {
            queue_seconds: self.queue_seconds.get_or_create_owned(&labels),
            inference_seconds: self.inference_seconds.get_or_create_owned(&labels),
            batch_size: self.batch_size.get_or_create_owned(&labels),
            queue_depth: self.queue_depth.get_or_create_owned(&labels),
            totals: handles.totals.clone(),
            in_flight: handles.in_flight.clone(),
            started: self.started,
        }
    }

    /// `model`'s requests in flight in the engine, on average over the last complete
    /// [`in_flight::PERIOD`].
    pub fn in_flight(&self, model: &str) -> f64 {
        let handles = self
            .per_model
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .cloned();
        let now = in_flight::period_of(self.started.elapsed());
        handles.map_or(0.0, |h| h.in_flight.last_period(now))
    }

    /// `model`'s totals since the node started (zero for a name never served, which is not
    /// added to the metrics).
    pub fn totals(&self, model: &str) -> TotalsSnapshot {
        self.per_model
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .map(|handles| handles.totals.snapshot())
            .unwrap_or_default()
    }

    /// Counts one answered request, by the protocol it came by, and its end-to-end time.
    pub fn record_request(&self, model: &str, protocol: Protocol, status: u16, elapsed: Duration) {
        let handles = self.handles(model);
        let labels = || RequestLabels {
            model: model.to_string(),
            status,
            protocol: protocol.label(),
        };
        if status == 200 {
            handles.ok[protocol as usize]
                .get_or_init(|| self.requests.get_or_create(&labels()).clone())
                .inc();
        } else {
            self.requests.get_or_create(&labels()).inc();
        }
        handles.seconds.observe(elapsed.as_secs_f64());
        handles.totals.record_request(status == 200, elapsed);
        handles
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(elapsed, self.second());
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One model's metric handles.
#[derive(Clone, Debug)]
pub struct ModelMetrics {
    /// Queue wait per request.
    pub queue_seconds: Histogram,
    /// Run time per batch.
    pub inference_seconds: Histogram,
    /// Requests per batch.
    pub batch_size: Histogram,
    /// Requests waiting.
    pub queue_depth: Gauge,
    totals: Arc<ModelTotals>,
    in_flight: Arc<InFlightMeter>,
    /// The registry's clock origin, for the in-flight meter's seconds.
    started: Instant,
}

impl ModelMetrics {
    /// Records one run of the model: each request's wait in the queue, the rows they held,
    /// and the run's time.
    pub fn record_run(
        &self,
        waits: impl IntoIterator<Item = Duration>,
        rows: usize,
        took: Duration,
    ) {
        let (mut requests, mut waited) = (0, Duration::ZERO);
        for wait in waits {
            self.queue_seconds.observe(wait.as_secs_f64());
            requests += 1;
            waited += wait;
        }
        self.batch_size.observe(requests as f64);
        self.inference_seconds.observe(took.as_secs_f64());
        self.totals.record_run(requests, waited, rows, took);
        self.in_flight.record(
            waited + took.saturating_mul(requests),
            in_flight::period_of(self.started.elapsed()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_models_and_statuses() {
        let metrics = Metrics::new();
        let fraud = metrics.model("fraud");
        fraud.batch_size.observe(8.0);
        fraud.queue_depth.set(3);
        metrics.record_request("fraud", Protocol::Grpc, 200, Duration::from_micros(120));
        metrics.record_request("fraud", Protocol::Http2, 200, Duration::from_micros(90));
        metrics.record_request("fraud", Protocol::Grpc, 200, Duration::from_micros(110));
        metrics.record_request("fraud", Protocol::Http1, 503, Duration::from_micros(10));
        let text = metrics.encode();
        for line in [
            "meshserve_requests_total{model=\"fraud\",status=\"200\",protocol=\"grpc\"} 2",
            "meshserve_requests_total{model=\"fraud\",status=\"200\",protocol=\"h2\"} 1",
            "meshserve_requests_total{model=\"fraud\",status=\"503\",protocol=\"http1\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(
            text.contains("meshserve_batch_size_bucket{le=\"8.0\",model=\"fraud\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("meshserve_queue_depth{model=\"fraud\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn plugin_stages_are_counted_per_endpoint_and_stage() {
        let metrics = Metrics::new();
        for stage in ["pre", "post", "post"] {
            metrics.record_plugin_stage("fraud-check", stage, Duration::from_micros(40));
        }
        metrics.record_plugin_stage("fraud-ranked", "pre", Duration::from_micros(40));
        let text = metrics.encode();
        for line in [
            "meshserve_plugin_duration_seconds_count{endpoint=\"fraud-check\",stage=\"pre\"} 1",
            "meshserve_plugin_duration_seconds_count{endpoint=\"fraud-check\",stage=\"post\"} 2",
            "meshserve_plugin_duration_seconds_count{endpoint=\"fraud-ranked\",stage=\"pre\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn feature_lookups_are_counted_per_table_and_result() {
        let metrics = Metrics::new();
        for hit in [true, true, false] {
            metrics.record_lookup("cards", hit, true);
        }
        metrics.record_lookup("merchants", false, true);
        // Names no table has share one label, whatever a plugin asks for.
        metrics.record_lookup("made-up-1", false, false);
        metrics.record_lookup("made-up-2", false, false);
        let text = metrics.encode();
        for line in [
            "meshserve_feature_lookups_total{table=\"cards\",result=\"hit\"} 2",
            "meshserve_feature_lookups_total{table=\"cards\",result=\"miss\"} 1",
            "meshserve_feature_lookups_total{table=\"merchants\",result=\"miss\"} 1",
            "meshserve_feature_lookups_total{table=\"_unknown\",result=\"miss\"} 2",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(!text.contains("made-up"), "{text}");
    }
}
