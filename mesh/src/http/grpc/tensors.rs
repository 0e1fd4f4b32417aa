//! OIP tensors between gRPC messages and the engine's requests and answers. Pure: messages
//! in, messages out, so every rule is tested without a socket.
//!
//! Raw contents (`raw_input_contents`, what tritonclient sends) are slices of the received
//! message, taken without a copy. Typed contents (`contents`, what KServe and OpenVINO clients
//! send) are packed into the same layout, at most eight bytes for each byte of the message
//! (an INT64 element is one varint byte at the least), so decoding allocates at most a
//! constant times what the client sent, whatever its shapes claim.

use super::proto::infer_parameter::ParameterChoice;
use super::proto::model_infer_request::InferInputTensor;
use super::proto::model_infer_response::InferOutputTensor;
use super::proto::{InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse};
use crate::oip::DecodeError;
use bytes::Bytes;
use meshserve_host::tensor::push_bytes_element;
use meshserve_host::{DataType, InferRequest, InferResponse, Tensor};
use std::collections::HashMap;
use std::time::Duration;

/// A decoded request, and how its answer's tensors should travel.
#[derive(Debug)]
pub struct Decoded {
    /// The request for the engine.
    pub request: InferRequest,
    /// The client sent typed `contents`: answer the same way (else raw contents).
    pub typed: bool,
}

fn fail(message: impl Into<String>) -> DecodeError {
    DecodeError(message.into())
}

/// Decodes a `ModelInferRequest`.
pub fn decode_request(message: ModelInferRequest) -> Result<Decoded, DecodeError> {
    let raw = !message.raw_input_contents.is_empty();
    if raw && message.raw_input_contents.len() != message.inputs.len() {
        return Err(fail(format!(
            "raw_input_contents has {} entries for {} inputs: one per input, in order",
            message.raw_input_contents.len(),
            message.inputs.len()
        )));
    }
    let mut raw_contents = message.raw_input_contents.into_iter();
    let mut inputs = Vec::with_capacity(message.inputs.len());
    for input in message.inputs {
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            fail(format!(
                "input '{}': unknown datatype '{}'",
                input.name, input.datatype
            ))
        })?;
        let has_contents = input
            .contents
            .as_ref()
            .is_some_and(|c| element_total(c) > 0);
        let data = match raw_contents.next() {
            Some(_) if has_contents => {
                return Err(fail(format!(
                    "input '{}' has both contents and raw_input_contents: send one or the other",
                    input.name
                )));
            }
            Some(bytes) => bytes,
            None => typed_data(&input, datatype)?,
        };
        let tensor = Tensor::new(input.name, datatype, input.shape, data)
            .map_err(|e| fail(e.to_string()))?;
        inputs.push(tensor);
    }
    let outputs = (!message.outputs.is_empty())
        .then(|| message.outputs.into_iter().map(|o| o.name).collect());
    let timeout = requested_timeout(&message.parameters);
    Ok(Decoded {
        request: InferRequest {
            model: message.model_name,
            version: (!message.model_version.is_empty()).then_some(message.model_version),
            id: (!message.id.is_empty()).then_some(message.id),
            inputs,
            outputs,
            timeout,
        },
        typed: !raw,
    })
}

/// The request's own deadline: its `timeout` parameter, in microseconds (as Triton's), when
/// it is a positive integer.
pub fn requested_timeout(parameters: &HashMap<String, InferParameter>) -> Option<Duration> {
    parameters
        .get("timeout")
        .and_then(integer)
        .and_then(timeout_from_micros)
}

/// A `timeout` parameter's microseconds as a deadline; none unless positive.
pub fn timeout_from_micros(us: i64) -> Option<Duration> {
    u64::try_from(us)
        .ok()
        .filter(|&us| us > 0)
        .map(Duration::from_micros)
}

fn integer(parameter: &InferParameter) -> Option<i64> {
    match parameter.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) => Some(v),
        Some(ParameterChoice::Uint64Param(v)) => i64::try_from(v).ok(),
        _ => None,
    }
}

