//! What admission needs of a `ModelInferRequest` (the model it names, the deadline it asks
//! for, and the id its answer must carry), read from the message without decoding it, so an
//! overloaded model refuses a unary call or a stream's message before it is parsed (as REST
//! refuses before it reads a body). Pure, and it allocates nothing.

/// What a message tells admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peeked<'a> {
    /// `model_name` (field 1).
    pub model: &'a str,
    /// `model_version` (field 2); empty for none.
    pub version: &'a str,
    /// `id` (field 3), as sent: a refusal in a stream carries it back, and the full decode
    /// is what refuses one that is not UTF-8.
    pub id: &'a [u8],
    /// The `timeout` parameter (field 4, a map), in microseconds, when it is an integer.
    pub timeout_us: Option<i64>,
}

/// Reads a `ModelInferRequest` message (out of its gRPC frame). `None` for a message that
/// does not parse: its full decode then says what is wrong with it. Each field is skipped in
/// constant time, so a message of any size costs a pass over its field keys.
pub fn peek_message(mut message: &[u8]) -> Option<Peeked<'_>> {
    let mut peeked = Peeked {
        model: "",
        version: "",
        id: &[],
        timeout_us: None,
    };
    // As protobuf reads them, the last occurrence of a field (or of a map's key) wins.
    while !message.is_empty() {
        match field(&mut message)? {
            (1, Value::Bytes(name)) => peeked.model = std::str::from_utf8(name).ok()?,
            (2, Value::Bytes(version)) => peeked.version = std::str::from_utf8(version).ok()?,
            (3, Value::Bytes(id)) => peeked.id = id,
            (4, Value::Bytes(entry)) => {
                let (key, parameter) = map_entry(entry)?;
                if key == "timeout" {
                    peeked.timeout_us = integer_parameter(parameter)?;
                }
            }
            _ => {}
        }
    }
    Some(peeked)
}

/// A field's value, by its wire type.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The number and value of the field at the front of `message`.
fn field<'a>(message: &mut &'a [u8]) -> Option<(u64, Value<'a>)> {
    let key = varint(message)?;
    let value = match key & 7 {
        0 => Value::Varint(varint(message)?),
        1 => {
            *message = message.get(8..)?;
            Value::Fixed
        }
        2 => {
            let length = usize::try_from(varint(message)?).ok()?;
            let value = message.get(..length)?;
            *message = message.get(length..)?;
            Value::Bytes(value)
        }
        5 => {
            *message = message.get(4..)?;
            Value::Fixed
        }
        _ => return None,
    };
    Some((key >> 3, value))
}

/// The key (field 1) and value message (field 2) of a `map<string, InferParameter>` entry.
fn map_entry(mut entry: &[u8]) -> Option<(&str, &[u8])> {
    let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
    while !entry.is_empty() {
        match field(&mut entry)? {
            (1, Value::Bytes(bytes)) => key = bytes,
            (2, Value::Bytes(bytes)) => value = bytes,
            _ => {}
        }
    }
    Some((std::str::from_utf8(key).ok()?, value))
}

