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
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use std::fmt;

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

/// One transaction (an object) or several (an array), told apart by the first token rather than
/// by serde's `untagged`, which copies the whole body into a tree of its own before trying each
/// shape, and then reports only that no shape fit instead of what is wrong.
struct Body(Vec<Transaction>);

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Body, D::Error> {
        struct Shape;
        impl<'de> Visitor<'de> for Shape {
            type Value = Body;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a transaction object or an array of them")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Body, A::Error> {
                Transaction::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|t| Body(vec![t]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Body, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Body)
            }
        }
        deserializer.deserialize_any(Shape)
    }
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
        let Body(transactions) = request.json::<Body>()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use meshserve_guest::testing;
    use serde_json::json;

    fn preprocess(body: serde_json::Value) -> Result<Pre, Error> {
        let request = testing::request().json(&body).build();
        FraudFeatures::init(r#"{"table": "cards"}"#)?.preprocess(&request)
    }

    #[test]
    fn a_known_card_brings_its_scaled_history_into_the_features() {
        testing::put_table_f32("cards", "c1", &[100.0, 10.0, 1.0, 365.0]);
        let pre = preprocess(json!({"card": "c1", "amount": 200.0})).unwrap();
        let tensor = &pre.tensors().unwrap()[0];
        assert_eq!(tensor.name, "features");
        assert_eq!(tensor.shape, vec![1, FEATURES as i64]);
        let values = tensor.as_f32().unwrap();
        assert_eq!(&values[8..13], &[1.0, 0.1, 0.1, 0.1, 1.0]);
        assert_eq!(values[13], 0.02, "amount over the card's average, over 100");
    }

    #[test]
    fn an_unknown_card_has_no_history_and_a_batch_makes_one_row_each() {
        let pre =
            preprocess(json!([{"card": "new", "amount": 5.0}, {"card": "c2", "amount": 1.0}]))
                .unwrap();
        let tensor = &pre.tensors().unwrap()[0];
        assert_eq!(tensor.shape, vec![2, FEATURES as i64]);
        assert_eq!(tensor.as_f32().unwrap()[8], 0.0);
    }

    #[test]
    fn a_malformed_or_empty_body_is_the_clients_fault() {
        let missing_amount = preprocess(json!({"card": "c1"})).err().unwrap();
        assert_eq!(missing_amount.status, 400);
        assert!(missing_amount.message.contains("malformed JSON body"));
        assert!(
            missing_amount.message.contains("missing field `amount`"),
            "the message names what is wrong: {}",
            missing_amount.message
        );
        let in_a_batch = preprocess(json!([{"card": "c1", "amount": 1.0}, {"card": 7}]))
            .err()
            .unwrap();
        assert_eq!(in_a_batch.status, 400);
        assert!(
            in_a_batch.message.contains("expected a string"),
            "{}",
            in_a_batch.message
        );
        let neither = preprocess(json!(12)).err().unwrap();
        assert_eq!(neither.status, 400);
        assert!(
            neither
                .message
                .contains("a transaction object or an array of them"),
            "{}",
            neither.message
        );
        let empty = preprocess(json!([])).err().unwrap();
        assert_eq!(empty.status, 400);
        assert_eq!(empty.message, "no transactions in the body");
    }
}