/// Elements in every typed field together.
fn element_total(c: &InferTensorContents) -> usize {
    c.bool_contents.len()
        + c.int_contents.len()
        + c.int64_contents.len()
        + c.uint_contents.len()
        + c.uint64_contents.len()
        + c.fp32_contents.len()
        + c.fp64_contents.len()
        + c.bytes_contents.len()
}

/// Packs an input's typed contents into the OIP binary layout.
fn typed_data(input: &InferInputTensor, datatype: DataType) -> Result<Bytes, DecodeError> {
    let empty = InferTensorContents::default();
    let c = input.contents.as_ref().unwrap_or(&empty);
    let name = &input.name;
    let narrow = |what: &str| fail(format!("input '{name}': a value does not fit {what}"));
    let (elements, data): (usize, Vec<u8>) = match datatype {
        DataType::Bool => (
            c.bool_contents.len(),
            c.bool_contents.iter().map(|&b| u8::from(b)).collect(),
        ),
        DataType::Uint8 => (
            c.uint_contents.len(),
            c.uint_contents
                .iter()
                .map(|&v| u8::try_from(v).map_err(|_| narrow("UINT8")))
                .collect::<Result<_, _>>()?,
        ),
        DataType::Uint16 => (
            c.uint_contents.len(),
            packed(&c.uint_contents, |&v| {
                u16::try_from(v)
                    .map(u16::to_le_bytes)
                    .map_err(|_| narrow("UINT16"))
            })?,
        ),
        DataType::Uint32 => (
            c.uint_contents.len(),
            packed(&c.uint_contents, |&v| Ok(v.to_le_bytes()))?,
        ),
        DataType::Uint64 => (
            c.uint64_contents.len(),
            packed(&c.uint64_contents, |&v| Ok(v.to_le_bytes()))?,
        ),
        DataType::Int8 => (
            c.int_contents.len(),
            packed(&c.int_contents, |&v| {
                i8::try_from(v)
                    .map(i8::to_le_bytes)
                    .map_err(|_| narrow("INT8"))
            })?,
        ),
        DataType::Int16 => (
            c.int_contents.len(),
            packed(&c.int_contents, |&v| {
                i16::try_from(v)
                    .map(i16::to_le_bytes)
                    .map_err(|_| narrow("INT16"))
            })?,
        ),
        DataType::Int32 => (
            c.int_contents.len(),
            packed(&c.int_contents, |&v| Ok(v.to_le_bytes()))?,
        ),
        DataType::Int64 => (
            c.int64_contents.len(),
            packed(&c.int64_contents, |&v| Ok(v.to_le_bytes()))?,
        ),
        DataType::Fp32 => (
            c.fp32_contents.len(),
            packed(&c.fp32_contents, |&v| Ok(v.to_le_bytes()))?,
        ),
        DataType::Fp64 => (
            c.fp64_contents.len(),
            packed(&c.fp64_contents, |&v| Ok(v.to_le_bytes()))?,
        ),
        DataType::Bytes => {
            let mut out = Vec::new();
            for element in &c.bytes_contents {
                push_bytes_element(&mut out, element);
            }
            (c.bytes_contents.len(), out)
        }
        DataType::Fp16 => {
            return Err(fail(format!(
                "input '{name}': FP16 travels only in raw_input_contents"
            )));
        }
    };
    if elements != element_total(c) {
        return Err(fail(format!(
            "input '{name}' is {}: its contents belong in the field for that datatype",
            datatype.as_str()
        )));
    }
    Ok(Bytes::from(data))
}

fn packed<T, const N: usize>(
    values: &[T],
    to_bytes: impl Fn(&T) -> Result<[u8; N], DecodeError>,
) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(values.len() * N);
    for value in values {
        out.extend_from_slice(&to_bytes(value)?);
    }
    Ok(out)
}