/// An `InferParameter`'s integer (`int64_param`, field 2, or `uint64_param`, field 5, that
/// fits an `i64`); `Some(None)` for another kind or none. Its fields are one `oneof`, so the
/// last one set is the parameter; `None` where prost would refuse the message.
fn integer_parameter(mut parameter: &[u8]) -> Option<Option<i64>> {
    let mut integer = None;
    while !parameter.is_empty() {
        integer = match field(&mut parameter)? {
            // The varint is the integer's two's complement, as protobuf encodes an int64.
            (2, Value::Varint(v)) => Some(v as i64),
            (5, Value::Varint(v)) => i64::try_from(v).ok(),
            (1, Value::Varint(_)) | (4, Value::Fixed) => None,
            (3, Value::Bytes(text)) => std::str::from_utf8(text).ok().map(|_| None)?,
            (1..=5, _) => return None,
            _ => continue,
        };
    }
    Some(integer)
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
    use crate::http::grpc::proto::infer_parameter::ParameterChoice;
    use crate::http::grpc::proto::model_infer_request::InferInputTensor;
    use crate::http::grpc::proto::{InferParameter, ModelInferRequest};
    use prost::Message;

    fn model_of(message: &[u8]) -> Option<(&str, &str)> {
        peek_message(message).map(|peeked| (peeked.model, peeked.version))
    }

    fn parameter(choice: ParameterChoice) -> InferParameter {
        InferParameter {
            parameter_choice: Some(choice),
        }
    }

    #[test]
    fn the_timeout_parameter_is_read_as_its_decode_reads_it() {
        let timeout = |parameters: Vec<(&str, ParameterChoice)>| {
            let message = ModelInferRequest {
                model_name: "fraud".into(),
                parameters: parameters
                    .into_iter()
                    .map(|(key, choice)| (key.to_string(), parameter(choice)))
                    .collect(),
                raw_input_contents: vec![vec![7u8; 64].into()],
                ..Default::default()
            }
            .encode_to_vec();
            peek_message(&message).unwrap().timeout_us
        };
        assert_eq!(
            timeout(vec![("timeout", ParameterChoice::Int64Param(5000))]),
            Some(5000)
        );
        assert_eq!(
            timeout(vec![("timeout", ParameterChoice::Int64Param(-3))]),
            Some(-3)
        );
        assert_eq!(
            timeout(vec![("timeout", ParameterChoice::Uint64Param(7))]),
            Some(7)
        );
        assert_eq!(
            timeout(vec![("timeout", ParameterChoice::Uint64Param(u64::MAX))]),
            None
        );
        assert_eq!(
            timeout(vec![(
                "timeout",
                ParameterChoice::StringParam("5000".into())
            )]),
            None
        );
        assert_eq!(
            timeout(vec![
                ("priority", ParameterChoice::Int64Param(1)),
                ("timeout", ParameterChoice::Int64Param(250)),
                ("binary_data", ParameterChoice::BoolParam(true)),
            ]),
            Some(250)
        );
        // The last entry for a key wins, and within a parameter the last choice.
        let entry = |value: &[u8]| {
            let mut entry = vec![0x0a, 7];
            entry.extend_from_slice(b"timeout");
            entry.extend_from_slice(&[0x12, u8::try_from(value.len()).unwrap()]);
            entry.extend_from_slice(value);
            let mut field = vec![0x22, u8::try_from(entry.len()).unwrap()];
            field.extend_from_slice(&entry);
            field
        };
        let mut message = entry(&[0x10, 0x05]);
        message.extend_from_slice(&entry(&[0x10, 0x09, 0x28, 0x0b]));
        let decoded = ModelInferRequest::decode(message.as_slice()).unwrap();
        assert_eq!(
            decoded.parameters["timeout"],
            parameter(ParameterChoice::Uint64Param(11))
        );
        assert_eq!(peek_message(&message).unwrap().timeout_us, Some(11));
        // A parameter prost refuses (a string that is not UTF-8) is left to the full decode.
        let refused = entry(&[0x1a, 1, 0xff]);
        assert!(ModelInferRequest::decode(refused.as_slice()).is_err());
        assert_eq!(peek_message(&refused), None);
    }

    #[test]
    fn the_model_is_read_from_every_kind_of_field_around_it() {
        let message = ModelInferRequest {
            model_name: "fraud".into(),
            model_version: "2".into(),
            id: "call-7".into(),
            parameters: [(
                "priority".to_string(),
                parameter(ParameterChoice::Int64Param(-1)),
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
        assert_eq!(model_of(&message), Some(("fraud", "2")));
        assert_eq!(peek_message(&message).unwrap().timeout_us, None);
        assert_eq!(peek_message(&message).unwrap().id, b"call-7");
        // An id that is not UTF-8 is read as sent: the decode is what refuses it.
        let odd_id = [0x0a, 1, b'x', 0x1a, 1, 0xff];
        assert_eq!(peek_message(&odd_id).map(|p| p.id), Some(&[0xff][..]));
        assert!(ModelInferRequest::decode(&odd_id[..]).is_err());
        // Fields in any order, fixed-width ones among them, and the last name wins.
        let mut reordered = Vec::new();
        reordered.extend_from_slice(&[0x3a, 3, 1, 2, 3]); // raw_input_contents
        reordered.extend_from_slice(&[0x0a, 3, b'o', b'l', b'd']); // model_name
        reordered.extend_from_slice(&[0x19, 0, 0, 0, 0, 0, 0, 0, 0]); // field 3, 64-bit
        reordered.extend_from_slice(&[0x25, 0, 0, 0, 0]); // field 4, 32-bit
        reordered.extend_from_slice(&[0x40, 0xff, 0x01]); // field 8, varint
        reordered.extend_from_slice(&[0x0a, 4, b's', b'l', b'o', b'w']);
        assert_eq!(model_of(&reordered), Some(("slow", "")));
    }

    #[test]
    fn what_does_not_parse_is_left_to_the_full_decode() {
        let message = ModelInferRequest {
            model_name: "fraud".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut overrun = message.clone();
        overrun.extend_from_slice(&[0x2a, 0x7f]); // an input longer than the message
        let mut group = message.clone();
        group.push(0x0b); // a group start: no OIP message has one
        for (what, bytes) in [
            ("cut short", message[..message.len() - 1].to_vec()),
            ("overrun field", overrun),
            ("group", group),
            ("endless varint", vec![0xff; 11]),
            ("name not UTF-8", vec![0x0a, 1, 0xff]),
        ] {
            assert_eq!(model_of(&bytes), None, "{what}");
        }
        assert_eq!(model_of(&[]), Some(("", "")));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_read_without_a_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)
        ) {
            let _ = peek_message(&bytes);
        }

        #[test]
        fn what_prost_encodes_is_what_is_read(
            name in "\\PC{0,40}",
            version in "[0-9]{0,3}",
            id in "\\PC{0,10}",
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            timeout in proptest::option::of(proptest::num::i64::ANY),
            other in proptest::collection::btree_map("\\PC{0,8}", proptest::num::i64::ANY, 0..4),
        ) {
            let mut parameters: std::collections::HashMap<_, _> = other
                .into_iter()
                .filter(|(key, _)| key != "timeout")
                .map(|(key, value)| (key, parameter(ParameterChoice::Int64Param(value))))
                .collect();
            if let Some(timeout) = timeout {
                parameters.insert("timeout".into(), parameter(ParameterChoice::Int64Param(timeout)));
            }
            let message = ModelInferRequest {
                model_name: name.clone(),
                model_version: version.clone(),
                id: id.clone(),
                parameters,
                raw_input_contents: vec![raw.into()],
                ..Default::default()
            }
            .encode_to_vec();
            let expected = Peeked { model: &name, version: &version, id: id.as_bytes(), timeout_us: timeout };
            proptest::prop_assert_eq!(peek_message(&message), Some(expected));
        }
    }
}
