//! What a guest sees of the request it is called for: the `request` resource of the pre stage
//! and the `context` resource of the post stage, holding only the headers its endpoint grants.

use bytes::Bytes;
use std::sync::Arc;

/// A request as the pre stage's guest sees it (the `request` resource).
pub struct RequestView {
    pub(crate) endpoint: Arc<str>,
    pub(crate) content_type: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Bytes,
}

/// What the post stage's guest knows of the request (the `context` resource).
pub struct ContextView {
    pub(crate) endpoint: Arc<str>,
    pub(crate) model: String,
    pub(crate) content_type: String,
    pub(crate) headers: Vec<(String, String)>,
}

impl RequestView {
    /// A request with these (already filtered) headers.
    pub fn new(
        endpoint: &str,
        content_type: &str,
        headers: Vec<(String, String)>,
        body: Bytes,
    ) -> RequestView {
        RequestView {
            endpoint: endpoint.into(),
            content_type: content_type.to_string(),
            headers,
            body,
        }
    }
}

impl ContextView {
    /// A context with these (already filtered) headers.
    pub fn new(
        endpoint: &str,
        model: &str,
        content_type: &str,
        headers: Vec<(String, String)>,
    ) -> ContextView {
        ContextView {
            endpoint: endpoint.into(),
            model: model.to_string(),
            content_type: content_type.to_string(),
            headers,
        }
    }
}

/// The first value of header `name` (any case).
pub(crate) fn first_header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}