/// Encodes the engine's answer: raw contents (the output's bytes, shared, not copied), or
/// typed contents when the request came typed, unless an output is FP16, which has no typed
/// field: then all go raw, which every client of the protocol reads.
pub fn encode_response(response: InferResponse, typed: bool) -> ModelInferResponse {
    let typed = typed
        && response
            .outputs
            .iter()
            .all(|t| t.datatype != DataType::Fp16);
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut raw = Vec::new();
    for tensor in response.outputs {
        let contents = typed.then(|| typed_contents(&tensor));
        outputs.push(InferOutputTensor {
            name: tensor.name,
            datatype: tensor.datatype.as_str().to_string(),
            shape: tensor.shape,
            parameters: HashMap::new(),
            contents,
        });
        if !typed {
            raw.push(tensor.data);
        }
    }
    ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id.unwrap_or_default(),
        parameters: HashMap::new(),
        outputs,
        raw_output_contents: raw,
    }
}

/// A validated tensor's elements in the typed field of its datatype (FP16 has none, and is
/// never asked for: see [`encode_response`]).
fn typed_contents(tensor: &Tensor) -> InferTensorContents {
    fn le<const N: usize, T>(data: &[u8], from: impl Fn([u8; N]) -> T) -> Vec<T> {
        data.chunks_exact(N)
            .map(|c| {
                let mut raw = [0u8; N];
                raw.copy_from_slice(c);
                from(raw)
            })
            .collect()
    }
    let data = &tensor.data;
    let mut c = InferTensorContents::default();
    match tensor.datatype {
        DataType::Bool => c.bool_contents = data.iter().map(|&b| b != 0).collect(),
        DataType::Uint8 => c.uint_contents = data.iter().map(|&b| u32::from(b)).collect(),
        DataType::Uint16 => c.uint_contents = le(data, |b| u32::from(u16::from_le_bytes(b))),
        DataType::Uint32 => c.uint_contents = le(data, u32::from_le_bytes),
        DataType::Uint64 => c.uint64_contents = le(data, u64::from_le_bytes),
        DataType::Int8 => c.int_contents = le(data, |b| i32::from(i8::from_le_bytes(b))),
        DataType::Int16 => c.int_contents = le(data, |b| i32::from(i16::from_le_bytes(b))),
        DataType::Int32 => c.int_contents = le(data, i32::from_le_bytes),
        DataType::Int64 => c.int64_contents = le(data, i64::from_le_bytes),
        DataType::Fp32 => c.fp32_contents = le(data, f32::from_le_bytes),
        DataType::Fp64 => c.fp64_contents = le(data, f64::from_le_bytes),
        DataType::Bytes => {
            c.bytes_contents = tensor
                .bytes_elements()
                .map(|element| tensor.data.slice_ref(element))
                .collect()
        }
        DataType::Fp16 => {}
    }
    c
}

#[cfg(test)]
mod tests {
    use super::super::proto::model_infer_request::InferRequestedOutputTensor;
    use super::*;

