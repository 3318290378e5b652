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

/// Splits a log image into frames, classifying any damage: the whole image
/// fed to a [`FrameStream`] at once (one classification for both).
pub fn decode_all(bytes: &[u8]) -> Result<Recovered<'_>, LogError> {
    let mut frames = Vec::new();
    let mut stream = FrameStream::new(bytes.len() as u64);
    stream.feed(bytes, |offset, payload| {
        frames.push((offset, payload.len()));
        Ok(())
    })?;
    let summary = stream.finish();
    let records = frames
        .into_iter()
        .map(|(offset, len)| {
            let at = offset as usize + FRAME_HEADER_LEN;
            (offset, &bytes[at..at + len])
        })
        .collect();
    Ok(Recovered {
        records,
        valid_len: summary.valid_len,
        torn_bytes: summary.torn_bytes,
    })
}

/// What the bytes at a frame boundary hold, knowing how many bytes the log has
/// from there on. A failing frame is a torn tail if nothing follows what it
/// claims, corruption otherwise.
#[derive(Clone, Copy)]
enum Step {
    /// A whole valid frame, `end` bytes long (header included).
    Frame {
        end: usize,
    },
    /// Valid so far; the first `n` bytes are needed to judge it.
    NeedMore(usize),
    Torn,
    Corrupt(&'static str),
}

/// Splits a log fed in chunks into frames (a push parser: the caller does the
/// reading), so a driver can replay a large log without holding its image.
/// Telling a torn tail from corruption needs the log's total length up front.
///
/// **Invariant:** fed every byte of a log in any chunking, it calls back the
/// same frames, at the same offsets, and ends with the same verdict as when
/// fed the whole image at once ([`decode_all`]).
pub struct FrameStream {
    total: u64,
    fed: u64,
    /// Offset of the next frame.
    pos: u64,
    records: u64,
    /// A frame split across chunks: its bytes so far.
    carry: Vec<u8>,
    /// A torn tail starts at `pos`; the rest is ignored.
    torn: bool,
}

/// What a fully fed [`FrameStream`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSummary {
    pub records: u64,
    pub valid_len: u64,
    pub torn_bytes: u64,
}

impl FrameStream {
    /// A stream for a log of `total` bytes.
    pub fn new(total: u64) -> FrameStream {
        FrameStream {
            total,
            fed: 0,
            pos: 0,
            records: 0,
            carry: Vec::new(),
            torn: false,
        }
    }

    fn step(&self, buf: &[u8]) -> Step {
        let rest = self.total - self.pos;
        if rest < FRAME_HEADER_LEN as u64 {
            return Step::Torn;
        }
        if buf.len() < FRAME_HEADER_LEN {
            return Step::NeedMore(FRAME_HEADER_LEN);
        }
        let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
        let end = FRAME_HEADER_LEN + len;
        if len > FRAME_PAYLOAD_MAX {
            // A garbage length. If it is the tail (a torn header), it cannot be
            // told apart from the end of a torn write: anything after it is part
            // of that same frame's claimed extent or beyond the file.
            return if end as u64 >= rest {
                Step::Torn
            } else {
                Step::Corrupt("impossible frame length")
            };
        }
        if end as u64 > rest {
            return Step::Torn;
        }
        if buf.len() < end {
            return Step::NeedMore(end);
        }
        if crc32fast::hash(&buf[FRAME_HEADER_LEN..end]) != crc {
            return if end as u64 == rest {
                Step::Torn
            } else {
                Step::Corrupt("checksum mismatch")
            };
        }
        Step::Frame { end }
    }

