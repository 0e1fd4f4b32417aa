//! A user and their candidate items into the ranking model's inputs: one row per candidate,
//! the user's features next to the item's, both looked up in feature tables.
//!
//! Body: `{"user": "u00017", "items": ["i00003", "i01422", ...]}`.
//! Config (JSON, optional): `{"users": "users", "items": "items", "features": 8,
//! "max_candidates": 1000}`. Inputs made: `user` FP32 [N, features], `item` FP32
//! [N, features] and `item_id` BYTES [N] (the candidates, which the model passes through so
//! the post stage can name them). A user the table does not know ranks with zero features
//! (cold start); a candidate the table does not know is left out, and a request none of
//! whose candidates are known is refused (422), as is one with too many candidates (400).

use meshserve_guest::{Error, Plugin, Pre, Preprocess, Request, Tensor, config_json, host};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    users: String,
    items: String,
    features: usize,
    max_candidates: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            users: "users".into(),
            items: "items".into(),
            features: 8,
            max_candidates: 1000,
        }
    }
}

#[derive(Deserialize)]
struct Body {
    user: String,
    items: Vec<String>,
}

/// The plugin: its config, parsed once per instance.
pub struct RecsysFeatures {
    config: Config,
}

impl Plugin for RecsysFeatures {
    fn init(config: &str) -> Result<Self, Error> {
        let config: Config = config_json(config)?;
        if config.features == 0 || config.max_candidates == 0 {
            return Err(Error::internal(
                "recsys-features: features and max_candidates must be positive",
            ));
        }
        Ok(RecsysFeatures { config })
    }
}

/// A table row as exactly `width` numbers: a row of another width is a broken table, which is
/// the operator's to fix, not the client's.
fn row(table: &str, key: &str, width: usize) -> Result<Option<Vec<f32>>, Error> {
    match host::lookup_f32(table, key) {
        None => Ok(None),
        Some(values) if values.len() == width => Ok(Some(values)),
        Some(values) => Err(Error::internal(format!(
            "recsys-features: table '{table}' has {} values for '{key}', the model takes {width}",
            values.len()
        ))),
    }
}

impl Preprocess for RecsysFeatures {
    fn preprocess(&mut self, request: &Request) -> Result<Pre, Error> {
        let config = &self.config;
        let body: Body = request.json()?;
        if body.items.is_empty() {
            return Err(Error::bad_request("no candidate items in the body"));
        }
        if body.items.len() > config.max_candidates {
            return Err(Error::bad_request(format!(
                "{} candidate items; at most {} per request",
                body.items.len(),
                config.max_candidates
            )));
        }
        let width = config.features;
        let user = row(&config.users, &body.user, width)?.unwrap_or_else(|| vec![0.0; width]);
        let mut users = Vec::with_capacity(body.items.len() * width);
        let mut items = Vec::with_capacity(body.items.len() * width);
        let mut ids = Vec::with_capacity(body.items.len());
        for id in body.items {
            if let Some(features) = row(&config.items, &id, width)? {
                users.extend_from_slice(&user);
                items.extend(features);
                ids.push(id.into_bytes());
            }
        }
        if ids.is_empty() {
            return Err(Error::unprocessable(
                "none of the candidate items is in the item table",
            ));
        }
        let rows = ids.len() as i64;
        Ok(vec![
            Tensor::fp32("user", vec![rows, width as i64], users),
            Tensor::fp32("item", vec![rows, width as i64], items),
            Tensor::bytes("item_id", vec![rows], ids),
        ]
        .into())
    }
}

meshserve_guest::export_plugin!(RecsysFeatures: pre);
