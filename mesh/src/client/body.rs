//! Request bodies generated from a model's OIP metadata (`GET /v2/models/{model}`), so
//! `meshserve infer` and the load generator (`meshserve-bench`) drive any OIP server's model
//! without the user writing a body: every input, `rows` rows (a dynamic first dimension), deterministic
//! values, as JSON data or as binary tensors (the OIP binary extension). The metadata comes
//! from a server and is input too: a shape that asks for more than [`MAX_ELEMENTS`] elements
//! is refused rather than built.

use crate::oip::HEADER_CONTENT_LENGTH;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

/// Model metadata the generator cannot make a request from.
#[derive(Debug, thiserror::Error)]
#[error("model metadata: {0}")]
pub struct MetadataError(String);

/// An infer request's JSON part.
#[derive(Serialize)]
pub struct RequestJson<'a> {
    /// Its inputs.
    pub inputs: Vec<InputJson<'a>>,
}

/// One input as OIP clients (Triton's, KServe's) write it: `datatype` before `data`, which
/// lets a server parse the data as it reads it. `json!` would sort the keys, `data` first.
#[derive(Serialize)]
pub struct InputJson<'a> {
    /// The input's name.
    pub name: &'a str,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its OIP datatype.
    pub datatype: &'a str,
    /// `binary_data_size` when the data follows as binary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// The data, as JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// Deterministic FP32 values in [-1, 1) (no RNG crate: a fixed LCG is enough here).
pub fn sample_values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Most elements one generated input may have.
pub const MAX_ELEMENTS: usize = 1 << 22;

