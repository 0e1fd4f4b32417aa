//! Framing: a version byte, a length, then one postcard-encoded [`Message`].
//!
//! ```text
//! +---------+----------------------+---------------------------+
//! | version | payload length (u32) | postcard(Message)         |
//! | 1 byte  | little-endian        | `length` bytes            |
//! +---------+----------------------+---------------------------+
//! ```
//!
//! The length comes first so a reader refuses an oversized frame before it reads, let alone
//! allocates, the body. The version byte lets a node refuse a peer that speaks another
//! revision with a clear error instead of a decoding failure. Pure functions: no I/O.

use crate::wire::message::Message;
use bytes::Bytes;

/// The revision of `meshserve/1` frames this build speaks.
pub const WIRE_VERSION: u8 = 7;

/// Bytes before the payload: the version and the payload length.
pub const HEADER_LEN: usize = 5;

/// The default largest payload accepted, in bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Why bytes are not a frame this node accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The peer speaks another revision of the protocol.
    #[error("unsupported meshserve wire version {found} (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion {
        /// The version byte received.
        found: u8,
    },
    /// The announced payload is larger than this node accepts.
    #[error("frame of {length} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced payload length.
        length: usize,
        /// The limit.
        max: usize,
    },
    /// Fewer bytes than the header announced.
    #[error("truncated frame: {needed} bytes announced, {available} present")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// More bytes after the frame than it announced.
    #[error("{extra} bytes of garbage after the frame")]
    TrailingBytes {
        /// The surplus.
        extra: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes `message` as one frame.
pub fn encode(message: &Message) -> Vec<u8> {
    let out = vec![WIRE_VERSION, 0, 0, 0, 0];
    // Serializing our own types into a growable buffer cannot fail: every field is a plain
    // serde type with a known length.
    let mut out = postcard::to_extend(message, out).expect("messages always serialize");
    let length = u32::try_from(out.len() - HEADER_LEN).unwrap_or(u32::MAX);
    out[1..HEADER_LEN].copy_from_slice(&length.to_le_bytes());
    out
}

/// A frame as a head and, for a chunk of model bytes, the chunk itself: the two written in
/// turn are exactly what [`encode`] makes, without copying megabytes of file into the frame.
pub fn encode_vectored(message: &Message) -> (Vec<u8>, Option<Bytes>) {
    let Message::Chunk(data) = message else {
        return (encode(message), None);
    };
    let mut head = encode(&Message::Chunk(Bytes::new()));
    // postcard writes a byte string as its length (a LEB128 varint; 0 is one byte) and bytes.
    head.pop();
    let mut length = data.len() as u64;
    loop {
        let low = (length & 0x7f) as u8;
        length >>= 7;
        if length == 0 {
            head.push(low);
            break;
        }
        head.push(low | 0x80);
    }
    let payload = u32::try_from(head.len() - HEADER_LEN + data.len()).unwrap_or(u32::MAX);
    head[1..HEADER_LEN].copy_from_slice(&payload.to_le_bytes());
    (head, Some(data.clone()))
}

/// Reads a frame header: checks the version and returns the payload length, refusing one over
/// `max_payload` bytes.
pub fn decode_header(header: &[u8], max_payload: usize) -> Result<usize, WireError> {
    let Some(bytes) = header.get(..HEADER_LEN) else {
        return Err(WireError::Truncated {
            needed: HEADER_LEN,
            available: header.len(),
        });
    };
    if bytes[0] != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion { found: bytes[0] });
    }
    let length = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    if length > max_payload {
        return Err(WireError::TooLarge {
            length,
            max: max_payload,
        });
    }
    Ok(length)
}

/// Decodes a payload (the bytes after the header).
pub fn decode_payload(payload: &[u8]) -> Result<Message, WireError> {
    let (message, rest) = postcard::take_from_bytes::<Message>(payload)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes { extra: rest.len() });
    }
    Ok(message)
}

/// Decodes exactly one whole frame.
pub fn decode(frame: &[u8], max_payload: usize) -> Result<Message, WireError> {
    let length = decode_header(frame, max_payload)?;
    let body = &frame[HEADER_LEN..];
    if body.len() < length {
        return Err(WireError::Truncated {
            needed: HEADER_LEN + length,
            available: frame.len(),
        });
    }
    if body.len() > length {
        return Err(WireError::TrailingBytes {
            extra: body.len() - length,
        });
    }
    decode_payload(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_written_in_two_parts_is_the_frame_encode_makes() {
        for size in [0usize, 1, 127, 128, 16_383, 16_384, 300_000, 4 << 20] {
            let data = bytes::Bytes::from((0..size).map(|i| i as u8).collect::<Vec<u8>>());
            let message = Message::Chunk(data.clone());
            let (mut head, tail) = encode_vectored(&message);
            assert_eq!(tail.as_ref(), Some(&data));
            head.extend_from_slice(&data);
            assert!(head == encode(&message), "{size}");
        }
        let other = Message::RouteQuery;
        assert_eq!(encode_vectored(&other), (encode(&other), None));
    }

    #[test]
    fn a_frame_round_trips_and_refuses_what_it_should() {
        let frame = encode(&Message::RouteQuery);
        assert_eq!(decode(&frame, 1024).unwrap(), Message::RouteQuery);

        let mut other_version = frame.clone();
        other_version[0] = 9;
        assert_eq!(
            decode(&other_version, 1024).unwrap_err(),
            WireError::UnsupportedVersion { found: 9 }
        );

        let mut huge = frame.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge, 1024).unwrap_err(),
            WireError::TooLarge { .. }
        ));

        assert!(matches!(
            decode(&frame[..3], 1024).unwrap_err(),
            WireError::Truncated { .. }
        ));
        let mut longer = frame.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer, 1024).unwrap_err(),
            WireError::TrailingBytes { extra: 1 }
        );
        // A length that claims more than is present.
        let mut short = frame;
        short[1..5].copy_from_slice(&10u32.to_le_bytes());
        assert!(matches!(
            decode(&short, 1024).unwrap_err(),
            WireError::Truncated { .. }
        ));
    }

    #[test]
    fn garbage_payloads_are_errors_not_panics() {
        for payload in [
            &[0xff_u8][..],
            &[200, 1, 2],
            &[0, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ] {
            assert!(decode_payload(payload).is_err(), "{payload:?}");
        }
    }
}
