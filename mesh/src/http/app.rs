//! The node's HTTP application, shared by every HTTP version: inference requests and endpoint
//! invocations go straight to their handlers, everything else through the axum router
//! ([`crate::http::routes`]). Matching the two hot routes by hand skips the router's
//! per-request work on them (path parameters in a type map, percent-decoded copies, boxed
//! futures, a copy of the headers, the client address in the request's extensions): about ten
//! of a model request's fifty allocations, twelve of an endpoint's. A name that needs
//! percent-decoding still goes through the router, which decodes it.

use crate::http::admin::ClientAddr;
use crate::http::endpoints::invoke_parts;
use crate::http::grpc;
use crate::http::models::infer_parts;
use crate::http::routes::router;
use crate::http::state::AppState;
use axum::Router;
use axum::body::Body;
use axum::response::Response;
use http::{HeaderValue, Method, Request};
use std::net::SocketAddr;
use tower::ServiceExt;

/// The routes and what they share, plus headers every answer carries.
#[derive(Clone)]
pub struct App {
    state: AppState,
    router: Router,
    grpc: grpc::Services,
    alt_svc: Option<HeaderValue>,
}

impl App {
    /// The OIP API (and the node's other routes) over `state`, over REST and gRPC.
    pub fn new(state: AppState) -> App {
        App {
            router: router(state.clone()),
            grpc: grpc::Services::new(state.clone()),
            state,
            alt_svc: None,
        }
    }

    /// Advertises another protocol (HTTP/3) on every answer, as `Alt-Svc: value`.
    pub fn with_alt_svc(mut self, value: HeaderValue) -> App {
        self.alt_svc = Some(value);
        self
    }

    /// Answers one request from `peer`.
    pub async fn serve(&self, request: Request<Body>, peer: SocketAddr) -> Response {
        if grpc::is_grpc(request.version(), request.headers()) {
            let mut request = request;
            request.extensions_mut().insert(ClientAddr(peer));
            return self.grpc.call(request).await;
        }
        let (parts, body) = request.into_parts();
        let mut response = match hot_route(&parts.method, parts.uri.path()) {
            Some(HotRoute::Infer { model, version }) => {
                infer_parts(
                    &self.state,
                    model,
                    version,
                    parts.version,
                    &parts.headers,
                    body,
                )
                .await
            }
            Some(HotRoute::Invoke { endpoint }) => {
                invoke_parts(&self.state, endpoint, parts.version, &parts.headers, body).await
            }
            None => {
                let mut request = Request::from_parts(parts, body);
                request.extensions_mut().insert(ClientAddr(peer));
                let Ok(response) = self.router.clone().oneshot(request).await;
                response
            }
        };
        if let Some(value) = &self.alt_svc {
            response
                .headers_mut()
                .insert(http::header::ALT_SVC, value.clone());
        }
        response
    }
}

/// A request path served without the router.
enum HotRoute<'p> {
    /// `POST /v2/models/{model}/infer` or `POST /v2/models/{model}/versions/{version}/infer`.
    Infer {
        model: &'p str,
        version: Option<&'p str>,
    },
    /// `POST /v1/endpoints/{endpoint}/invocations`.
    Invoke { endpoint: &'p str },
}

/// Recognises the inference and invocation paths with names that need no decoding; anything
/// else is the router's.
fn hot_route<'p>(method: &Method, path: &'p str) -> Option<HotRoute<'p>> {
    if method != Method::POST {
        return None;
    }
    let plain = |name: &str| !name.is_empty() && !name.contains(['/', '%']);
    if let Some(endpoint) = path
        .strip_prefix("/v1/endpoints/")
        .and_then(|rest| rest.strip_suffix("/invocations"))
    {
        return plain(endpoint).then_some(HotRoute::Invoke { endpoint });
    }
    let rest = path.strip_prefix("/v2/models/")?.strip_suffix("/infer")?;
    let (model, version) = match rest.split_once("/versions/") {
        Some((model, version)) => (model, Some(version)),
        None => (rest, None),
    };
    (plain(model) && version.is_none_or(plain)).then_some(HotRoute::Infer { model, version })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_inference_paths_skip_the_router() {
        let post = Method::POST;
        let route = |path: &'static str| match hot_route(&post, path) {
            Some(HotRoute::Infer { model, version }) => Some((model, version)),
            _ => None,
        };
        assert_eq!(route("/v2/models/fraud/infer"), Some(("fraud", None)));
        assert_eq!(
            route("/v2/models/fraud/versions/2/infer"),
            Some(("fraud", Some("2")))
        );
        // A model may be called "versions" or "infer".
        assert_eq!(route("/v2/models/versions/infer"), Some(("versions", None)));
        assert_eq!(route("/v2/models/infer/infer"), Some(("infer", None)));
        for path in [
            "/v2/models/fraud%20x/infer",
            "/v2/models//infer",
            "/v2/models/infer",
            "/v2/models/a/b/infer",
            "/v2/models/fraud/versions//infer",
            "/v2/models/fraud/versions/1/2/infer",
            "/v2/models/fraud/infer/",
            "/v2/models/fraud/ready",
            "/v1/endpoints/fraud/invocations",
        ] {
            assert_eq!(route(path), None, "{path}");
        }
        assert!(hot_route(&Method::GET, "/v2/models/fraud/infer").is_none());
    }

    #[test]
    fn only_plain_invocation_paths_skip_the_router() {
        let post = Method::POST;
        let route = |path: &'static str| match hot_route(&post, path) {
            Some(HotRoute::Invoke { endpoint }) => Some(endpoint),
            _ => None,
        };
        assert_eq!(
            route("/v1/endpoints/fraud-check/invocations"),
            Some("fraud-check")
        );
        // An endpoint may be called "invocations".
        assert_eq!(
            route("/v1/endpoints/invocations/invocations"),
            Some("invocations")
        );
        for path in [
            "/v1/endpoints/fraud%2Dcheck/invocations",
            "/v1/endpoints//invocations",
            "/v1/endpoints/invocations",
            "/v1/endpoints/a/b/invocations",
            "/v1/endpoints/fraud-check/invocations/",
            "/v1/endpoints/fraud-check/reload",
            "/v2/models/fraud/infer",
        ] {
            assert_eq!(route(path), None, "{path}");
        }
        assert!(hot_route(&Method::GET, "/v1/endpoints/fraud-check/invocations").is_none());
    }
}
