//! A fraud probability into a decision.
//!
//! Config (JSON, every key optional):
//! `{"output": "probabilities", "index": 1, "review": 0.5, "block": 0.9}`. For each row of the
//! output, `score` is the element at `index`; the decision is `block` at or above `block`,
//! `review` at or above `review`, else `allow`. One row answers an object, several an array.

use meshserve_guest::{Answer, Context, Error, Plugin, Postprocess, Tensor, config_json};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    output: String,
    index: usize,
    review: f32,
    block: f32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            output: "probabilities".into(),
            index: 1,
            review: 0.5,
            block: 0.9,
        }
    }
}

#[derive(Serialize)]
struct Decision {
    decision: &'static str,
    score: f32,
}

/// The plugin: its config, parsed once per instance.
pub struct Threshold {
    config: Config,
}

impl Plugin for Threshold {
    fn init(config: &str) -> Result<Self, Error> {
        Ok(Threshold {
            config: config_json(config)?,
        })
    }
}

impl Postprocess for Threshold {
    fn postprocess(&mut self, _context: &Context, outputs: Vec<Tensor>) -> Result<Answer, Error> {
        let config = &self.config;
        let output = outputs
            .iter()
            .find(|t| t.name == config.output)
            .ok_or_else(|| {
                Error::internal(format!(
                    "threshold: the model has no output '{}'",
                    config.output
                ))
            })?;
        let scores = output.as_f32().ok_or_else(|| {
            Error::internal(format!("threshold: output '{}' is not FP32", config.output))
        })?;
        let width = output.shape.last().copied().unwrap_or(1).max(1) as usize;
        if config.index >= width {
            return Err(Error::internal(format!(
                "threshold: index {} is outside rows of {width}",
                config.index
            )));
        }
        let decisions: Vec<Decision> = scores
            .chunks(width)
            .map(|row| {
                let score = row[config.index];
                let decision = if score >= config.block {
                    "block"
                } else if score >= config.review {
                    "review"
                } else {
                    "allow"
                };
                Decision { decision, score }
            })
            .collect();
        match decisions.as_slice() {
            [one] => Answer::json(one),
            many => Answer::json(&many),
        }
    }
}

meshserve_guest::export_plugin!(Threshold: post);