    fn input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        }
    }

    fn fp32_bytes(values: &[f32]) -> Bytes {
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()
    }

    #[test]
    fn raw_contents_become_the_tensors_data_without_a_copy() {
        let raw = fp32_bytes(&[1.0, 2.0, 3.0, 4.0]);
        let message = ModelInferRequest {
            model_name: "fraud".into(),
            id: "r1".into(),
            inputs: vec![input("x", "FP32", vec![2, 2])],
            raw_input_contents: vec![raw.clone()],
            outputs: vec![InferRequestedOutputTensor {
                name: "y".into(),
                parameters: HashMap::new(),
            }],
            ..Default::default()
        };
        let decoded = decode_request(message).unwrap();
        assert!(!decoded.typed);
        let tensor = &decoded.request.inputs[0];
        assert_eq!(
            tensor.data.as_ptr(),
            raw.as_ptr(),
            "the message's bytes, shared"
        );
        assert_eq!(decoded.request.id.as_deref(), Some("r1"));
        assert_eq!(decoded.request.version, None);
        assert_eq!(decoded.request.outputs, Some(vec!["y".to_string()]));
    }

    #[test]
    fn typed_contents_are_packed_and_narrowed_with_range_checks() {
        let mut x = input("x", "INT16", vec![3]);
        x.contents = Some(InferTensorContents {
            int_contents: vec![-2, 0, 300],
            ..Default::default()
        });
        let mut s = input("s", "BYTES", vec![2]);
        s.contents = Some(InferTensorContents {
            bytes_contents: vec![Bytes::from_static(b"ab"), Bytes::new()],
            ..Default::default()
        });
        let message = ModelInferRequest {
            inputs: vec![x.clone(), s],
            ..Default::default()
        };
        let decoded = decode_request(message).unwrap();
        assert!(decoded.typed);
        let data: Vec<i16> = decoded.request.inputs[0]
            .data
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(data, vec![-2, 0, 300]);
        assert_eq!(&decoded.request.inputs[1].data[..], b"\x02\0\0\0ab\0\0\0\0");

        x.datatype = "INT8".into();
        let error = decode_request(ModelInferRequest {
            inputs: vec![x],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(error.0, "input 'x': a value does not fit INT8");
    }

    #[test]
    fn bad_requests_are_refused_with_what_is_wrong() {
        let refuse = |message: ModelInferRequest| decode_request(message).unwrap_err().0;
        let mut both = input("x", "FP32", vec![1]);
        both.contents = Some(InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        });
        assert!(
            refuse(ModelInferRequest {
                inputs: vec![both.clone()],
                raw_input_contents: vec![fp32_bytes(&[1.0])],
                ..Default::default()
            })
            .contains("both contents and raw_input_contents")
        );
        assert!(
            refuse(ModelInferRequest {
                inputs: vec![input("x", "FP32", vec![1]), input("y", "FP32", vec![1])],
                raw_input_contents: vec![fp32_bytes(&[1.0])],
                ..Default::default()
            })
            .contains("1 entries for 2 inputs")
        );
        let mut wrong_field = both.clone();
        wrong_field.datatype = "INT32".into();
        assert!(
            refuse(ModelInferRequest {
                inputs: vec![wrong_field],
                ..Default::default()
            })
            .contains("belong in the field for that datatype")
        );
        let mut wrong_shape = both;
        wrong_shape.shape = vec![2];
        assert!(
            !refuse(ModelInferRequest {
                inputs: vec![wrong_shape],
                ..Default::default()
            })
            .is_empty()
        );
        assert!(
            refuse(ModelInferRequest {
                inputs: vec![input("h", "FP16", vec![0])],
                ..Default::default()
            })
            .contains("FP16 travels only in raw_input_contents")
        );
        assert!(
            refuse(ModelInferRequest {
                inputs: vec![input("b", "BF16", vec![0])],
                ..Default::default()
            })
            .contains("unknown datatype 'BF16'")
        );
    }

    #[test]
    fn answers_go_raw_or_typed_as_the_request_came() {
        let response = || InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: Some("r".into()),
            outputs: vec![
                Tensor::new("p", DataType::Fp32, vec![1, 2], fp32_bytes(&[0.25, 0.75])).unwrap(),
                Tensor::new(
                    "s",
                    DataType::Bytes,
                    vec![1],
                    Bytes::from_static(b"\x01\0\0\0z"),
                )
                .unwrap(),
            ],
            timings: Default::default(),
        };
        let raw = encode_response(response(), false);
        assert_eq!(raw.raw_output_contents.len(), 2);
        assert_eq!(raw.raw_output_contents[0], fp32_bytes(&[0.25, 0.75]));
        assert_eq!(raw.outputs[1].datatype, "BYTES");
        assert!(raw.outputs[0].contents.is_none());
        assert_eq!(raw.id, "r");

        let typed = encode_response(response(), true);
        assert!(typed.raw_output_contents.is_empty());
        let contents = |i: usize| typed.outputs[i].contents.clone().unwrap();
        assert_eq!(contents(0).fp32_contents, vec![0.25, 0.75]);
        assert_eq!(contents(1).bytes_contents, vec![Bytes::from_static(b"z")]);
    }

    #[test]
    fn the_timeout_parameter_is_microseconds() {
        let mut parameters = HashMap::new();
        parameters.insert(
            "timeout".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(2500)),
            },
        );
        let decoded = decode_request(ModelInferRequest {
            parameters,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(decoded.request.timeout, Some(Duration::from_micros(2500)));
    }
}
