//! An endpoint called over gRPC: the call's tensors become the OIP request body REST's
//! `/v2/models/{endpoint}/infer` would carry (the binary tensor extension, as tritonclient
//! sends it), the pipeline runs as for REST, and its answer becomes a `ModelInferResponse`:
//! the post stage's tensors, or a plugin's own reply as one BYTES output named `reply`. Pure:
//! bytes in, messages out.

use super::proto::ModelInferResponse;
use super::tensors::encode_response;
use crate::http::error::ApiError;
use crate::oip::{self, HEADER_CONTENT_LENGTH};
use bytes::{Bytes, BytesMut};
use meshserve_host::{DataType, ErrorClass, InferRequest, InferResponse, Tensor};
use serde_json::{Value, json};

/// The OIP body for `request`'s tensors (binary extension, every output asked for in binary)
/// and the length of its JSON part.
pub fn request_body(request: &InferRequest) -> (Bytes, usize) {
    let inputs: Vec<Value> = request
        .inputs
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "datatype": t.datatype.as_str(),
                "shape": t.shape,
                "parameters": { "binary_data_size": t.data.len() },
            })
        })
        .collect();
    let mut header = json!({
        "inputs": inputs,
        "parameters": { "binary_data_output": true },
    });
    if let Some(id) = &request.id {
        header["id"] = json!(id);
    }
    if let Some(outputs) = &request.outputs {
        header["outputs"] = outputs
            .iter()
            .map(|name| json!({ "name": name, "parameters": { "binary_data": true } }))
            .collect();
    }
    let header = header.to_string();
    let mut body = BytesMut::with_capacity(
        header.len() + request.inputs.iter().map(|t| t.data.len()).sum::<usize>(),
    );
    body.extend_from_slice(header.as_bytes());
    for tensor in &request.inputs {
        body.extend_from_slice(&tensor.data);
    }
    (body.freeze(), header.len())
}

/// The pipeline's HTTP answer as a gRPC one.
pub fn answer(
    endpoint: &str,
    response: &http::Response<Bytes>,
    typed: bool,
) -> Result<ModelInferResponse, ApiError> {
    let status = response.status();
    let body = response.body();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !status.is_success() {
        // A plugin's own reply with an error status: its status, and its body as the message.
        let class = match status.as_u16() {
            code @ 400..=499 => ErrorClass::PluginStatus(code),
            503 => ErrorClass::Unavailable,
            _ => ErrorClass::Internal,
        };
        let message = String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned();
        return Err(ApiError::new(class, message));
    }
    let json_length = response
        .headers()
        .get(HEADER_CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let oip_answer = content_type.starts_with("application/json") || json_length.is_some();
    if oip_answer && let Some(outputs) = decode_outputs(endpoint, body, json_length) {
        return Ok(encode_response(outputs, typed));
    }
    // A reply the post stage wrote itself: its bytes, and its content type beside them.
    let reply = Tensor {
        name: "reply".into(),
        datatype: DataType::Bytes,
        shape: vec![1],
        data: {
            let mut data = Vec::with_capacity(body.len() + 4);
            meshserve_host::tensor::push_bytes_element(&mut data, body);
            data.into()
        },
    };
    let mut answer = encode_response(
        InferResponse {
            model_name: endpoint.to_string(),
            model_version: String::new(),
            id: None,
            outputs: vec![reply],
            timings: Default::default(),
        },
        typed,
    );
    answer.parameters.insert(
        "content_type".into(),
        super::proto::InferParameter {
            parameter_choice: Some(super::proto::infer_parameter::ParameterChoice::StringParam(
                content_type.to_string(),
            )),
        },
    );
    Ok(answer)
}

/// An OIP answer body (JSON, or the binary extension) as the engine's response; `None` when
/// it is not one.
fn decode_outputs(
    endpoint: &str,
    body: &Bytes,
    json_length: Option<usize>,
) -> Option<InferResponse> {
    let json_length = json_length.unwrap_or(body.len()).min(body.len());
    let mut header: Value = serde_json::from_slice(&body[..json_length]).ok()?;
    let outputs = header.get_mut("outputs")?.take();
    let model_version = header["model_version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let id = header["id"].as_str().map(str::to_string);
    // An answer's outputs are laid out as a request's inputs: decode them with that decoder.
    let as_request = json!({ "inputs": outputs }).to_string();
    let mut rebuilt = BytesMut::with_capacity(as_request.len() + body.len() - json_length);
    rebuilt.extend_from_slice(as_request.as_bytes());
    rebuilt.extend_from_slice(&body[json_length..]);
    let decoded =
        oip::decode_request(endpoint, None, &rebuilt.freeze(), Some(as_request.len())).ok()?;
    Some(InferResponse {
        model_name: endpoint.to_string(),
        model_version,
        id,
        outputs: decoded.request.inputs,
        timings: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oip::{OutputEncoding, encode_response as encode_oip};

    fn fp32(name: &str, values: &[f32]) -> Tensor {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(
            name,
            DataType::Fp32,
            vec![1, values.len() as i64],
            data.into(),
        )
        .unwrap()
    }

    #[test]
    fn the_request_body_is_what_rest_decodes_to_the_same_tensors() {
        let request = InferRequest {
            model: "e".into(),
            id: Some("7".into()),
            inputs: vec![fp32("x", &[1.0, 2.5])],
            outputs: Some(vec!["y".into()]),
            ..Default::default()
        };
        let (body, json_length) = request_body(&request);
        let decoded = oip::decode_request("e", None, &body, Some(json_length)).unwrap();
        assert_eq!(decoded.request.inputs, request.inputs);
        assert_eq!(decoded.request.id.as_deref(), Some("7"));
        assert_eq!(decoded.request.outputs, Some(vec!["y".to_string()]));
        assert_eq!(decoded.binary_outputs, OutputEncoding::AllBinary);
    }

    #[test]
    fn oip_answers_in_json_or_binary_become_tensors() {
        let response = InferResponse {
            model_name: "e".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![fp32("p", &[0.25, 0.75])],
            timings: Default::default(),
        };
        for encoding in [OutputEncoding::Json, OutputEncoding::AllBinary] {
            let http = encode_oip(&response, &encoding).into_http();
            let answer = answer("e", &http, false).unwrap();
            assert_eq!(answer.outputs[0].name, "p");
            assert_eq!(answer.outputs[0].shape, vec![1, 2]);
            assert_eq!(answer.raw_output_contents[0], response.outputs[0].data);
        }
    }

    #[test]
    fn a_plugins_reply_is_one_bytes_output_and_its_error_status_a_grpc_one() {
        let mut reply = http::Response::new(Bytes::from_static(b"{\"fraud\": true}"));
        reply.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/vnd.decision+json"),
        );
        let answer = answer("e", &reply, false).unwrap();
        assert_eq!(answer.outputs[0].name, "reply");
        assert_eq!(answer.outputs[0].datatype, "BYTES");
        assert_eq!(&answer.raw_output_contents[0][4..], b"{\"fraud\": true}");

        let mut refused = http::Response::new(Bytes::from_static(b"amount must be positive"));
        *refused.status_mut() = http::StatusCode::UNPROCESSABLE_ENTITY;
        let error = super::answer("e", &refused, false).unwrap_err();
        assert_eq!(error.class, ErrorClass::PluginStatus(422));
        assert_eq!(error.message, "amount must be positive");
    }
}
