//! Scored candidates into the k best, best first: `{"items": [{"item": "i01422", "score":
//! 0.93}, ...]}`.
//!
//! Config (JSON, optional): `{"scores": "score", "ids": "item_ids", "k": 10}`: the outputs
//! holding one score per candidate and the candidates' ids (BYTES, as many), and how many to
//! return. A client may ask for fewer or more with the `x-top-k` header, when the endpoint lets
//! this plugin see it (`headers = ["x-top-k"]`), up to `max_k` (default 100).

use meshserve_guest::{Answer, Context, Error, Plugin, Postprocess, Tensor, config_json};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    scores: String,
    ids: String,
    k: usize,
    max_k: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            scores: "score".into(),
            ids: "item_ids".into(),
            k: 10,
            max_k: 100,
        }
    }
}

#[derive(Serialize)]
struct Ranked<'a> {
    item: &'a str,
    score: f32,
}

#[derive(Serialize)]
struct Ranking<'a> {
    items: Vec<Ranked<'a>>,
}

/// The plugin: its config, parsed once per instance.
pub struct RankedItems {
    config: Config,
}

impl Plugin for RankedItems {
    fn init(config: &str) -> Result<Self, Error> {
        Ok(RankedItems {
            config: config_json(config)?,
        })
    }
}

fn output<'a>(outputs: &'a [Tensor], name: &str) -> Result<&'a Tensor, Error> {
    outputs
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::internal(format!("ranked-items: the model has no output '{name}'")))
}

/// The `k` best of `scores` (index, score), best first; ties keep candidate order.
pub fn top_k(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.into_iter().take(k).map(|i| (i, scores[i])).collect()
}

impl Postprocess for RankedItems {
    fn postprocess(&mut self, context: &Context, outputs: Vec<Tensor>) -> Result<Answer, Error> {
        let config = &self.config;
        let scores = output(&outputs, &config.scores)?
            .as_f32()
            .ok_or_else(|| Error::internal("ranked-items: scores must be FP32"))?;
        let ids = output(&outputs, &config.ids)?
            .as_bytes()
            .ok_or_else(|| Error::internal("ranked-items: ids must be BYTES"))?;
        if ids.len() != scores.len() {
            return Err(Error::internal(format!(
                "ranked-items: {} scores for {} ids",
                scores.len(),
                ids.len()
            )));
        }
        let k = match context.header("x-top-k") {
            Some(text) => match text.trim().parse::<usize>() {
                Ok(k) if (1..=config.max_k).contains(&k) => k,
                _ => {
                    return Err(Error::bad_request(format!(
                        "x-top-k must be a number from 1 to {}",
                        config.max_k
                    )));
                }
            },
            None => config.k,
        };
        let names: Vec<&str> = ids
            .iter()
            .map(|id| std::str::from_utf8(id).unwrap_or("?"))
            .collect();
        let items = top_k(scores, k)
            .into_iter()
            .map(|(i, score)| Ranked {
                item: names[i],
                score,
            })
            .collect();
        Answer::json(&Ranking { items })
    }
}

meshserve_guest::export_plugin!(RankedItems: post);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_come_first_and_ties_keep_their_order() {
        let ranked = top_k(&[0.2, 0.9, 0.5, 0.9, 0.1], 3);
        assert_eq!(ranked, vec![(1, 0.9), (3, 0.9), (2, 0.5)]);
        assert_eq!(top_k(&[0.3], 10), vec![(0, 0.3)]);
    }
}
