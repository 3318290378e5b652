//! Encoding and decoding of framed records (see the module doc of `log`).

use std::fmt;

pub const FRAME_HEADER_LEN: usize = 8;
/// A bound on one record so a corrupt length cannot make recovery allocate wildly.
pub const FRAME_PAYLOAD_MAX: usize = 16 * 1024 * 1024;

/// Appends one frame holding `payload` to `out`.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= FRAME_PAYLOAD_MAX,
        "record of {} bytes exceeds FRAME_PAYLOAD_MAX",
        payload.len()
    );
    let len = u32::try_from(payload.len()).expect("bounded by FRAME_PAYLOAD_MAX");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogError {
    /// A frame fails its checksum (or has an impossible length) and more data follows it.
    CorruptMiddle { offset: u64, reason: &'static str },
    /// A record passed its checksum but its payload could not be decoded.
    BadRecord { offset: u64, reason: String },
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::CorruptMiddle { offset, reason } => write!(
                f,
                "log corrupt at byte offset {offset} ({reason}) with data after it; refusing to start rather than skip records"
            ),
            LogError::BadRecord { offset, reason } => {
                write!(f, "log record at byte offset {offset} is undecodable: {reason}")
            }
        }
    }
}

impl std::error::Error for LogError {}

/// The frames found in a log image.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovered<'a> {
    /// Each valid payload with the offset of its frame.
    pub records: Vec<(u64, &'a [u8])>,
    /// Length of the valid prefix: the driver truncates the file to this.
    pub valid_len: u64,
    /// Bytes of torn tail dropped (0 when the log ended cleanly).
    pub torn_bytes: u64,
}

/// Splits a log image into frames, classifying any damage.
pub fn decode_all(bytes: &[u8]) -> Result<Recovered<'_>, LogError> {
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let offset = pos as u64;
        let torn = |records| Recovered {
            records,
            valid_len: offset,
            torn_bytes: (bytes.len() - pos) as u64,
        };
        if rest.len() < FRAME_HEADER_LEN {
            return Ok(torn(records));
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len > FRAME_PAYLOAD_MAX {
            // A garbage length. If it is the tail (a torn header), it cannot be
            // told apart from the end of a torn write: anything after it is part
            // of that same frame's claimed extent or beyond the file.
            if FRAME_HEADER_LEN + len >= rest.len() {
                return Ok(torn(records));
            }
            return Err(LogError::CorruptMiddle {
                offset,
                reason: "impossible frame length",
            });
        }
        let end = FRAME_HEADER_LEN + len;
        if end > rest.len() {
            return Ok(torn(records));
        }
        let payload = &rest[FRAME_HEADER_LEN..end];
        if crc32fast::hash(payload) != crc {
            if end == rest.len() {
                return Ok(torn(records));
            }
            return Err(LogError::CorruptMiddle {
                offset,
                reason: "checksum mismatch",
            });
        }
        records.push((offset, payload));
        pos += end;
    }
    Ok(Recovered {
        records,
        valid_len: bytes.len() as u64,
        torn_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode_frame(p, &mut out);
        }
        out
    }

    #[test]
    fn clean_log_round_trips() {
        let bytes = log_of(&[b"one", b"", b"three"]);
        let r = decode_all(&bytes).unwrap();
        let payloads: Vec<&[u8]> = r.records.iter().map(|(_, p)| *p).collect();
        assert_eq!(payloads, vec![&b"one"[..], b"", b"three"]);
        assert_eq!(r.valid_len, bytes.len() as u64);
        assert_eq!(r.torn_bytes, 0);
    }

    #[test]
    fn every_prefix_is_a_torn_tail_never_an_error() {
        let bytes = log_of(&[b"alpha", b"beta", b"gamma"]);
        for cut in 0..bytes.len() {
            let r = decode_all(&bytes[..cut]).unwrap();
            assert_eq!(r.valid_len + r.torn_bytes, cut as u64);
            assert!(r.records.len() <= 3);
        }
    }

    #[test]
    fn flipped_byte_in_last_frame_is_torn_tail() {
        let mut bytes = log_of(&[b"alpha", b"beta"]);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        let r = decode_all(&bytes).unwrap();
        assert_eq!(r.records.len(), 1);
        assert_eq!(r.torn_bytes, (FRAME_HEADER_LEN + 4) as u64);
    }

    #[test]
    fn flipped_byte_in_middle_is_refused_with_offset() {
        let mut bytes = log_of(&[b"alpha", b"beta", b"gamma"]);
        let second = FRAME_HEADER_LEN + 5;
        bytes[second + FRAME_HEADER_LEN] ^= 0xFF;
        let err = decode_all(&bytes).unwrap_err();
        assert_eq!(
            err,
            LogError::CorruptMiddle {
                offset: second as u64,
                reason: "checksum mismatch"
            }
        );
        assert!(err.to_string().contains("offset 13"));
    }
}
