//! A card transaction into the fraud model's 32 features, enriched with the card's history
//! from a feature table.
//!
//! Body: `{"card": "c1", "amount": 120.5, "hour": 23, "merchant_risk": 0.3, "foreign": true,
//! "online": false}` (or an array of those for a batch). Only `card` and `amount` are required.
//! Config (JSON, optional): `{"table": "cards", "input": "features"}`. The table row of a card
//! holds four numbers: average amount, transactions in 30 days, chargebacks, days since first
//! seen. An unknown card is not an error: its history is zero and feature 8 says so.

use meshserve_guest::{Error, Plugin, Pre, Preprocess, Request, Tensor, config_json, host};
use serde::Deserialize;

/// Features the fraud model takes per transaction.
pub const FEATURES: usize = 32;

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    table: String,
    input: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            table: "cards".into(),
            input: "features".into(),
        }
    }
}

#[derive(Deserialize)]
struct Transaction {
    card: String,
    amount: f32,
    #[serde(default)]
    hour: f32,
    #[serde(default)]
    merchant_risk: f32,
    #[serde(default)]
    foreign: bool,
    #[serde(default)]
    online: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Body {
    One(Transaction),
    Many(Vec<Transaction>),
}

/// The feature vector of one transaction given its card's history (if known).
pub fn features(
    amount: f32,
    hour: f32,
    merchant_risk: f32,
    foreign: bool,
    online: bool,
    history: Option<&[f32]>,
) -> [f32; FEATURES] {
    let h = |i: usize| history.and_then(|v| v.get(i)).copied().unwrap_or(0.0);
    let angle = std::f32::consts::TAU * hour / 24.0;
    let base = [
        amount / 1000.0,
        amount.max(0.0).ln_1p() / 10.0,
        hour / 23.0,
        angle.sin(),
        angle.cos(),
        merchant_risk,
        f32::from(u8::from(foreign)),
        f32::from(u8::from(online)),
        f32::from(u8::from(history.is_some())),
        h(0) / 1000.0,
        h(1) / 100.0,
        h(2) / 10.0,
        h(3) / 365.0,
        (amount / h(0).max(1.0)).min(100.0) / 100.0,
    ];
    let mut out = [0.0; FEATURES];
    out[..base.len()].copy_from_slice(&base);
    // Pairwise interactions fill the rest, so the model sees e.g. amount × foreign directly.
    for (k, slot) in out[base.len()..].iter_mut().enumerate() {
        *slot = base[k % base.len()] * base[(k * 5 + 3) % base.len()];
    }
    out
}

/// The plugin: its config, parsed once per instance.
pub struct FraudFeatures {
    config: Config,
}

impl Plugin for FraudFeatures {
    fn init(config: &str) -> Result<Self, Error> {
        Ok(FraudFeatures {
            config: config_json(config)?,
        })
    }
}

impl Preprocess for FraudFeatures {
    fn preprocess(&mut self, request: &Request) -> Result<Pre, Error> {
        let config = &self.config;
        let transactions = match request.json::<Body>()? {
            Body::One(t) => vec![t],
            Body::Many(ts) => ts,
        };
        if transactions.is_empty() {
            return Err(Error::bad_request("no transactions in the body"));
        }
        let mut values = Vec::with_capacity(transactions.len() * FEATURES);
        for t in &transactions {
            let history = host::lookup_f32(&config.table, &t.card);
            values.extend(features(
                t.amount,
                t.hour,
                t.merchant_risk,
                t.foreign,
                t.online,
                history.as_deref(),
            ));
        }
        Ok(vec![Tensor::fp32(
            config.input.clone(),
            vec![transactions.len() as i64, FEATURES as i64],
            values,
        )]
        .into())
    }
}

meshserve_guest::export_plugin!(FraudFeatures: pre);
