//! Endpoint calls: `[pre-plugin] → model → [post-plugin]` on this node, or the whole request
//! forwarded to a replica of the endpoint's model, which runs all three. Every door hands its
//! endpoint requests here (HTTP's invocations and OIP routes, HTTP/3, `meshserve/1`) and sends
//! on the answer it gets: an HTTP-shaped response whichever door asked, because a plugin's reply
//! is one (status, content type, headers, body) and a forwarded answer comes back unchanged.

use crate::dispatch::timing::{Ms, SERVER_TIMING, hop_timing, server_timing};
use crate::dispatch::{Call, Dispatch, DispatchError, Origin, TRACEPARENT, traceparent};
use crate::oip::{self, OutputEncoding};
use crate::routing::{ROUTE_HEADER, route_header};
use crate::wire::{EndpointCall, EndpointEntry, Failure, FailureClass};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use meshserve_host::endpoint::{Endpoint, EndpointPlugins, Source, postprocess, preprocess};
use meshserve_host::plugin::instance::{PluginReply, PostAnswer, PreAnswer};
use meshserve_host::{InferError, InferRequest};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Names the plugin versions that made an answer: `pre=NAME@SHA12+CFG8 post=NAME@SHA12+CFG8`
/// (component digest, then the config's when it has one).
pub const PLUGINS_HEADER: HeaderName = HeaderName::from_static("meshserve-plugins");

/// Where an endpoint request runs.
pub enum EndpointRoute {
    /// On this node's own endpoint.
    Here(Arc<Endpoint>),
    /// Whole, on a replica of the endpoint's model: this node has no such endpoint, or has
    /// the mesh's (a repository folder) without its model.
    Replica(EndpointEntry),
}

/// An endpoint request as a door hands it over: headers and body as the client sent them.
pub struct Invocation<'h> {
    /// The request's headers; plugins see only those their endpoint grants.
    pub headers: &'h HeaderMap,
    /// The whole body, already read within the door's limits.
    pub body: Bytes,
    /// The client's deadline, counted from `started`.
    pub timeout: Option<Duration>,
    /// When the door received the request.
    pub started: Instant,
}

/// On a forwarded endpoint answer: the replica that ran it.
#[derive(Debug, Clone)]
struct RanOn(String);

/// The node that ran the endpoint call `response` answers: a replica's name for a forwarded
/// call, `None` when it ran here.
pub fn ran_on(response: &Response<Bytes>) -> Option<&str> {
    response.extensions().get::<RanOn>().map(|r| r.0.as_str())
}

/// Per-request plugin timings, for the `Server-Timing` header.
#[derive(Default)]
struct PluginTimings {
    pre: Option<Duration>,
    post: Option<Duration>,
    /// The mesh hop, already formatted, when the model ran on another node.
    hop: String,
}

impl PluginTimings {
    fn header_parts(&self) -> String {
        use std::fmt::Write as _;
        let mut parts = String::new();
        if let Some(pre) = self.pre {
            let _ = write!(parts, "pre;dur={}, ", Ms(pre));
        }
        parts.push_str(&self.hop);
        if let Some(post) = self.post {
            let _ = write!(parts, "post;dur={}, ", Ms(post));
        }
        parts
    }
}

fn header_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
}

fn insert_timing(response: &mut Response<Bytes>, timing: &str) {
    if let Ok(value) = HeaderValue::from_str(timing) {
        response.headers_mut().insert(SERVER_TIMING, value);
    }
}

/// A plugin's own reply as a response (its headers were checked when it returned them).
fn reply_response(reply: PluginReply, timing: &str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(reply.body));
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    for (name, value) in &reply.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    let content_type = HeaderValue::from_str(&reply.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    insert_timing(&mut response, timing);
    response
}

