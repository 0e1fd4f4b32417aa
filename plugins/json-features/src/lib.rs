//! Named fields of a JSON body into one input tensor.
//!
//! Config (the endpoint's `config` string, JSON):
//! `{"input": "features", "fields": ["amount", "hour"], "datatype": "FP32"}`. A body that is
//! an object gives one row; an array of objects gives a batch. `datatype` is FP32 (default),
//! FP64 or INT64. A missing or non-numeric field is a 400 that names it.

use meshserve_guest::{Error, Plugin, Request, Tensor, host};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Config {
    input: String,
    fields: Vec<String>,
    #[serde(default = "fp32")]
    datatype: String,
}

fn fp32() -> String {
    "FP32".into()
}

/// The plugin.
pub struct JsonFeatures;

impl Plugin for JsonFeatures {
    fn preprocess(request: Request) -> Result<Vec<Tensor>, Error> {
        let config: Config = host::config_json()?;
        let body: Value = request.json()?;
        let rows: Vec<&Value> = match &body {
            Value::Array(rows) => rows.iter().collect(),
            object @ Value::Object(_) => vec![object],
            _ => {
                return Err(Error::bad_request(
                    "body must be a JSON object or an array of objects",
                ));
            }
        };
        let mut values = Vec::with_capacity(rows.len() * config.fields.len());
        for (i, row) in rows.iter().enumerate() {
            for field in &config.fields {
                let value = row.get(field).and_then(Value::as_f64).ok_or_else(|| {
                    Error::bad_request(format!(
                        "row {i}: field '{field}' is missing or not a number"
                    ))
                })?;
                values.push(value);
            }
        }
        let shape = vec![rows.len() as i64, config.fields.len() as i64];
        let tensor = match config.datatype.as_str() {
            "FP32" => Tensor::fp32(
                config.input,
                shape,
                values.into_iter().map(|v| v as f32).collect(),
            ),
            "FP64" => Tensor::fp64(config.input, shape, values),
            "INT64" => Tensor::int64(
                config.input,
                shape,
                values.into_iter().map(|v| v as i64).collect(),
            ),
            other => {
                return Err(Error::internal(format!(
                    "json-features: unsupported datatype {other}"
                )));
            }
        };
        Ok(vec![tensor])
    }
}

meshserve_guest::export_plugin!(JsonFeatures);
