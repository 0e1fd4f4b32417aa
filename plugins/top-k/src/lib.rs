//! Scores into the k best labels.
//!
//! Config (JSON): `{"output": "scores", "labels": ["a", "b", ...], "k": 3}`; `output` defaults
//! to the model's first output and `k` to 5. For each row the answer lists the `k` highest
//! scores with their labels, best first: `{"top": [{"label": "b", "score": 0.9}, ...]}`; several
//! rows answer an array of those.

use meshserve_guest::{Answer, Context, Error, Plugin, Postprocess, Tensor, config_json};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    output: Option<String>,
    labels: Vec<String>,
    #[serde(default = "five")]
    k: usize,
}

fn five() -> usize {
    5
}

#[derive(Serialize)]
struct Ranked<'a> {
    label: &'a str,
    score: f32,
}

#[derive(Serialize)]
struct Row<'a> {
    top: Vec<Ranked<'a>>,
}

/// The plugin: its config, parsed once per instance.
pub struct TopK {
    config: Config,
}

impl Plugin for TopK {
    fn init(config: &str) -> Result<Self, Error> {
        Ok(TopK {
            config: config_json(config)?,
        })
    }
}

impl Postprocess for TopK {
    fn postprocess(&mut self, _context: &Context, outputs: Vec<Tensor>) -> Result<Answer, Error> {
        let config = &self.config;
        let output = match &config.output {
            Some(name) => outputs.iter().find(|t| &t.name == name),
            None => outputs.first(),
        }
        .ok_or_else(|| Error::internal("top-k: the model produced no such output"))?;
        let scores = output
            .as_f32()
            .ok_or_else(|| Error::internal("top-k: scores must be FP32"))?;
        let width = output.shape.last().copied().unwrap_or(0).max(0) as usize;
        if width != config.labels.len() {
            return Err(Error::internal(format!(
                "top-k: {} labels configured, the model scores {width} classes",
                config.labels.len()
            )));
        }
        let rows: Vec<Row<'_>> = scores
            .chunks(width.max(1))
            .map(|row| {
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                Row {
                    top: order
                        .into_iter()
                        .take(config.k)
                        .map(|i| Ranked {
                            label: &config.labels[i],
                            score: row[i],
                        })
                        .collect(),
                }
            })
            .collect();
        match rows.as_slice() {
            [one] => Answer::json(one),
            many => Answer::json(&many),
        }
    }
}

meshserve_guest::export_plugin!(TopK: post);
