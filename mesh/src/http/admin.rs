//! Authority for admin operations: loading and unloading models, reloading an endpoint's
//! plugins. With `http.admin_token_file` set they need `Authorization: Bearer <token>`; without
//! it they are allowed from loopback clients only (a node's own operator), and refused from
//! anywhere else with 403 and what to configure.

use crate::http::error::ApiError;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meshserve_host::ErrorClass;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// The client's address, put on every request by the server that accepted it.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Who may run admin operations.
#[derive(Clone)]
pub enum AdminAccess {
    /// Clients on the node's own machine only.
    LoopbackOnly,
    /// Whoever presents this bearer token, from anywhere.
    Token(Arc<[u8]>),
}

/// Shortest token accepted: guessing must not be practical.
const MIN_TOKEN_BYTES: usize = 16;

/// Why the admin token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    /// The file cannot be read.
    #[error("admin token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The token is too short to be secret.
    #[error(
        "admin token in {0} is shorter than {MIN_TOKEN_BYTES} bytes (make one with `head -c 32 /dev/urandom | base64`)"
    )]
    TooShort(String),
}

impl AdminAccess {
    /// A token read from `path` (surrounding whitespace ignored).
    pub fn from_token_file(path: &Path) -> Result<AdminAccess, AdminTokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| AdminTokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let token = text.trim();
        if token.len() < MIN_TOKEN_BYTES {
            return Err(AdminTokenError::TooShort(path.display().to_string()));
        }
        Ok(AdminAccess::Token(token.as_bytes().into()))
    }
}

/// Equal without revealing where two byte strings first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware of the admin routes.
pub async fn require_admin(
    State(access): State<AdminAccess>,
    request: Request,
    next: Next,
) -> Response {
    let from = request.extensions().get::<ClientAddr>().map(|a| a.0);
    match authorize(&access, request.headers(), from) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            if refusal.class == ErrorClass::Forbidden {
                crate::warn_throttled!(path = %request.uri().path(), reason = %refusal.message, "admin operation refused");
            }
            let unauthorized = refusal.class == ErrorClass::Unauthorized;
            let mut response = refusal.into_response();
            if unauthorized {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            response
        }
    }
}

/// Whether a request with `headers`, from `from`, has admin authority: the token as
/// `Authorization: Bearer <token>` when the node has one, else a loopback client. Every door
/// (REST, gRPC) asks this one function.
pub fn authorize(
    access: &AdminAccess,
    headers: &http::HeaderMap,
    from: Option<SocketAddr>,
) -> Result<(), ApiError> {
    match access {
        AdminAccess::Token(token) => {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if presented.is_some_and(|p| constant_time_eq(p.trim().as_bytes(), token)) {
                return Ok(());
            }
            Err(ApiError::new(
                ErrorClass::Unauthorized,
                "admin operation: send the node's admin token as `Authorization: Bearer <token>`",
            ))
        }
        AdminAccess::LoopbackOnly => {
            let from = from.map(|a| a.ip());
            if from.is_some_and(|ip| ip.is_loopback()) {
                return Ok(());
            }
            let from = from.map_or_else(|| "an unknown address".to_string(), |ip| ip.to_string());
            Err(ApiError::new(
                ErrorClass::Forbidden,
                format!(
                    "admin operations are allowed from loopback only; {from} is not (set http.admin_token_file to allow them with a token)"
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole_and_short_ones_are_refused() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abcdef", b"abcde"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(
            AdminAccess::from_token_file(&path),
            Err(AdminTokenError::TooShort(_))
        ));
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        assert!(matches!(
            AdminAccess::from_token_file(&path),
            Ok(AdminAccess::Token(t)) if &*t == b"0123456789abcdef0123"
        ));
    }

    async fn status_of(
        access: AdminAccess,
        from: Option<&str>,
        authorization: Option<&str>,
    ) -> (u16, String) {
        use axum::body::Body;
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route("/admin", axum::routing::post(|| async { "done" }))
            .route_layer(axum::middleware::from_fn_with_state(access, require_admin));
        let mut request = axum::http::Request::post("/admin");
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let mut request = request.body(Body::empty()).unwrap();
        if let Some(from) = from {
            request
                .extensions_mut()
                .insert(ClientAddr(from.parse().unwrap()));
        }
        let response = app.oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn without_a_token_only_loopback_clients_may_administer() {
        let loopback = || AdminAccess::LoopbackOnly;
        assert_eq!(
            status_of(loopback(), Some("127.0.0.1:5000"), None).await.0,
            200
        );
        assert_eq!(status_of(loopback(), Some("[::1]:5000"), None).await.0, 200);
        let (status, body) = status_of(loopback(), Some("10.1.2.3:5000"), None).await;
        assert_eq!(status, 403);
        assert!(
            body.contains("loopback only") && body.contains("10.1.2.3"),
            "{body}"
        );
        assert!(
            body.contains("admin_token_file"),
            "says what to configure: {body}"
        );
        assert_eq!(
            status_of(loopback(), None, None).await.0,
            403,
            "unknown peer"
        );
    }

    #[tokio::test]
    async fn with_a_token_everyone_needs_it() {
        let token = || AdminAccess::Token(b"0123456789abcdef0123".as_slice().into());
        let remote = Some("10.1.2.3:5000");
        let right = Some("Bearer 0123456789abcdef0123");
        assert_eq!(status_of(token(), remote, right).await.0, 200);
        for wrong in [
            None,
            Some("Bearer 0123456789abcdef0124"),
            Some("0123456789abcdef0123"),
        ] {
            let (status, body) = status_of(token(), remote, wrong).await;
            assert_eq!(status, 401, "{wrong:?}");
            assert!(body.contains("Bearer"), "{body}");
        }
        assert_eq!(
            status_of(token(), Some("127.0.0.1:1"), None).await.0,
            401,
            "loopback too"
        );
    }
}
