//! The Open Inference Protocol v2 codec: JSON tensors and the binary tensor extension, to
//! and from the engine's [`InferRequest`] and [`InferResponse`]. Pure: bytes in, bytes out.
//!
//! JSON `data` is parsed straight into the tensor's little-endian bytes by a streaming
//! visitor (nested arrays flattened on the way), never through a `serde_json::Value` tree:
//! a 100k-element tensor costs one buffer, not 100k heap nodes.
//!
//! Decoding allocates at most a small constant times the body it was given, whatever the body
//! claims: reservations made from a client's `shape` come out of a budget proportional to the
//! body, a shape that disagrees with its data is refused as soon as that input is read, and
//! parameters the node does not read are skipped without being built
//! (`mesh/tests/decode_bounds.rs` checks this with a counting allocator).

use bytes::{BufMut, Bytes, BytesMut};
use meshserve_host::tensor::push_bytes_element;
use meshserve_host::{DataType, InferRequest, InferResponse, Tensor};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::cell::Cell;
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

struct RequestJson<'a> {
    id: Option<String>,
    parameters: RequestParameters,
    inputs: Vec<InputJson<'a>>,
    outputs: Option<Vec<OutputJson>>,
}

struct InputJson<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: Cow<'a, str>,
    parameters: InputParameters,
    data: Option<InputData<'a>>,
}

/// A parameter's value as far as the decoder cares: OIP parameters are scalars, and the few
/// the node reads are booleans or counts. Anything else (a string, a float, an array or object
/// some client nests there) is skipped as it is read, so parameters cost no allocation
/// however large they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Scalar {
    Bool(bool),
    Uint(u64),
    #[default]
    Other,
}

impl Scalar {
    fn as_bool(self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn as_u64(self) -> Option<u64> {
        match self {
            Scalar::Uint(n) => Some(n),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a parameter value")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Uint(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(u64::try_from(v).map_or(Scalar::Other, Scalar::Uint))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }

            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Scalar::Other)
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// The request parameters the node reads; others are skipped unread.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RequestParameters {
    timeout: Option<Scalar>,
    binary_data_output: Scalar,
}

/// An input's parameters the node reads.
#[derive(Deserialize, Default)]
#[serde(default)]
struct InputParameters {
    binary_data_size: Option<Scalar>,
}

/// A requested output's parameters the node reads.
#[derive(Deserialize, Default)]
#[serde(default)]
struct OutputParameters {
    binary_data: Scalar,
    classification: Option<Scalar>,
}

/// An input's `data`: parsed into elements while it is read when `datatype` came before it
/// (the order clients write), so the array is scanned once; otherwise kept raw and parsed
/// once the datatype is known.
enum InputData<'a> {
    Parsed(Elements),
    Raw(&'a RawValue),
}

/// Bytes one input may reserve for its elements before reading them, at most.
const MAX_PREALLOCATED_BYTES: usize = 1 << 20;

/// Bytes all inputs of a request may reserve ahead of their elements, per byte of request
/// JSON. A shape is client-supplied and may lie, so what it reserves comes out of a budget
/// the body pays for: 1,000 inputs each claiming a megabyte in a 58 KB body reserve 232 KB in
/// all, not a gigabyte. Four covers the densest honest data (`1,` per 8-byte element).
const RESERVED_PER_JSON_BYTE: usize = 4;

/// What the inputs of one request may still reserve ahead of their elements, in bytes.
struct Reserve(Cell<usize>);

impl Reserve {
    /// Takes up to `wanted` bytes from the budget and says how many it got.
    fn take(&self, wanted: usize) -> usize {
        let granted = wanted.min(self.0.get());
        self.0.set(self.0.get() - granted);
        granted
    }
}

/// The top-level keys of a request.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum RequestField {
    Id,
    Parameters,
    Inputs,
    Outputs,
    #[serde(other)]
    Unknown,
}

/// Deserializes a request with its inputs' reservations drawn from one [`Reserve`].
struct RequestSeed<'r>(&'r Reserve);

impl<'de> DeserializeSeed<'de> for RequestSeed<'_> {
    type Value = RequestJson<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

/// Fails on a key seen twice in one object.
fn once<T, E: de::Error>(slot: &Option<T>, field: &'static str) -> Result<(), E> {
    match slot {
        Some(_) => Err(E::duplicate_field(field)),
        None => Ok(()),
    }
}

