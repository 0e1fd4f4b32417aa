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

#[cfg(test)]
mod tests {
    use super::*;
    use meshserve_guest::testing;
    use serde_json::json;

    fn decide(config: &str, scores: Vec<f32>, shape: Vec<i64>) -> Result<Answer, Error> {
        let outputs = vec![Tensor::fp32("probabilities", shape, scores)];
        Threshold::init(config)?.postprocess(&testing::context().model("fraud").build(), outputs)
    }

    #[test]
    fn each_row_gets_the_decision_its_score_reaches() {
        let answer = decide("", vec![0.9, 0.1, 0.4, 0.6, 0.05, 0.95], vec![3, 2]).unwrap();
        let body = answer.reply().unwrap().body_json().unwrap();
        assert_eq!(
            body,
            json!([
                {"decision": "allow", "score": 0.1},
                {"decision": "review", "score": 0.6},
                {"decision": "block", "score": 0.95},
            ])
        );
    }

    #[test]
    fn a_missing_output_or_an_index_past_the_row_is_a_500() {
        let missing = decide(r#"{"output": "scores"}"#, vec![0.5], vec![1, 1])
            .err()
            .unwrap();
        assert_eq!(missing.status, 500);
        assert!(missing.message.contains("no output 'scores'"));
        let outside = decide(r#"{"index": 2}"#, vec![0.5, 0.5], vec![1, 2])
            .err()
            .unwrap();
        assert!(outside.message.contains("index 2 is outside rows of 2"));
    }
}
