//! The model a unary `ModelInfer` call names, read from its framed message without decoding
//! it, so an overloaded model refuses the call before the message is parsed (as REST refuses
//! before it reads a body). Pure, and it allocates nothing.

/// `model_name` (field 1) and `model_version` (field 2) of a gRPC-framed `ModelInferRequest`.
/// `None` for a compressed frame, or a message that does not parse: its full decode then says
/// what is wrong with it. Each field is skipped in constant time, so a message of any size
/// costs a pass over its field keys.
pub fn model_of(framed: &[u8]) -> Option<(&str, &str)> {
    let (&[compressed, a, b, c, d], rest) = framed.split_first_chunk::<5>()?;
    if compressed != 0 {
        return None;
    }
    let length = usize::try_from(u32::from_be_bytes([a, b, c, d])).ok()?;
    let mut message = rest.get(..length)?;
    let (mut name, mut version) = ("", "");
    while !message.is_empty() {
        let key = varint(&mut message)?;
        match key & 7 {
            0 => {
                varint(&mut message)?;
            }
            1 => message = message.get(8..)?,
            2 => {
                let length = usize::try_from(varint(&mut message)?).ok()?;
                let value = message.get(..length)?;
                message = message.get(length..)?;
                // As protobuf reads it, the last occurrence of a field wins.
                match key >> 3 {
                    1 => name = std::str::from_utf8(value).ok()?,
                    2 => version = std::str::from_utf8(value).ok()?,
                    _ => {}
                }
            }
            5 => message = message.get(4..)?,
            _ => return None,
        }
    }
    Some((name, version))
}

/// A protobuf varint, at most ten bytes, taken from the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::grpc::proto::model_infer_request::InferInputTensor;
    use crate::http::grpc::proto::{InferParameter, ModelInferRequest};
    use prost::Message;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(message);
        framed
    }

    #[test]
    fn the_model_is_read_from_every_kind_of_field_around_it() {
        let message = ModelInferRequest {
            model_name: "fraud".into(),
            model_version: "2".into(),
            id: "call-7".into(),
            parameters: [(
                "priority".to_string(),
                InferParameter {
                    parameter_choice: Some(
                        crate::http::grpc::proto::infer_parameter::ParameterChoice::Int64Param(-1),
                    ),
                },
            )]
            .into(),
            inputs: vec![InferInputTensor {
                name: "features".into(),
                datatype: "FP32".into(),
                shape: vec![1, 32],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![7u8; 128].into()],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(model_of(&framed(&message)), Some(("fraud", "2")));
        // Fields in any order, fixed-width ones among them, and the last name wins.
        let mut reordered = Vec::new();
        reordered.extend_from_slice(&[0x3a, 3, 1, 2, 3]); // raw_input_contents
        reordered.extend_from_slice(&[0x0a, 3, b'o', b'l', b'd']); // model_name
        reordered.extend_from_slice(&[0x19, 0, 0, 0, 0, 0, 0, 0, 0]); // field 3, 64-bit
        reordered.extend_from_slice(&[0x25, 0, 0, 0, 0]); // field 4, 32-bit
        reordered.extend_from_slice(&[0x40, 0xff, 0x01]); // field 8, varint
        reordered.extend_from_slice(&[0x0a, 4, b's', b'l', b'o', b'w']);
        assert_eq!(model_of(&framed(&reordered)), Some(("slow", "")));
    }

    #[test]
    fn what_does_not_parse_is_left_to_the_full_decode() {
        let message = ModelInferRequest {
            model_name: "fraud".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut compressed = framed(&message);
        compressed[0] = 1;
        let mut overrun = message.clone();
        overrun.extend_from_slice(&[0x2a, 0x7f]); // an input longer than the message
        let mut group = message.clone();
        group.push(0x0b); // a group start: no OIP message has one
        for (what, bytes) in [
            ("compressed", compressed),
            ("truncated frame", framed(&message)[..8].to_vec()),
            ("overrun field", framed(&overrun)),
            ("group", framed(&group)),
            ("endless varint", framed(&[0xff; 11])),
            ("name not UTF-8", framed(&[0x0a, 1, 0xff])),
            ("no frame", vec![0, 0]),
        ] {
            assert_eq!(model_of(&bytes), None, "{what}");
        }
        assert_eq!(model_of(&framed(&[])), Some(("", "")));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_read_without_a_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)
        ) {
            let _ = model_of(&bytes);
            let _ = model_of(&framed(&bytes));
        }

        #[test]
        fn the_name_and_version_prost_encodes_are_the_ones_read(
            name in "\\PC{0,40}",
            version in "[0-9]{0,3}",
            id in "\\PC{0,10}",
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let message = ModelInferRequest {
                model_name: name.clone(),
                model_version: version.clone(),
                id,
                raw_input_contents: vec![raw.into()],
                ..Default::default()
            }
            .encode_to_vec();
            let framed = framed(&message);
            proptest::prop_assert_eq!(model_of(&framed), Some((name.as_str(), version.as_str())));
        }
    }
}