/// A body for the inputs `metadata` lists, with the headers it needs.
pub fn request_from_metadata(
    metadata: &Value,
    rows: usize,
    binary: bool,
) -> Result<(Bytes, http::HeaderMap), MetadataError> {
    let invalid = MetadataError;
    let inputs = metadata["inputs"]
        .as_array()
        .filter(|inputs| !inputs.is_empty())
        .ok_or_else(|| invalid(format!("no inputs listed in {metadata}")))?;
    let mut headers = http::HeaderMap::new();
    let mut described = Vec::new();
    let mut payload = Vec::new();
    for (index, input) in inputs.iter().enumerate() {
        let name = input["name"]
            .as_str()
            .ok_or_else(|| invalid(format!("input without a name: {input}")))?;
        let datatype = input["datatype"]
            .as_str()
            .ok_or_else(|| invalid(format!("input '{name}' without a datatype")))?;
        let shape: Vec<i64> = input["shape"]
            .as_array()
            .ok_or_else(|| invalid(format!("input '{name}' without a shape")))?
            .iter()
            .enumerate()
            .map(|(dim, size)| match size.as_i64() {
                Some(n) if n >= 0 => n,
                _ if dim == 0 => rows as i64,
                _ => 1,
            })
            .collect();
        let count = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| {
                invalid(format!(
                    "input '{name}' of shape {shape:?} is over {MAX_ELEMENTS} elements"
                ))
            })?;
        let values = sample_values(count, 7 + index as u64);
        let (data, raw): (Value, Vec<u8>) = match datatype {
            "FP32" => (
                json!(values),
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            "FP64" => (
                json!(values),
                values
                    .iter()
                    .flat_map(|v| f64::from(*v).to_le_bytes())
                    .collect(),
            ),
            "INT64" | "INT32" | "INT16" | "INT8" | "UINT64" | "UINT32" | "UINT16" | "UINT8" => {
                let ints: Vec<i64> = values.iter().map(|v| (v.abs() * 100.0) as i64).collect();
                let width = match datatype {
                    "INT64" | "UINT64" => 8,
                    "INT32" | "UINT32" => 4,
                    "INT16" | "UINT16" => 2,
                    _ => 1,
                };
                let raw = ints
                    .iter()
                    .flat_map(|v| v.to_le_bytes()[..width].to_vec())
                    .collect();
                (json!(ints), raw)
            }
            "BOOL" => {
                let bools: Vec<bool> = values.iter().map(|v| *v > 0.0).collect();
                let raw = bools.iter().map(|b| u8::from(*b)).collect();
                (json!(bools), raw)
            }
            "BYTES" => {
                let words: Vec<String> = (0..count).map(|i| format!("w{i}")).collect();
                let mut raw = Vec::new();
                for word in &words {
                    raw.extend_from_slice(&(word.len() as u32).to_le_bytes());
                    raw.extend_from_slice(word.as_bytes());
                }
                (json!(words), raw)
            }
            other => {
                return Err(invalid(format!(
                    "input '{name}' is {other}, which the generator does not make"
                )));
            }
        };
        let (parameters, data) = if binary {
            payload.extend_from_slice(&raw);
            (Some(json!({ "binary_data_size": raw.len() })), None)
        } else {
            (None, Some(data))
        };
        described.push(InputJson {
            name,
            shape,
            datatype,
            parameters,
            data,
        });
    }
    // Serialized from the structs, not through a `Value`, which would sort the keys.
    let header = serde_json::to_string(&RequestJson { inputs: described })
        .map_err(|e| invalid(e.to_string()))?;
    if !binary {
        return Ok((Bytes::from(header), headers));
    }
    headers.insert(
        HEADER_CONTENT_LENGTH,
        http::header::HeaderValue::from(header.len()),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        http::header::HeaderValue::from_static("application/octet-stream"),
    );
    let mut body = header.into_bytes();
    body.extend_from_slice(&payload);
    Ok((Bytes::from(body), headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fraud() -> Value {
        json!({"name": "fraud", "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 32]}]})
    }

    #[test]
    fn json_and_binary_bodies_carry_the_same_tensor() {
        let (json_body, headers) = request_from_metadata(&fraud(), 2, false).unwrap();
        assert!(headers.is_empty());
        let parsed: Value = serde_json::from_slice(&json_body).unwrap();
        assert_eq!(parsed["inputs"][0]["shape"], json!([2, 32]));
        let data: Vec<f32> = parsed["inputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let (binary, headers) = request_from_metadata(&fraud(), 2, true).unwrap();
        let split: usize = headers[HEADER_CONTENT_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let head: Value = serde_json::from_slice(&binary[..split]).unwrap();
        assert_eq!(head["inputs"][0]["parameters"]["binary_data_size"], 256);
        let raw: Vec<f32> = binary[split..]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(raw, data);
    }

    #[test]
    fn every_datatype_the_metadata_names_decodes_as_the_node_reads_it() {
        let metadata = json!({
            "name": "m",
            "inputs": [
                {"name": "ids", "datatype": "INT64", "shape": [-1, 4]},
                {"name": "mask", "datatype": "BOOL", "shape": [-1, 4]},
                {"name": "text", "datatype": "BYTES", "shape": [2]}
            ]
        });
        for binary in [false, true] {
            let (body, headers) = request_from_metadata(&metadata, 3, binary).unwrap();
            let split = headers
                .get(HEADER_CONTENT_LENGTH)
                .map(|v| v.to_str().unwrap().parse().unwrap());
            let decoded = crate::oip::decode_request("m", None, &body, split).unwrap();
            let shapes: Vec<_> = decoded
                .request
                .inputs
                .iter()
                .map(|t| t.shape.clone())
                .collect();
            assert_eq!(
                shapes,
                vec![vec![3, 4], vec![3, 4], vec![2]],
                "binary {binary}"
            );
        }
    }

    #[test]
    fn generated_inputs_name_their_datatype_before_their_data() {
        let (body, _) = request_from_metadata(&fraud(), 1, false).unwrap();
        let text = std::str::from_utf8(&body).unwrap();
        let (datatype, data) = (
            text.find("\"datatype\"").unwrap(),
            text.find("\"data\"").unwrap(),
        );
        assert!(datatype < data, "{text}");
    }

    #[test]
    fn a_shape_too_large_to_build_is_refused() {
        for shape in [
            json!([100_000, 100_000]),
            json!([-1, 9_223_372_036_854_775_807i64]),
        ] {
            let metadata = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape}]});
            let err = request_from_metadata(&metadata, 2, false).unwrap_err();
            assert!(err.to_string().contains("elements"), "{err}");
        }
        let nameless = json!({"inputs": [{"datatype": "FP32", "shape": [1]}]});
        assert!(request_from_metadata(&nameless, 1, false).is_err());
    }

    #[test]
    fn metadata_without_inputs_is_an_error() {
        let err = request_from_metadata(&json!({"name": "x"}), 1, false).unwrap_err();
        assert!(err.to_string().contains("no inputs"), "{err}");
    }
}
