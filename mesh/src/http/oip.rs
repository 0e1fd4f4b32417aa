//! The Open Inference Protocol v2 codec: JSON tensors and the binary tensor extension, to
//! and from the engine's [`InferRequest`] and [`InferResponse`]. Pure: bytes in, bytes out.
//!
//! JSON `data` is parsed straight into the tensor's little-endian bytes by a streaming
//! visitor (nested arrays flattened on the way), never through a `serde_json::Value` tree:
//! a 100k-element tensor costs one buffer, not 100k heap nodes.

use bytes::{BufMut, Bytes, BytesMut};
use meshserve_host::tensor::push_bytes_element;
use meshserve_host::{DataType, InferRequest, InferResponse, Tensor};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// The header that announces the binary tensor extension and gives the JSON part's length.
pub const HEADER_CONTENT_LENGTH: http::HeaderName =
    http::HeaderName::from_static("inference-header-content-length");

/// A request body that is not valid OIP.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn fail(message: impl Into<String>) -> DecodeError {
    DecodeError(message.into())
}

#[derive(Deserialize)]
struct RequestJson<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    #[serde(default)]
    outputs: Option<Vec<OutputJson>>,
}

struct InputJson<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: Cow<'a, str>,
    parameters: Map<String, Value>,
    data: Option<InputData<'a>>,
}

/// An input's `data`: parsed into elements while it is read when `datatype` came before it
/// (the order clients write), so the array is scanned once; otherwise kept raw and parsed
/// once the datatype is known.
enum InputData<'a> {
    Parsed(Elements),
    Raw(&'a RawValue),
}

/// Elements reserved up front at most: the shape is client-supplied and may lie.
const MAX_PREALLOCATED_BYTES: usize = 1 << 20;

impl<'de: 'a, 'a> Deserialize<'de> for InputJson<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(InputVisitor(std::marker::PhantomData))
    }
}

struct InputVisitor<'a>(std::marker::PhantomData<&'a ()>);

/// An input object's keys, read without copying them (a `Cow<str>` key would be an owned
/// `String` for every key of every input).
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum InputField {
    Name,
    Shape,
    Datatype,
    Parameters,
    Data,
    #[serde(other)]
    Unknown,
}