/// Request headers a forwarded endpoint request carries: what the pipeline reads, and what
/// the endpoint's plugins may see.
fn passed_on(headers: &HeaderMap, granted: &[String]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            name == header::CONTENT_TYPE.as_str()
                || name == oip::HEADER_CONTENT_LENGTH.as_str()
                || name == TRACEPARENT.as_str()
                || granted.iter().any(|g| g == name)
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

fn elapsed_us(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl Dispatch {
    /// Where a request for the endpoint `name` runs. A node's request runs here or nowhere (it
    /// was forwarded once already: "not here", and the forwarding node tries another replica);
    /// a client's runs here, or whole on a replica when this node has no such endpoint, or
    /// has the mesh's without its model.
    pub fn endpoint_route(&self, name: &str, origin: Origin) -> Result<EndpointRoute, Failure> {
        let local = self.endpoints.as_ref().and_then(|e| e.get(name));
        if origin == Origin::Node {
            return local.map(EndpointRoute::Here).ok_or_else(|| {
                let node = self.cluster.as_ref().map_or("", |c| c.name());
                Failure::new(
                    FailureClass::NotHere,
                    format!("node '{node}' does not serve endpoint '{name}'"),
                )
            });
        }
        let mesh = self
            .cluster
            .as_ref()
            .and_then(|c| c.view().endpoint(name).cloned());
        match (local, mesh) {
            (Some(endpoint), Some(entry))
                if endpoint.source == Source::Repository
                    && self.engine.model(&endpoint.model).is_none() =>
            {
                Ok(EndpointRoute::Replica(entry))
            }
            (Some(endpoint), _) => Ok(EndpointRoute::Here(endpoint)),
            (None, Some(entry)) => Ok(EndpointRoute::Replica(entry)),
            (None, None) => Err(Failure::new(
                FailureClass::NotFound,
                format!("unknown endpoint '{name}'"),
            )),
        }
    }

    /// Refuses at once when `route` runs the endpoint here and its model is over its wait
    /// bound, or would answer after the request's deadline (`timeout` from `started`, when a
    /// header gave it): every door asks before it reads or converts what the plugins would
    /// get, so under overload a refusal costs no body, decode or plugin call.
    pub fn refuse_if_overloaded(
        &self,
        route: &EndpointRoute,
        timeout: Option<Duration>,
        started: Instant,
    ) -> Result<(), InferError> {
        match route {
            EndpointRoute::Here(endpoint) => self.engine.refuse_if_overloaded(
                &endpoint.model,
                endpoint.version.as_deref(),
                timeout,
                started,
            ),
            EndpointRoute::Replica(_) => Ok(()),
        }
    }

    /// Runs an endpoint request where `route` says. Past its deadline it is not run at all
    /// (504); here, the answer names the plugin versions that made it.
    pub async fn invoke(
        &self,
        route: EndpointRoute,
        call: Invocation<'_>,
    ) -> Result<Response<Bytes>, DispatchError> {
        if let Some(timeout) = call.timeout
            && call.started.elapsed() >= timeout
        {
            let name = match &route {
                EndpointRoute::Here(endpoint) => endpoint.name.clone(),
                EndpointRoute::Replica(entry) => entry.name.clone(),
            };
            return Err(InferError::DeadlineExceeded {
                model: name,
                waited_us: elapsed_us(call.started.elapsed()),
                timeout_us: elapsed_us(timeout),
                ran: false,
            }
            .into());
        }
        // Boxed: the pipeline's state machine is kilobytes, and unboxed it would sit in every
        // request future that might take an endpoint's branch, model requests included, and be
        // copied with it each time one is moved (HTTP/2 moves each stream's future into a task).
        Box::pin(async move {
            match route {
                EndpointRoute::Here(endpoint) => self.run_here(&endpoint, call).await,
                EndpointRoute::Replica(entry) => self.forward_whole(&entry, call).await,
            }
        })
        .await
    }

    async fn run_here(
        &self,
        endpoint: &Arc<Endpoint>,
        call: Invocation<'_>,
    ) -> Result<Response<Bytes>, DispatchError> {
        // The pre and post versions this request runs with, taken together.
        let plugins = endpoint.plugins()?;
        if !self.serves(&endpoint.model) {
            return Err(InferError::EndpointUnavailable {
                endpoint: endpoint.name.clone(),
                reason: format!(
                    "its model '{}' is not loaded on this node or served by the mesh",
                    endpoint.model
                ),
            }
            .into());
        }
        let mut response = self.pipeline(endpoint, &plugins, call).await?;
        if let Ok(tag) = HeaderValue::from_str(&plugins.tag)
            && !plugins.tag.is_empty()
        {
            response.headers_mut().insert(PLUGINS_HEADER, tag);
        }
        Ok(response)
    }

    async fn pipeline(
        &self,
        endpoint: &Arc<Endpoint>,
        plugins: &EndpointPlugins,
        call: Invocation<'_>,
    ) -> Result<Response<Bytes>, DispatchError> {
        let Invocation {
            headers,
            body,
            timeout,
            started,
        } = call;
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let mut timings = PluginTimings::default();
        let metrics = self.engine.metrics();

        let (mut request, encoding) = match &plugins.pre {
            Some(pre) => {
                let view = endpoint.request_view(pre, content_type, header_pairs(headers), body);
                let t = Instant::now();
                let answer = preprocess(pre, view).await;
                let elapsed = t.elapsed();
                metrics.record_plugin_stage(&endpoint.name, "pre", elapsed);
                timings.pre = Some(elapsed);
                let inputs = match answer? {
                    PreAnswer::Infer(inputs) => inputs,
                    PreAnswer::Reply(reply) => {
                        let timing = format!(
                            "{}total;dur={}",
                            timings.header_parts(),
                            Ms(started.elapsed())
                        );
                        return Ok(reply_response(reply, &timing));
                    }
                };
                let request = InferRequest {
                    model: endpoint.model.clone(),
                    version: endpoint.version.clone(),
                    inputs,
                    ..InferRequest::default()
                };
                (request, OutputEncoding::Json)
            }
            None => decode_oip(endpoint, headers, &body)?,
        };
        request.timeout = timeout;
        let model_call = Call {
            request,
            traceparent: traceparent(headers),
            origin: Origin::Client,
        };
        let ran = self.infer(model_call).await.map_err(|e| {
            match (e.invalid_input(), &plugins.pre) {
                // Tensors a pre-plugin made that the model refuses are the plugin's fault, not
                // the client's.
                (Some(message), Some(pre)) => DispatchError::Local(InferError::PluginFailed {
                    plugin: pre.name().to_string(),
                    cause: format!("returned tensors the model does not accept: {message}"),
                }),
                _ => e,
            }
        })?;
        timings.hop = hop_timing(&ran);
        let mut response = ran.response;
        response.model_name = endpoint.name.clone();

        let answer = match &plugins.post {
            None => PostAnswer::Tensors(std::mem::take(&mut response.outputs)),
            Some(post) => {
                let context = endpoint.context_view(post, content_type, header_pairs(headers));
                let t = Instant::now();
                let answer = postprocess(post, context, &response.outputs).await;
                let elapsed = t.elapsed();
                metrics.record_plugin_stage(&endpoint.name, "post", elapsed);
                timings.post = Some(elapsed);
                answer?
            }
        };
        let timing = server_timing(&response, &timings.header_parts(), started.elapsed());
        Ok(match answer {
            PostAnswer::Tensors(outputs) => {
                response.outputs = outputs;
                let mut http = oip::encode_response(&response, &encoding).into_http();
                insert_timing(&mut http, &timing);
                http
            }
            PostAnswer::Reply(reply) => reply_response(reply, &timing),
        })
    }

    /// Forwards an endpoint request whole to a replica of its model, which runs pre → model →
    /// post; its answer comes back unchanged, with the route to the replicas and the hop timed.
    async fn forward_whole(
        &self,
        entry: &EndpointEntry,
        call: Invocation<'_>,
    ) -> Result<Response<Bytes>, DispatchError> {
        let cluster = self
            .cluster
            .as_ref()
            .ok_or_else(|| InferError::EndpointNotFound {
                endpoint: entry.name.clone(),
            })?;
        let left = call
            .timeout
            .map(|t| t.saturating_sub(call.started.elapsed()));
        let wire = EndpointCall {
            endpoint: entry.name.clone(),
            headers: passed_on(call.headers, &entry.headers),
            body: call.body,
            timeout_us: left.map(elapsed_us),
        };
        let sent = Instant::now();
        let timeout = left.unwrap_or(cluster.forward_timeout());
        let (answer, route) = cluster
            .forward_endpoint(&entry.model, wire, timeout)
            .await
            .map_err(DispatchError::Remote)?;
        let hop = sent.elapsed();
        let mut response = Response::new(answer.body);
        *response.status_mut() =
            StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let out = response.headers_mut();
        for (name, value) in &answer.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) && name != header::CONTENT_LENGTH
                && name != header::TRANSFER_ENCODING
                && name != header::CONNECTION
            {
                out.append(name, value);
            }
        }
        // The replica's own stages follow the hop, as for a forwarded model.
        let replica_timing = out
            .get(SERVER_TIMING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let timing = format!(
            "forward;dur={};desc=\"{}\", {replica_timing}",
            Ms(hop),
            answer.node
        );
        insert_timing(&mut response, timing.trim_end_matches([',', ' ']));
        if let Ok(value) = HeaderValue::from_str(&route_header(&route)) {
            response.headers_mut().insert(ROUTE_HEADER, value);
        }
        response.extensions_mut().insert(RanOn(answer.node));
        Ok(response)
    }
}

/// An endpoint without a pre-plugin takes an OIP request for its model.
fn decode_oip(
    endpoint: &Endpoint,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(InferRequest, OutputEncoding), InferError> {
    let json_length = match headers.get(oip::HEADER_CONTENT_LENGTH) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    InferError::InvalidInput(format!(
                        "header {} must be a whole number",
                        oip::HEADER_CONTENT_LENGTH
                    ))
                })?,
        ),
    };
    let decoded = oip::decode_request(
        &endpoint.model,
        endpoint.version.as_deref(),
        body,
        json_length,
    )
    .map_err(|e| InferError::InvalidInput(e.0))?;
    Ok((decoded.request, decoded.binary_outputs))
}
