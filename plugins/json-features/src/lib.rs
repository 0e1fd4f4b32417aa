//! Named fields of a JSON body into one input tensor.
//!
//! Config (the endpoint's `config` string, JSON):
//! `{"input": "features", "fields": ["amount", "hour"], "datatype": "FP32"}`. A body that is
//! an object gives one row; an array of objects gives a batch. `datatype` is FP32 (default),
//! FP64 or INT64. A missing or non-numeric field is a 400 that names it; other keys are ignored.
//!
//! The body is parsed in one pass straight into the row's slots (no JSON tree): this plugin sits
//! in front of small models, where its parse is most of the request's cost.

use meshserve_guest::{Error, Plugin, Pre, Preprocess, Request, Tensor, config_json};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::collections::HashMap;
use std::fmt;

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

/// The plugin: its config, parsed once per instance, and each field's column.
pub struct JsonFeatures {
    config: Config,
    columns: HashMap<String, usize>,
}

impl Plugin for JsonFeatures {
    fn init(config: &str) -> Result<Self, Error> {
        let config: Config = config_json(config)?;
        if !matches!(config.datatype.as_str(), "FP32" | "FP64" | "INT64") {
            return Err(Error::internal(format!(
                "json-features: unsupported datatype {}",
                config.datatype
            )));
        }
        let columns = config
            .fields
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), i))
            .collect();
        Ok(JsonFeatures { config, columns })
    }
}

/// Parses the body into `values`, row after row; returns the number of rows.
struct Body<'a> {
    plugin: &'a JsonFeatures,
    values: &'a mut Vec<f64>,
}

/// One JSON object into the next row of `values`.
struct Row<'a> {
    plugin: &'a JsonFeatures,
    values: &'a mut Vec<f64>,
    row: usize,
}

impl<'de> DeserializeSeed<'de> for Row<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Row<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of numbers")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let width = self.plugin.config.fields.len();
        let start = self.values.len();
        self.values.resize(start + width, f64::NAN);
        let mut seen = 0;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match self.plugin.columns.get(key.as_ref()) {
                Some(&column) => {
                    let value = map.next_value::<f64>().map_err(|_| {
                        de::Error::custom(format!(
                            "row {}: field '{key}' is not a number",
                            self.row
                        ))
                    })?;
                    if self.values[start + column].is_nan() {
                        seen += 1;
                    }
                    self.values[start + column] = value;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if seen < width {
            let missing = (0..width)
                .find(|&c| self.values[start + c].is_nan())
                .map_or("?", |c| self.plugin.config.fields[c].as_str());
            return Err(de::Error::custom(format!(
                "row {}: field '{missing}' is missing or not a number",
                self.row
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Body<'_> {
    type Value = usize;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Body<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object or an array of objects")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<usize, A::Error> {
        let row = Row {
            plugin: self.plugin,
            values: self.values,
            row: 0,
        };
        row.visit_map(map)?;
        Ok(1)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut rows = 0;
        while seq
            .next_element_seed(Row {
                plugin: self.plugin,
                values: self.values,
                row: rows,
            })?
            .is_some()
        {
            rows += 1;
        }
        Ok(rows)
    }
}

impl Preprocess for JsonFeatures {
    fn preprocess(&mut self, request: &Request) -> Result<Pre, Error> {
        let body = request.body();
        let mut values = Vec::with_capacity(self.config.fields.len());
        let mut deserializer = serde_json::Deserializer::from_slice(&body);
        let rows = Body {
            plugin: self,
            values: &mut values,
        }
        .deserialize(&mut deserializer)
        .and_then(|rows| deserializer.end().map(|()| rows))
        .map_err(|e| Error::bad_request(format!("body: {e}")))?;
        let config = &self.config;
        let shape = vec![rows as i64, config.fields.len() as i64];
        let input = config.input.clone();
        let tensor = match config.datatype.as_str() {
            "FP64" => Tensor::fp64(input, shape, values),
            "INT64" => Tensor::int64(input, shape, values.into_iter().map(|v| v as i64).collect()),
            _ => Tensor::fp32(input, shape, values.into_iter().map(|v| v as f32).collect()),
        };
        Ok(vec![tensor].into())
    }
}

meshserve_guest::export_plugin!(JsonFeatures: pre);