    /// Feeds the next bytes of the log; `record(offset, payload)` is called for
    /// each valid frame, in order. Stops at the first error (corruption, or the
    /// callback's).
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        mut record: impl FnMut(u64, &[u8]) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        self.fed += chunk.len() as u64;
        assert!(self.fed <= self.total, "fed more than the log's length");
        // First complete a frame split across chunks, taking only its bytes.
        while !self.torn && !self.carry.is_empty() {
            match self.step(&self.carry) {
                Step::NeedMore(n) => {
                    let take = (n - self.carry.len()).min(chunk.len());
                    if take == 0 {
                        return Ok(());
                    }
                    self.carry.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                }
                Step::Frame { end } => {
                    record(self.pos, &self.carry[FRAME_HEADER_LEN..end])?;
                    self.records += 1;
                    self.pos += end as u64;
                    self.carry.clear();
                }
                Step::Torn => self.torn = true,
                Step::Corrupt(reason) => {
                    return Err(LogError::CorruptMiddle {
                        offset: self.pos,
                        reason,
                    });
                }
            }
        }
        // Then whole frames straight from the chunk.
        let mut i = 0;
        while !self.torn && i < chunk.len() {
            match self.step(&chunk[i..]) {
                Step::Frame { end } => {
                    record(self.pos, &chunk[i + FRAME_HEADER_LEN..i + end])?;
                    self.records += 1;
                    self.pos += end as u64;
                    i += end;
                }
                Step::NeedMore(_) => {
                    self.carry.extend_from_slice(&chunk[i..]);
                    break;
                }
                Step::Torn => self.torn = true,
                Step::Corrupt(reason) => {
                    return Err(LogError::CorruptMiddle {
                        offset: self.pos,
                        reason,
                    });
                }
            }
        }
        Ok(())
    }

    /// The verdict, once every byte was fed.
    pub fn finish(&self) -> StreamSummary {
        assert_eq!(self.fed, self.total, "finish before the whole log was fed");
        // Fully fed, a frame still waiting for bytes is impossible: `step`
        // judges one that the log's end cuts short as torn.
        debug_assert!(self.torn || (self.pos == self.total && self.carry.is_empty()));
        StreamSummary {
            records: self.records,
            valid_len: self.pos,
            torn_bytes: self.total - self.pos,
        }
    }
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

    /// Frames (offset, payload) and the verdict, as both decoders report them.
    type Decoded = Result<(Vec<(u64, Vec<u8>)>, StreamSummary), LogError>;

    /// Everything a stream calls back and concludes, for comparison.
    fn stream(bytes: &[u8], chunks: &[usize]) -> Decoded {
        let mut s = FrameStream::new(bytes.len() as u64);
        let mut got = Vec::new();
        let mut rest = bytes;
        let mut sizes = chunks.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().expect("cycle")).clamp(1, rest.len());
            s.feed(&rest[..n], |off, p| {
                got.push((off, p.to_vec()));
                Ok(())
            })?;
            rest = &rest[n..];
        }
        Ok((got, s.finish()))
    }

    proptest::proptest! {
        /// Any chunking of any log, damaged or not, gives what the whole image
        /// fed at once gives (`decode_all`).
        #[test]
        fn stream_agrees_with_decode_all(
            payloads in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..40), 0..8),
            damage in 0..4u8,
            at in 0..10_000usize,
            byte in proptest::num::u8::ANY,
            chunks in proptest::collection::vec(1..50usize, 1..6),
        ) {
            let mut bytes = Vec::new();
            for p in &payloads {
                encode_frame(p, &mut bytes);
            }
            match damage {
                1 if !bytes.is_empty() => bytes.truncate(at % bytes.len()),
                2 if !bytes.is_empty() => {
                    let i = at % bytes.len();
                    bytes[i] ^= byte | 1;
                }
                3 => bytes.extend_from_slice(&[byte, 0xFF, 0xFF, 0xFF, 1, 2]),
                _ => {}
            }
            let whole = decode_all(&bytes).map(|r| {
                let frames: Vec<(u64, Vec<u8>)> = r.records.iter().map(|(o, p)| (*o, p.to_vec())).collect();
                (frames, StreamSummary { records: r.records.len() as u64, valid_len: r.valid_len, torn_bytes: r.torn_bytes })
            });
            proptest::prop_assert_eq!(stream(&bytes, &chunks), whole);
        }
    }

    #[test]
    fn stream_chunked_byte_by_byte_finds_every_frame() {
        let bytes = log_of(&[b"one", b"", b"three"]);
        let (frames, summary) = stream(&bytes, &[1]).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(
            summary,
            StreamSummary {
                records: 3,
                valid_len: bytes.len() as u64,
                torn_bytes: 0
            }
        );
    }
}