/// A string borrowed from the request body when it has no escapes (a datatype always does).
struct BodyStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for BodyStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = BodyStr<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BodyStr(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BodyStr(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for InputVisitor<'a> {
    type Value = InputJson<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an input object with name, shape, datatype and data")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<InputJson<'a>, A::Error> {
        let (mut name, mut shape, mut datatype) =
            (None::<String>, None::<Vec<i64>>, None::<Cow<'a, str>>);
        let (mut parameters, mut data) = (None, None);
        fn once<T, E: de::Error>(slot: &Option<T>, field: &'static str) -> Result<(), E> {
            match slot {
                Some(_) => Err(E::duplicate_field(field)),
                None => Ok(()),
            }
        }
        while let Some(key) = map.next_key::<InputField>()? {
            match key {
                InputField::Name => {
                    once(&name, "name")?;
                    name = Some(map.next_value()?);
                }
                InputField::Shape => {
                    once(&shape, "shape")?;
                    shape = Some(map.next_value()?);
                }
                InputField::Datatype => {
                    once(&datatype, "datatype")?;
                    datatype = Some(map.next_value::<BodyStr<'de>>()?.0);
                }
                InputField::Parameters => {
                    once(&parameters, "parameters")?;
                    parameters = Some(map.next_value()?);
                }
                InputField::Data => {
                    once(&data, "data")?;
                    let known = datatype.as_deref().and_then(DataType::parse);
                    data = Some(match known {
                        Some(datatype) => {
                            let capacity = shape
                                .as_deref()
                                .and_then(Tensor::element_count_of)
                                .and_then(|n| n.checked_mul(datatype.element_size()?))
                                .unwrap_or(0)
                                .min(MAX_PREALLOCATED_BYTES);
                            let mut sink = Sink {
                                datatype,
                                elements: Elements {
                                    bytes: Vec::with_capacity(capacity),
                                    count: 0,
                                },
                                input: name.as_deref(),
                            };
                            map.next_value_seed(FlatSeed(&mut sink))?;
                            InputData::Parsed(sink.elements)
                        }
                        None => InputData::Raw(map.next_value()?),
                    });
                }
                InputField::Unknown => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(InputJson {
            name: name.ok_or_else(|| de::Error::missing_field("name"))?,
            shape: shape.ok_or_else(|| de::Error::missing_field("shape"))?,
            datatype: datatype.ok_or_else(|| de::Error::missing_field("datatype"))?,
            parameters: parameters.unwrap_or_default(),
            data,
        })
    }
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// A decoded request plus how the client wants its outputs encoded.
#[derive(Debug)]
pub struct DecodedRequest {
    /// The request for the engine.
    pub request: InferRequest,
    /// Output names to return as binary data; the rest go as JSON.
    pub binary_outputs: OutputEncoding,
}

/// Which outputs to return in the binary extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEncoding {
    /// Every output as JSON.
    Json,
    /// Every output as binary (`binary_data_output: true`).
    AllBinary,
    /// These outputs as binary, the rest as JSON.
    Binary(Vec<String>),
}

impl OutputEncoding {
    fn is_binary(&self, name: &str) -> bool {
        match self {
            OutputEncoding::Json => false,
            OutputEncoding::AllBinary => true,
            OutputEncoding::Binary(names) => names.iter().any(|n| n == name),
        }
    }
}

/// Decodes an infer request body. `json_length` is the value of
/// `Inference-Header-Content-Length`, present when binary tensors follow the JSON.
pub fn decode_request(
    model: &str,
    version: Option<&str>,
    body: &Bytes,
    json_length: Option<usize>,
) -> Result<DecodedRequest, DecodeError> {
    let json_length = json_length.unwrap_or(body.len());
    if json_length > body.len() {
        return Err(fail(format!(
            "Inference-Header-Content-Length is {json_length} but the body has only {} bytes",
            body.len()
        )));
    }
    let parsed: RequestJson<'_> = serde_json::from_slice(&body[..json_length])
        .map_err(|e| fail(format!("malformed request JSON: {e}")))?;
    let mut binary = body.slice(json_length..);

    let mut inputs = Vec::with_capacity(parsed.inputs.len());
    for input in parsed.inputs {
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            fail(format!(
                "input '{}': unknown datatype '{}'",
                input.name, input.datatype
            ))
        })?;
        let count = Tensor::element_count_of(&input.shape).ok_or_else(|| {
            fail(format!(
                "input '{}': invalid shape {:?}",
                input.name, input.shape
            ))
        })?;
        let data = match (binary_size(&input.parameters, &input.name)?, input.data) {
            (Some(size), None) => {
                if size > binary.len() {
                    return Err(fail(format!(
                        "input '{}': binary_data_size {size} exceeds the {} binary bytes left in the body",
                        input.name,
                        binary.len()
                    )));
                }
                binary.split_to(size)
            }
            (None, Some(InputData::Parsed(elements))) => elements.finish(count, &input.name)?,
            (None, Some(InputData::Raw(raw))) => parse_data(raw, datatype, count, &input.name)?,
            (Some(_), Some(_)) => {
                return Err(fail(format!(
                    "input '{}' has both 'data' and binary_data_size",
                    input.name
                )));
            }
            (None, None) => return Err(fail(format!("input '{}' has no 'data'", input.name))),
        };
        let tensor = Tensor::new(input.name, datatype, input.shape, data)
            .map_err(|e| fail(e.to_string()))?;
        inputs.push(tensor);
    }
    if !binary.is_empty() {
        return Err(fail(format!(
            "{} bytes after the JSON header are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }

    let all_binary = parsed
        .parameters
        .get("binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut binary_names = Vec::new();
    let outputs = match parsed.outputs {
        None => None,
        Some(outputs) => {
            let mut names = Vec::with_capacity(outputs.len());
            for output in outputs {
                if output.parameters.contains_key("classification") {
                    return Err(fail(format!(
                        "output '{}': the classification extension is not supported",
                        output.name
                    )));
                }
                if output
                    .parameters
                    .get("binary_data")
                    .and_then(Value::as_bool)
                    == Some(true)
                {
                    binary_names.push(output.name.clone());
                }
                names.push(output.name);
            }
            Some(names)
        }
    };
    let binary_outputs = if all_binary {
        OutputEncoding::AllBinary
    } else if binary_names.is_empty() {
        OutputEncoding::Json
    } else {
        OutputEncoding::Binary(binary_names)
    };
    let timeout = match parsed.parameters.get("timeout") {
        None => None,
        Some(v) => Some(Duration::from_micros(v.as_u64().ok_or_else(|| {
            fail("parameter 'timeout' must be a non-negative integer of microseconds")
        })?)),
    };
    Ok(DecodedRequest {
        request: InferRequest {
            model: model.to_string(),
            version: version.map(str::to_string),
            id: parsed.id,
            inputs,
            outputs,
            timeout,
        },
        binary_outputs,
    })
}

fn binary_size(parameters: &Map<String, Value>, name: &str) -> Result<Option<usize>, DecodeError> {
    match parameters.get("binary_data_size") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                fail(format!(
                    "input '{name}': binary_data_size must be a non-negative integer"
                ))
            }),
    }
}

fn parse_data(
    raw: &RawValue,
    datatype: DataType,
    count: usize,
    name: &str,
) -> Result<Bytes, DecodeError> {
    let capacity = datatype
        .element_size()
        .map_or(0, |s| s.saturating_mul(count));
    // Cap the up-front allocation: the shape is client-supplied and may lie.
    let mut sink = Sink {
        datatype,
        elements: Elements {
            bytes: Vec::with_capacity(capacity.min(raw.get().len() * 8)),
            count: 0,
        },
        input: Some(name),
    };
    let mut de = serde_json::Deserializer::from_str(raw.get());
    FlatSeed(&mut sink)
        .deserialize(&mut de)
        .map_err(|e| fail(e.to_string()))?;
    sink.elements.finish(count, name)
}

/// An input's elements in the tensor layout, and how many there are.
struct Elements {
    bytes: Vec<u8>,
    count: usize,
}

impl Elements {
    /// The elements, once their count is checked against the shape's.
    fn finish(self, count: usize, name: &str) -> Result<Bytes, DecodeError> {
        if self.count != count {
            return Err(fail(format!(
                "input '{name}': shape needs {count} elements, 'data' has {}",
                self.count
            )));
        }
        Ok(Bytes::from(self.bytes))
    }
}

/// Accumulates JSON scalars as elements of one datatype.
struct Sink<'n> {
    datatype: DataType,
    elements: Elements,
    /// The input's name, for error messages, when known before its data.
    input: Option<&'n str>,
}

impl Sink<'_> {
    /// An element error, naming the input when its name is known.
    fn error<E: de::Error>(&self, message: String) -> E {
        match &self.input {
            Some(name) => E::custom(format!("input '{name}': {message}")),
            None => E::custom(message),
        }
    }

    fn integer<E: de::Error>(&mut self, v: i128) -> Result<(), E> {
        macro_rules! put {
            ($t:ty) => {{
                let x = <$t>::try_from(v).map_err(|_| {
                    self.error::<E>(format!("{v} is out of range for {}", self.datatype))
                })?;
                self.elements.bytes.extend_from_slice(&x.to_le_bytes());
            }};
        }
        match self.datatype {
            DataType::Uint8 => put!(u8),
            DataType::Uint16 => put!(u16),
            DataType::Uint32 => put!(u32),
            DataType::Uint64 => put!(u64),
            DataType::Int8 => put!(i8),
            DataType::Int16 => put!(i16),
            DataType::Int32 => put!(i32),
            DataType::Int64 => put!(i64),
            DataType::Fp32 => self
                .elements
                .bytes
                .extend_from_slice(&(v as f32).to_le_bytes()),
            DataType::Fp64 => self
                .elements
                .bytes
                .extend_from_slice(&(v as f64).to_le_bytes()),
            other => return Err(self.error(format!("a number is not a valid {other} element"))),
        }
        self.elements.count += 1;
        Ok(())
    }

    fn float<E: de::Error>(&mut self, v: f64) -> Result<(), E> {
        match self.datatype {
            DataType::Fp32 => self
                .elements
                .bytes
                .extend_from_slice(&(v as f32).to_le_bytes()),
            DataType::Fp64 => self.elements.bytes.extend_from_slice(&v.to_le_bytes()),
            other => {
                return Err(self.error(format!(
                    "{v} is not a valid {other} element (fractional values need FP32 or FP64)"
                )));
            }
        }
        self.elements.count += 1;
        Ok(())
    }
}

struct FlatSeed<'s, 'n>(&'s mut Sink<'n>);

impl<'de> DeserializeSeed<'de> for FlatSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FlatSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} elements, as a flat or nested JSON array",
            self.0.datatype
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(FlatSeed(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        if self.0.datatype != DataType::Bool {
            return Err(self
                .0
                .error(format!("{v} is not a valid {} element", self.0.datatype)));
        }
        self.0.elements.bytes.push(u8::from(v));
        self.0.elements.count += 1;
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.integer(i128::from(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.integer(i128::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.float(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if self.0.datatype != DataType::Bytes {
            return Err(self.0.error(format!(
                "a string is not a valid {} element",
                self.0.datatype
            )));
        }
        push_bytes_element(&mut self.0.elements.bytes, v.as_bytes());
        self.0.elements.count += 1;
        Ok(())
    }
}

/// An encoded response body and, for the binary extension, the JSON part's length.
#[derive(Debug)]
pub struct EncodedResponse {
    /// The body.
    pub body: Bytes,
    /// `Some(n)`: the first `n` bytes are JSON and binary outputs follow.
    pub json_length: Option<usize>,
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputEntry<'a>>,
}

#[derive(Serialize)]
struct OutputEntry<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinaryParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<DataView<'a>>,
}

#[derive(Serialize)]
struct BinaryParameters {
    binary_data_size: usize,
}

/// Serialises a tensor's elements as a flat JSON array.
struct DataView<'a>(&'a Tensor);

impl Serialize for DataView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let tensor = self.0;
        macro_rules! numbers {
            ($t:ty) => {{
                const N: usize = std::mem::size_of::<$t>();
                let mut seq = serializer.serialize_seq(Some(tensor.data.len() / N))?;
                for chunk in tensor.data.chunks_exact(N) {
                    let mut raw = [0u8; N];
                    raw.copy_from_slice(chunk);
                    seq.serialize_element(&<$t>::from_le_bytes(raw))?;
                }
                seq.end()
            }};
        }
        match tensor.datatype {
            DataType::Bool => {
                let mut seq = serializer.serialize_seq(Some(tensor.data.len()))?;
                for &b in tensor.data.iter() {
                    seq.serialize_element(&(b != 0))?;
                }
                seq.end()
            }
            DataType::Uint8 => numbers!(u8),
            DataType::Uint16 => numbers!(u16),
            DataType::Uint32 => numbers!(u32),
            DataType::Uint64 => numbers!(u64),
            DataType::Int8 => numbers!(i8),
            DataType::Int16 => numbers!(i16),
            DataType::Int32 => numbers!(i32),
            DataType::Int64 => numbers!(i64),
            DataType::Fp32 => numbers!(f32),
            DataType::Fp64 => numbers!(f64),
            // FP16 has no JSON number form here; clients ask for it as binary.
            DataType::Fp16 => numbers!(u16),
            DataType::Bytes => {
                let mut seq = serializer.serialize_seq(None)?;
                for element in tensor.bytes_elements() {
                    seq.serialize_element(&String::from_utf8_lossy(element))?;
                }
                seq.end()
            }
        }
    }
}

/// Encodes a response, putting the outputs `encoding` names in the binary section.
pub fn encode_response(response: &InferResponse, encoding: &OutputEncoding) -> EncodedResponse {
    let mut binary_parts: Vec<&Bytes> = Vec::new();
    let outputs = response
        .outputs
        .iter()
        .map(|t| {
            let binary = encoding.is_binary(&t.name);
            if binary {
                binary_parts.push(&t.data);
            }
            OutputEntry {
                name: &t.name,
                datatype: t.datatype.as_str(),
                shape: &t.shape,
                parameters: binary.then_some(BinaryParameters {
                    binary_data_size: t.data.len(),
                }),
                data: (!binary).then_some(DataView(t)),
            }
        })
        .collect();
    let json = ResponseJson {
        model_name: &response.model_name,
        model_version: &response.model_version,
        id: response.id.as_deref(),
        outputs,
    };
    let binary_length: usize = binary_parts.iter().map(|b| b.len()).sum();
    let mut writer = BytesMut::with_capacity(256 + binary_length).writer();
    // Serialising plain structs into memory cannot fail.
    let _ = serde_json::to_writer(&mut writer, &json);
    let mut body = writer.into_inner();
    if binary_parts.is_empty() {
        return EncodedResponse {
            body: body.freeze(),
            json_length: None,
        };
    }
    let json_length = body.len();
    for part in binary_parts {
        body.extend_from_slice(part);
    }
    EncodedResponse {
        body: body.freeze(),
        json_length: Some(json_length),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshserve_host::StageTimings;

    fn decode(body: &str) -> Result<DecodedRequest, DecodeError> {
        decode_request("m", None, &Bytes::from(body.to_string()), None)
    }

    #[test]
    fn nested_and_flat_data_decode_to_the_same_bytes() {
        let flat = decode(
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2.5,3,4]}]}"#,
        )
        .unwrap();
        let nested = decode(
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[3,4]]}]}"#,
        )
        .unwrap();
        assert_eq!(flat.request.inputs, nested.request.inputs);
        let expected: Vec<u8> = [1.0f32, 2.5, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(flat.request.inputs[0].data.as_ref(), expected.as_slice());
    }

    #[test]
    fn integer_ranges_are_enforced() {
        let err =
            decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[256]}]}"#)
                .unwrap_err();
        assert!(err.0.contains("out of range for UINT8"), "{err}");
        let err =
            decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT32","data":[1.5]}]}"#)
                .unwrap_err();
        assert!(err.0.contains("INT32"), "{err}");
        let ok = decode(r#"{"inputs":[{"name":"x","shape":[2],"datatype":"UINT64","data":[0,18446744073709551615]}]}"#).unwrap();
        assert_eq!(&ok.request.inputs[0].data[8..], &u64::MAX.to_le_bytes());
    }

    #[test]
    fn data_decodes_the_same_whichever_field_comes_first_or_however_keys_are_escaped() {
        // `datatype` before `data` is parsed while read; after it, from the raw text.
        let orders = [
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"INT16","data":[[1,-2],[3,4]]}]}"#,
            r#"{"inputs":[{"data":[[1,-2],[3,4]],"datatype":"INT16","shape":[2,2],"name":"x"}]}"#,
            r#"{"inputs":[{"shape":[2,2],"data":[1,-2,3,4],"name":"x","datatype":"INT16","extra":{"a":[1]}}]}"#,
            // Escaped keys and datatype (read as copies, not borrowed from the body).
            r#"{"inputs":[{"n\u0061me":"x","shape":[2,2],"datatype":"INT\u00316","data":[1,-2,3,4]}]}"#,
        ];
        let expected: Vec<u8> = [1i16, -2, 3, 4]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        for body in orders {
            let decoded = decode(body).unwrap();
            assert_eq!(
                decoded.request.inputs[0].data.as_ref(),
                expected.as_slice(),
                "{body}"
            );
            assert_eq!(decoded.request.inputs[0].shape, vec![2, 2]);
        }
    }

    #[test]
    fn element_errors_name_the_input_in_either_order() {
        for body in [
            r#"{"inputs":[{"name":"age","shape":[1],"datatype":"UINT8","data":[300]}]}"#,
            r#"{"inputs":[{"data":[300],"name":"age","shape":[1],"datatype":"UINT8"}]}"#,
        ] {
            let err = decode(body).unwrap_err();
            assert!(err.0.contains("input 'age'"), "{err}");
            assert!(err.0.contains("300 is out of range for UINT8"), "{err}");
        }
        let err = decode(
            r#"{"inputs":[{"name":"x","name":"y","shape":[1],"datatype":"FP32","data":[1]}]}"#,
        )
        .unwrap_err();
        assert!(err.0.contains("duplicate field `name`"), "{err}");
        let err = decode(r#"{"inputs":[{"name":"x","datatype":"FP32","data":[1]}]}"#).unwrap_err();
        assert!(err.0.contains("missing field `shape`"), "{err}");
    }

    #[test]
    fn a_lying_shape_does_not_reserve_its_claimed_size() {
        // 2^40 elements claimed, one sent: refused by the count check, not by the allocator.
        let err = decode(
            r#"{"inputs":[{"name":"x","shape":[1099511627776],"datatype":"FP64","data":[1]}]}"#,
        )
        .unwrap_err();
        assert!(err.0.contains("elements"), "{err}");
    }

    #[test]
    fn element_count_must_match_the_shape() {
        let err =
            decode(r#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"INT64","data":[1,2]}]}"#)
                .unwrap_err();
        assert!(err.0.contains("needs 3 elements"), "{err}");
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        assert!(
            decode("{")
                .unwrap_err()
                .0
                .contains("malformed request JSON")
        );
        assert!(
            decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FLOAT","data":[1]}]}"#)
                .unwrap_err()
                .0
                .contains("unknown datatype 'FLOAT'")
        );
        assert!(
            decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BOOL","data":["yes"]}]}"#)
                .is_err()
        );
        assert!(
            decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BOOL"}]}"#)
                .unwrap_err()
                .0
                .contains("no 'data'")
        );
    }

    #[test]
    fn binary_inputs_are_taken_in_order_from_after_the_json() {
        let json = r#"{"inputs":[{"name":"a","shape":[2],"datatype":"INT16","parameters":{"binary_data_size":4}},{"name":"b","shape":[1],"datatype":"UINT8","parameters":{"binary_data_size":1}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(&[1, 0, 2, 0, 9]);
        let decoded =
            decode_request("m", Some("3"), &Bytes::from(body.clone()), Some(json.len())).unwrap();
        assert_eq!(decoded.request.inputs[0].data.as_ref(), &[1, 0, 2, 0]);
        assert_eq!(decoded.request.inputs[1].data.as_ref(), &[9]);
        assert_eq!(decoded.request.version.as_deref(), Some("3"));
        assert_eq!(
            decoded.binary_outputs,
            OutputEncoding::Binary(vec!["y".into()])
        );

        body.push(0);
        let err = decode_request("m", None, &Bytes::from(body), Some(json.len())).unwrap_err();
        assert!(err.0.contains("not claimed"), "{err}");
        let err = decode_request("m", None, &Bytes::from(json), Some(json.len() + 1)).unwrap_err();
        assert!(err.0.contains("Inference-Header-Content-Length"), "{err}");
    }

    #[test]
    fn timeout_parameter_is_microseconds() {
        let d = decode(r#"{"parameters":{"timeout":2500},"inputs":[]}"#).unwrap();
        assert_eq!(d.request.timeout, Some(Duration::from_micros(2500)));
        assert!(decode(r#"{"parameters":{"timeout":"soon"},"inputs":[]}"#).is_err());
    }

    #[test]
    fn responses_encode_json_and_binary_outputs() {
        let y = Tensor::new(
            "y",
            DataType::Int64,
            vec![2],
            Bytes::from(
                [7i64, -1]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        )
        .unwrap();
        let mut s = Vec::new();
        push_bytes_element(&mut s, b"hi");
        let z = Tensor::new("z", DataType::Bytes, vec![1], Bytes::from(s)).unwrap();
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: Some("r1".into()),
            outputs: vec![y.clone(), z],
            timings: StageTimings::default(),
        };
        let json = encode_response(&response, &OutputEncoding::Json);
        assert_eq!(json.json_length, None);
        let v: Value = serde_json::from_slice(&json.body).unwrap();
        assert_eq!(v["id"], "r1");
        assert_eq!(v["outputs"][0]["data"], serde_json::json!([7, -1]));
        assert_eq!(v["outputs"][1]["data"], serde_json::json!(["hi"]));

        let binary = encode_response(&response, &OutputEncoding::Binary(vec!["y".into()]));
        let n = binary.json_length.unwrap();
        let v: Value = serde_json::from_slice(&binary.body[..n]).unwrap();
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 16);
        assert!(v["outputs"][0].get("data").is_none());
        assert_eq!(&binary.body[n..], y.data.as_ref());
    }
}