impl<'de> Visitor<'de> for RequestSeed<'_> {
    type Value = RequestJson<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an inference request object")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut id, mut parameters, mut inputs, mut outputs) = (None, None, None, None);
        while let Some(key) = map.next_key::<RequestField>()? {
            match key {
                RequestField::Id => {
                    once(&id, "id")?;
                    id = Some(map.next_value::<Option<String>>()?);
                }
                RequestField::Parameters => {
                    once(&parameters, "parameters")?;
                    parameters = Some(map.next_value()?);
                }
                RequestField::Inputs => {
                    once(&inputs, "inputs")?;
                    inputs = Some(map.next_value_seed(InputsSeed(self.0))?);
                }
                RequestField::Outputs => {
                    once(&outputs, "outputs")?;
                    outputs = Some(map.next_value::<Option<Vec<OutputJson>>>()?);
                }
                RequestField::Unknown => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(RequestJson {
            id: id.flatten(),
            parameters: parameters.unwrap_or_default(),
            inputs: inputs.ok_or_else(|| de::Error::missing_field("inputs"))?,
            outputs: outputs.flatten(),
        })
    }
}

/// The `inputs` array.
struct InputsSeed<'r>(&'r Reserve);

impl<'de> DeserializeSeed<'de> for InputsSeed<'_> {
    type Value = Vec<InputJson<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InputsSeed<'_> {
    type Value = Vec<InputJson<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of input objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut inputs = Vec::new();
        while let Some(input) = seq.next_element_seed(InputSeed(self.0))? {
            inputs.push(input);
        }
        Ok(inputs)
    }
}

/// One input object.
struct InputSeed<'r>(&'r Reserve);

impl<'de> DeserializeSeed<'de> for InputSeed<'_> {
    type Value = InputJson<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

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

impl<'de> Visitor<'de> for InputSeed<'_> {
    type Value = InputJson<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an input object with name, shape, datatype and data")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<InputJson<'de>, A::Error> {
        let (mut name, mut shape, mut datatype) =
            (None::<String>, None::<Vec<i64>>, None::<Cow<'de, str>>);
        let (mut parameters, mut data) = (None, None);
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
                            let claimed = shape.as_deref().and_then(Tensor::element_count_of);
                            let capacity = claimed
                                .and_then(|n| n.checked_mul(datatype.element_size()?))
                                .unwrap_or(0)
                                .min(MAX_PREALLOCATED_BYTES);
                            let mut sink = Sink {
                                datatype,
                                elements: Elements {
                                    bytes: Vec::with_capacity(self.0.take(capacity)),
                                    count: 0,
                                },
                                input: name.as_deref(),
                            };
                            map.next_value_seed(FlatSeed(&mut sink))?;
                            // Refused now rather than after the rest of the body: a lying
                            // shape must not hold its buffer while later inputs are read.
                            if let Some(count) = claimed
                                && count != sink.elements.count
                            {
                                return Err(sink.error(format!(
                                    "shape needs {count} elements, 'data' has {}",
                                    sink.elements.count
                                )));
                            }
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
    parameters: OutputParameters,
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
    let json = &body[..json_length];
    let reserve = Reserve(Cell::new(json.len().saturating_mul(RESERVED_PER_JSON_BYTE)));
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let parsed = RequestSeed(&reserve)
        .deserialize(&mut deserializer)
        .and_then(|parsed| deserializer.end().map(|()| parsed))
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
        .binary_data_output
        .as_bool()
        .unwrap_or(false);
    let mut binary_names = Vec::new();
    let outputs = match parsed.outputs {
        None => None,
        Some(outputs) => {
            let mut names = Vec::with_capacity(outputs.len());
            for output in outputs {
                if output.parameters.classification.is_some() {
                    return Err(fail(format!(
                        "output '{}': the classification extension is not supported",
                        output.name
                    )));
                }
                if output.parameters.binary_data.as_bool() == Some(true) {
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
    let timeout = match parsed.parameters.timeout {
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

fn binary_size(parameters: &InputParameters, name: &str) -> Result<Option<usize>, DecodeError> {
    match parameters.binary_data_size {
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
    // Cap the up-front allocation by what the text can hold (an element takes at least two
    // bytes of JSON and at most eight in the tensor): the shape is client-supplied and may lie.
    let mut sink = Sink {
        datatype,
        elements: Elements {
            bytes: Vec::with_capacity(capacity.min(raw.get().len().saturating_mul(4))),
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

impl EncodedResponse {
    /// As an HTTP answer: the body with its content type and, for the binary extension, the
    /// JSON part's length.
    pub fn into_http(self) -> http::Response<Bytes> {
        let mut http = http::Response::new(self.body);
        let headers = http.headers_mut();
        let content_type = match self.json_length {
            Some(n) => {
                headers.insert(HEADER_CONTENT_LENGTH, http::HeaderValue::from(n));
                "application/octet-stream"
            }
            None => "application/json",
        };
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        http
    }
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
    use serde_json::Value;

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
