//! HTTP/3 frame boundaries on a received stream, tracked without buffering (sans-IO), so a
//! peer cannot make the server hold a frame of any size it announces.
//!
//! h3 buffers a whole HEADERS (or SETTINGS, or unknown) frame before decoding it, however long
//! the frame says it is: a client announcing a 1 GiB header section and trickling it in would
//! be buffered up to the read deadline. [`FrameGuard`] sees every byte first and refuses any
//! frame other than DATA (which the body limits bound) longer than the limit, the moment its
//! length is known.

/// The DATA frame type: its payload streams through and is bounded by the body limits.
const DATA: u64 = 0x0;

/// A frame announced longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("HTTP/3 frame of type {frame_type:#x} announces {length} bytes (at most {limit})")]
pub struct OversizedFrame {
    /// The frame type.
    pub frame_type: u64,
    /// The announced payload length.
    pub length: u64,
    /// The limit.
    pub limit: u64,
}

/// A QUIC variable-length integer being read a byte at a time (RFC 9000 16).
#[derive(Debug, Clone, Copy, Default)]
struct VarInt {
    value: u64,
    read: usize,
    length: usize,
}

impl VarInt {
    /// Takes one byte; the value once complete.
    fn push(&mut self, byte: u8) -> Option<u64> {
        if self.read == 0 {
            self.length = 1 << (byte >> 6);
            self.value = u64::from(byte & 0x3f);
        } else {
            self.value = (self.value << 8) | u64::from(byte);
        }
        self.read += 1;
        (self.read == self.length).then(|| std::mem::take(self).value)
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Before the stream's type (unidirectional streams only).
    StreamType(VarInt),
    /// Not a frame stream (a QPACK or unknown unidirectional stream): nothing to check.
    Unframed,
    FrameType(VarInt),
    Length {
        frame_type: u64,
        length: VarInt,
    },
    Payload {
        remaining: u64,
    },
}

/// Follows the frames of one received stream and checks each announced length.
#[derive(Debug, Clone, Copy)]
pub struct FrameGuard {
    limit: u64,
    state: State,
}

/// The control stream's type; the only unidirectional stream a client sends frames on.
const CONTROL_STREAM: u64 = 0x0;

impl FrameGuard {
    /// For a request (bidirectional) stream: frames from the first byte.
    pub fn request(limit: u64) -> FrameGuard {
        FrameGuard {
            limit,
            state: State::FrameType(VarInt::default()),
        }
    }

    /// For a unidirectional stream: a stream type, then frames if it is the control stream.
    pub fn unidirectional(limit: u64) -> FrameGuard {
        FrameGuard {
            limit,
            state: State::StreamType(VarInt::default()),
        }
    }

    /// Accounts for `bytes`, the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), OversizedFrame> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Unframed => return Ok(()),
                State::Payload { remaining } => {
                    let skip =
                        usize::try_from(*remaining).map_or(bytes.len(), |r| r.min(bytes.len()));
                    *remaining -= skip as u64;
                    bytes = &bytes[skip..];
                    if *remaining == 0 {
                        self.state = State::FrameType(VarInt::default());
                    }
                }
                State::StreamType(varint) => {
                    if let Some(stream_type) = varint.push(bytes[0]) {
                        self.state = if stream_type == CONTROL_STREAM {
                            State::FrameType(VarInt::default())
                        } else {
                            State::Unframed
                        };
                    }
                    bytes = &bytes[1..];
                }
                State::FrameType(varint) => {
                    if let Some(frame_type) = varint.push(bytes[0]) {
                        self.state = State::Length {
                            frame_type,
                            length: VarInt::default(),
                        };
                    }
                    bytes = &bytes[1..];
                }
                State::Length { frame_type, length } => {
                    let frame_type = *frame_type;
                    if let Some(length) = length.push(bytes[0]) {
                        if frame_type != DATA && length > self.limit {
                            return Err(OversizedFrame {
                                frame_type,
                                length,
                                limit: self.limit,
                            });
                        }
                        self.state = if length == 0 {
                            State::FrameType(VarInt::default())
                        } else {
                            State::Payload { remaining: length }
                        };
                    }
                    bytes = &bytes[1..];
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QUIC varint in its shortest encoding.
    fn varint(value: u64) -> Vec<u8> {
        match value {
            0..=63 => vec![value as u8],
            64..=16383 => ((value as u16) | 0x4000).to_be_bytes().to_vec(),
            16384..=1_073_741_823 => ((value as u32) | 0x8000_0000).to_be_bytes().to_vec(),
            _ => (value | 0xc000_0000_0000_0000).to_be_bytes().to_vec(),
        }
    }

    fn frame(frame_type: u64, payload: usize) -> Vec<u8> {
        let mut bytes = varint(frame_type);
        bytes.extend(varint(payload as u64));
        bytes.extend(std::iter::repeat_n(7u8, payload));
        bytes
    }

    #[test]
    fn frames_within_the_limit_pass_in_any_split() {
        let mut stream = frame(0x1, 1000);
        stream.extend(frame(DATA, 70_000));
        stream.extend(frame(0x21, 10));
        stream.extend(frame(0x1, 0));
        for chunk in [1, 2, 3, 7, 1000, stream.len()] {
            let mut guard = FrameGuard::request(1024);
            for piece in stream.chunks(chunk) {
                guard.feed(piece).unwrap();
            }
        }
    }

    #[test]
    fn an_oversized_header_frame_is_refused_as_soon_as_its_length_arrives() {
        let mut guard = FrameGuard::request(64 * 1024);
        let mut stream = frame(DATA, 5);
        stream.extend(varint(0x1));
        stream.extend(varint(1 << 30));
        // No payload byte is needed to refuse it.
        assert_eq!(
            guard.feed(&stream),
            Err(OversizedFrame {
                frame_type: 0x1,
                length: 1 << 30,
                limit: 64 * 1024
            })
        );
        // Unknown (grease) frame types are bounded the same way.
        let mut guard = FrameGuard::request(16);
        assert!(guard.feed(&frame(0x1f * 7 + 0x21, 17)).is_err());
    }

    #[test]
    fn only_the_control_stream_is_parsed_among_unidirectional_streams() {
        let mut control = FrameGuard::unidirectional(100);
        let mut stream = varint(CONTROL_STREAM);
        stream.extend(frame(0x4, 6));
        control.feed(&stream).unwrap();
        assert!(control.feed(&frame(0x4, 101)).is_err());
        // A QPACK encoder stream (type 0x02) carries instructions, not frames.
        let mut qpack = FrameGuard::unidirectional(100);
        let mut stream = varint(0x02);
        stream.extend([0xff; 500]);
        qpack.feed(&stream).unwrap();
    }
}
