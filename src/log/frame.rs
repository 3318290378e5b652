//! Encoding and decoding of the log format: the file header, the frames, and
//! the torn-tail-or-corruption verdict (see the module doc of `log`).

use std::fmt;

/// Bytes of the file header that opens every non-empty log.
pub const FILE_HEADER_LEN: usize = 12;
/// The first bytes of every log.
pub const FILE_MAGIC: &[u8; 7] = b"SAGAMQ\0";
/// The format this build writes and the only one it reads.
pub const FORMAT_VERSION: u8 = 2;
/// `[payload length][CRC-32 of payload][CRC-32 of the 8 bytes before it]`.
pub const FRAME_HEADER_LEN: usize = 12;
/// A bound on one record so a corrupt length cannot make recovery allocate
/// wildly; it also bounds what [`FrameStream`] carries between chunks.
pub const FRAME_PAYLOAD_MAX: usize = 16 * 1024 * 1024;

/// Appends the file header: [`FILE_MAGIC`], [`FORMAT_VERSION`], and the CRC-32
/// of those 8 bytes. The disk writes it (see [`super::Disk`]); a test building
/// a log image by hand starts with it.
pub fn encode_file_header(out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(FILE_MAGIC);
    out.push(FORMAT_VERSION);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// A log image holding only the file header (where a log's frames go).
pub fn empty_log() -> Vec<u8> {
    let mut out = Vec::new();
    encode_file_header(&mut out);
    out
}

/// Appends one frame holding `payload` to `out`.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= FRAME_PAYLOAD_MAX,
        "record of {} bytes exceeds FRAME_PAYLOAD_MAX",
        payload.len()
    );
    let len = u32::try_from(payload.len()).expect("bounded by FRAME_PAYLOAD_MAX");
    let mut head = [0u8; FRAME_HEADER_LEN];
    head[0..4].copy_from_slice(&len.to_le_bytes());
    head[4..8].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let head_crc = crc32fast::hash(&head[0..8]);
    head[8..12].copy_from_slice(&head_crc.to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
}

/// Makes the bytes of `out` from `start` one frame: `start` begins
/// [`FRAME_HEADER_LEN`] placeholder bytes (their value is ignored), the
/// payload follows them to the end. The same bytes as [`encode_frame`] of
/// that payload, for a caller that serializes straight into the log buffer.
pub fn seal_frame(out: &mut [u8], start: usize) {
    let (head, payload) = out[start..].split_at_mut(FRAME_HEADER_LEN);
    assert!(
        payload.len() <= FRAME_PAYLOAD_MAX,
        "record of {} bytes exceeds FRAME_PAYLOAD_MAX",
        payload.len()
    );
    let len = u32::try_from(payload.len()).expect("bounded by FRAME_PAYLOAD_MAX");
    head[0..4].copy_from_slice(&len.to_le_bytes());
    head[4..8].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let head_crc = crc32fast::hash(&head[0..8]);
    head[8..12].copy_from_slice(&head_crc.to_le_bytes());
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// The payload length a frame header (at least [`FRAME_HEADER_LEN`] bytes)
/// claims, once its own checksum holds: a length is never trusted unchecked.
fn checked_len(head: &[u8]) -> Option<usize> {
    (crc32fast::hash(&head[0..8]) == u32_at(head, 8)).then(|| u32_at(head, 0) as usize)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogError {
    /// Damage at `offset` with a frame that validates (header and payload
    /// checksums) at `next_valid` after it: not what a crash during an
    /// unsynced write leaves, so acknowledged records would be lost by cutting.
    CorruptMiddle {
        offset: u64,
        reason: &'static str,
        next_valid: u64,
    },
    /// A record passed its checksum but its payload could not be decoded.
    BadRecord { offset: u64, reason: String },
    /// The file header names a format this build does not read (1: a log
    /// written before file headers existed, recognised by its first frame).
    UnsupportedVersion { found: u8 },
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::CorruptMiddle {
                offset,
                reason,
                next_valid,
            } => write!(
                f,
                "log corrupt at byte offset {offset} ({reason}) with a valid frame after it at byte offset \
                 {next_valid}; refusing to start rather than cut acknowledged records"
            ),
            LogError::BadRecord { offset, reason } => {
                write!(f, "log record at byte offset {offset} is undecodable: {reason}")
            }
            LogError::UnsupportedVersion { found } => {
                write!(
                    f,
                    "log format version {found} is not supported: this build reads format version \
                     {FORMAT_VERSION} only"
                )?;
                if *found == 1 {
                    write!(f, " (a version 1 log has no file header and is not converted)")?;
                }
                write!(f, "; refusing to start rather than misread it")
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

/// Splits a log image (file header, then frames) into frames, classifying any
/// damage: the whole image fed to a [`FrameStream`] at once (one
/// classification for both).
pub fn decode_all(bytes: &[u8]) -> Result<Recovered<'_>, LogError> {
    decode_with(FrameStream::new(bytes.len() as u64), bytes)
}

/// Splits a buffer of frames without a file header (a `Persist` or `Rewrite`
/// output, before the disk puts it in a log) into frames, for traces and tests.
/// Offsets are relative to the buffer. Damage is judged as in a log.
pub fn decode_frames(bytes: &[u8]) -> Result<Recovered<'_>, LogError> {
    decode_with(FrameStream::frames_only(bytes.len() as u64), bytes)
}

fn decode_with(mut stream: FrameStream, bytes: &[u8]) -> Result<Recovered<'_>, LogError> {
    let mut frames = Vec::new();
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

/// What the bytes at `pos` hold, knowing how many bytes the log has from there.
#[derive(Clone, Copy)]
enum Step {
    /// The file header, or a whole valid frame: `end` bytes long.
    Item { end: usize },
    /// Valid so far; the first `n` bytes are needed to judge it.
    NeedMore(usize),
    /// Not a valid item: the valid prefix ends here (torn or corrupt is
    /// decided by what follows).
    Damaged(&'static str),
}

/// What a scan after damage found.
enum Scan {
    /// A frame that validates starts here.
    Found(u64),
    /// The first `n` bytes of the buffer start no valid frame; the next one
    /// needs more bytes to be judged.
    Pending(usize),
    /// No frame fits between the scan's position and the end of the log.
    Exhausted,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    /// At offset 0, before the file header.
    FileHeader,
    /// At a frame boundary, `pos`.
    Frames,
    /// The valid prefix ends at `pos` for `reason`; looking for a frame that
    /// validates at `next` (where `carry` starts) or later.
    Damaged { reason: &'static str, next: u64 },
    /// The valid prefix ends at `pos` and no frame validates after it.
    Torn,
}

/// Splits a log fed in chunks into frames (a push parser: the caller does the
/// reading), so a driver can replay a large log without holding its image.
/// Telling a torn tail from corruption needs the log's total length up front.
///
/// **Invariant:** fed every byte of a log in any chunking, it calls back the
/// same frames, at the same offsets, and ends with the same verdict as when
/// fed the whole image at once ([`decode_all`]). It carries at most one frame
/// ([`FRAME_HEADER_LEN`] + [`FRAME_PAYLOAD_MAX`] bytes) plus one chunk.
#[derive(Clone, Debug)]
pub struct FrameStream {
    total: u64,
    fed: u64,
    /// Offset of the next frame; once damaged, the end of the valid prefix.
    pos: u64,
    records: u64,
    /// Before damage: an item split across chunks, its bytes so far (from
    /// `pos`). After: the bytes from the scan's `next` not yet judged.
    carry: Vec<u8>,
    phase: Phase,
}

/// What a fully fed [`FrameStream`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSummary {
    pub records: u64,
    pub valid_len: u64,
    pub torn_bytes: u64,
}

impl FrameStream {
    /// A stream for a log of `total` bytes (file header, then frames).
    pub fn new(total: u64) -> FrameStream {
        FrameStream::starting(total, Phase::FileHeader)
    }

    /// A stream for `total` bytes of frames with no file header.
    fn frames_only(total: u64) -> FrameStream {
        FrameStream::starting(total, Phase::Frames)
    }

    fn starting(total: u64, phase: Phase) -> FrameStream {
        FrameStream {
            total,
            fed: 0,
            pos: 0,
            records: 0,
            carry: Vec::new(),
            phase,
        }
    }

    /// How many bytes were fed so far.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Makes this stream one for a longer log of `total` bytes that begins
    /// with the bytes fed so far. Possible only when they ended on a frame
    /// boundary with no damage seen: every frame judged then fit in the log,
    /// so it is judged the same in the longer one, and nothing waits to be
    /// judged. False, and nothing changed, otherwise.
    pub fn resume(&mut self, total: u64) -> bool {
        let at_boundary = matches!(self.phase, Phase::Frames) && self.carry.is_empty() && self.pos == self.fed;
        if !at_boundary || total < self.total {
            return false;
        }
        self.total = total;
        true
    }

    fn parsing(&self) -> bool {
        matches!(self.phase, Phase::FileHeader | Phase::Frames)
    }

    /// Judges the item at `pos`, whose first bytes are `buf`.
    fn step(&self, buf: &[u8]) -> Result<Step, LogError> {
        let rest = self.total - self.pos;
        match self.phase {
            Phase::FileHeader => Self::file_header(buf, rest),
            Phase::Frames => Ok(Self::frame(buf, rest)),
            Phase::Damaged { .. } | Phase::Torn => unreachable!("step is only called while parsing"),
        }
    }

    fn file_header(buf: &[u8], rest: u64) -> Result<Step, LogError> {
        if rest < FILE_HEADER_LEN as u64 {
            return Ok(Step::Damaged("incomplete file header"));
        }
        if buf.len() < FILE_HEADER_LEN {
            return Ok(Step::NeedMore(FILE_HEADER_LEN));
        }
        let magic = &buf[0..7] == FILE_MAGIC;
        if crc32fast::hash(&buf[0..8]) == u32_at(buf, 8) && magic {
            return match buf[7] {
                FORMAT_VERSION => Ok(Step::Item { end: FILE_HEADER_LEN }),
                found => Err(LogError::UnsupportedVersion { found }),
            };
        }
        // A version 1 log has no file header: it opens with a frame
        // `[len][CRC-32 of payload][payload]`. Its records are never empty,
        // which keeps a zeroed header (len 0, CRC 0) from passing for one.
        let len = u32_at(buf, 0) as usize;
        let v1_end = 8 + len;
        if (1..=FRAME_PAYLOAD_MAX).contains(&len) && v1_end as u64 <= rest {
            if buf.len() < v1_end {
                return Ok(Step::NeedMore(v1_end));
            }
            if crc32fast::hash(&buf[8..v1_end]) == u32_at(buf, 4) {
                return Err(LogError::UnsupportedVersion { found: 1 });
            }
        }
        Ok(Step::Damaged(if magic {
            "file header checksum mismatch"
        } else {
            "no file header"
        }))
    }

    fn frame(buf: &[u8], rest: u64) -> Step {
        if rest < FRAME_HEADER_LEN as u64 {
            return Step::Damaged("incomplete frame header");
        }
        if buf.len() < FRAME_HEADER_LEN {
            return Step::NeedMore(FRAME_HEADER_LEN);
        }
        let Some(len) = checked_len(buf) else {
            return Step::Damaged("frame header checksum mismatch");
        };
        if len > FRAME_PAYLOAD_MAX {
            // Checked, so written this way: not by this format's writer.
            return Step::Damaged("frame length over FRAME_PAYLOAD_MAX");
        }
        let end = FRAME_HEADER_LEN + len;
        if end as u64 > rest {
            return Step::Damaged("frame runs past the end of the log");
        }
        if buf.len() < end {
            return Step::NeedMore(end);
        }
        if crc32fast::hash(&buf[FRAME_HEADER_LEN..end]) != u32_at(buf, 4) {
            return Step::Damaged("payload checksum mismatch");
        }
        Step::Item { end }
    }

    /// Looks for a frame that validates, starting at each byte of `buf`
    /// (which starts at offset `at`) in turn.
    fn scan(&self, buf: &[u8], at: u64) -> Scan {
        let mut j = 0;
        loop {
            let rest = self.total - (at + j as u64);
            if rest < FRAME_HEADER_LEN as u64 {
                return Scan::Exhausted;
            }
            let here = &buf[j..];
            if here.len() < FRAME_HEADER_LEN {
                return Scan::Pending(j);
            }
            // The length test first: it rejects most garbage without a CRC.
            let len = u32_at(here, 0) as usize;
            if len <= FRAME_PAYLOAD_MAX && checked_len(here).is_some() {
                let end = FRAME_HEADER_LEN + len;
                if end as u64 <= rest {
                    if here.len() < end {
                        return Scan::Pending(j);
                    }
                    if crc32fast::hash(&here[FRAME_HEADER_LEN..end]) == u32_at(here, 4) {
                        return Scan::Found(at + j as u64);
                    }
                }
            }
            j += 1;
        }
    }

    /// The valid prefix ends at `pos`: from now on, look for a valid frame
    /// starting at any later byte.
    fn damage(&mut self, reason: &'static str) {
        self.phase = Phase::Damaged {
            reason,
            next: self.pos + 1,
        };
    }

    /// Feeds the next bytes of the log; `record(offset, payload)` is called for
    /// each valid frame, in order. Stops at the first error (corruption, an
    /// unsupported format, or the callback's).
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        mut record: impl FnMut(u64, &[u8]) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        self.fed += chunk.len() as u64;
        assert!(self.fed <= self.total, "fed more than the log's length");
        // First complete an item split across chunks, taking only its bytes.
        while self.parsing() && !self.carry.is_empty() {
            match self.step(&self.carry)? {
                Step::NeedMore(n) => {
                    let take = (n - self.carry.len()).min(chunk.len());
                    if take == 0 {
                        return Ok(());
                    }
                    self.carry.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                }
                Step::Item { end } => {
                    if matches!(self.phase, Phase::Frames) {
                        record(self.pos, &self.carry[FRAME_HEADER_LEN..end])?;
                        self.records += 1;
                    }
                    self.phase = Phase::Frames;
                    self.pos += end as u64;
                    self.carry.clear();
                }
                Step::Damaged(reason) => {
                    self.damage(reason);
                    // The carry now starts where the scan does.
                    self.carry.drain(..1);
                }
            }
        }
        // Then whole items straight from the chunk.
        let mut i = 0;
        while self.parsing() && i < chunk.len() {
            match self.step(&chunk[i..])? {
                Step::Item { end } => {
                    if matches!(self.phase, Phase::Frames) {
                        record(self.pos, &chunk[i + FRAME_HEADER_LEN..i + end])?;
                        self.records += 1;
                    }
                    self.phase = Phase::Frames;
                    self.pos += end as u64;
                    i += end;
                }
                Step::NeedMore(_) => {
                    self.carry.extend_from_slice(&chunk[i..]);
                    i = chunk.len();
                }
                Step::Damaged(reason) => {
                    self.damage(reason);
                    i += 1;
                }
            }
        }
        // After damage: a frame that validates anywhere later makes it corruption.
        if let Phase::Damaged { reason, next } = self.phase {
            let rest = &chunk[i..];
            let scan = if self.carry.is_empty() {
                let scan = self.scan(rest, next);
                if let Scan::Pending(j) = scan {
                    self.carry.extend_from_slice(&rest[j..]);
                }
                scan
            } else {
                self.carry.extend_from_slice(rest);
                let scan = self.scan(&self.carry, next);
                if let Scan::Pending(j) = scan {
                    self.carry.drain(..j);
                }
                scan
            };
            match scan {
                Scan::Found(next_valid) => {
                    return Err(LogError::CorruptMiddle {
                        offset: self.pos,
                        reason,
                        next_valid,
                    });
                }
                Scan::Pending(j) => {
                    self.phase = Phase::Damaged {
                        reason,
                        next: next + j as u64,
                    };
                }
                Scan::Exhausted => {
                    self.phase = Phase::Torn;
                    self.carry = Vec::new();
                }
            }
        }
        Ok(())
    }

    /// The verdict, once every byte was fed.
    pub fn finish(&self) -> StreamSummary {
        assert_eq!(self.fed, self.total, "finish before the whole log was fed");
        // Fully fed, nothing still waits for bytes: `step` and `scan` judge
        // what the log's end cuts short.
        match self.phase {
            Phase::FileHeader => assert_eq!(self.total, 0, "a fed file header is judged"),
            Phase::Frames => assert!(self.pos == self.total && self.carry.is_empty()),
            Phase::Damaged { .. } => unreachable!("a fully fed scan reaches a verdict"),
            Phase::Torn => {}
        }
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
    use proptest::prelude::*;

    /// A log image holding `payloads`, and the offset of each frame.
    fn log_with_offsets(payloads: &[Vec<u8>]) -> (Vec<u8>, Vec<u64>) {
        let mut out = empty_log();
        let mut offsets = Vec::new();
        for p in payloads {
            offsets.push(out.len() as u64);
            encode_frame(p, &mut out);
        }
        (out, offsets)
    }

    fn log_of(payloads: &[&[u8]]) -> Vec<u8> {
        log_with_offsets(&payloads.iter().map(|p| p.to_vec()).collect::<Vec<_>>()).0
    }

    fn payloads_of(r: &Recovered<'_>) -> Vec<Vec<u8>> {
        r.records.iter().map(|(_, p)| p.to_vec()).collect()
    }

    /// Each frame's offset and payload.
    type Frames = Vec<(u64, Vec<u8>)>;

    /// The frames and summary of `stream` fed `bytes`, then finished.
    fn run_stream(mut stream: FrameStream, bytes: &[u8]) -> Result<(Frames, StreamSummary), LogError> {
        let mut frames = Vec::new();
        stream.feed(bytes, |offset, payload| {
            frames.push((offset, payload.to_vec()));
            Ok(())
        })?;
        Ok((frames, stream.finish()))
    }

    /// A frame sealed in place is the frame `encode_frame` makes.
    #[test]
    fn a_frame_sealed_in_place_is_the_encoded_frame() {
        for payload in [&b""[..], b"x", b"{\"Acked\":{\"outbox\":3}}", &[7u8; 1000][..]] {
            let mut encoded = b"before".to_vec();
            encode_frame(payload, &mut encoded);
            let mut sealed = b"before".to_vec();
            sealed.extend_from_slice(&[0xAA; FRAME_HEADER_LEN]);
            sealed.extend_from_slice(payload);
            seal_frame(&mut sealed, 6);
            assert_eq!(sealed, encoded);
        }
    }

    #[test]
    fn a_stream_resumed_on_a_longer_log_judges_it_as_one_fed_it_whole() {
        let short = log_of(&[b"one", b"two"]);
        let mut long = log_of(&[b"one", b"two", b"three"]);
        long.extend_from_slice(b"torn"); // a torn tail after the new frame
        let mut stream = FrameStream::new(short.len() as u64);
        let mut frames = Vec::new();
        stream
            .feed(&short, |offset, payload| {
                frames.push((offset, payload.to_vec()));
                Ok(())
            })
            .unwrap();
        assert!(!stream.resume(short.len() as u64 - 1), "never shorter");
        assert!(stream.resume(long.len() as u64));
        let (rest, summary) = run_stream(stream, &long[short.len()..]).unwrap();
        frames.extend(rest);
        assert_eq!(
            (frames, summary),
            run_stream(FrameStream::new(long.len() as u64), &long).unwrap()
        );
        // Not past damage, nor with a frame half fed.
        let mut torn = FrameStream::new(long.len() as u64 - 2);
        torn.feed(&long[..long.len() - 2], |_, _| Ok(())).unwrap();
        assert!(!torn.resume(long.len() as u64));
        let mut half = FrameStream::new(long.len() as u64);
        half.feed(&long[..short.len() + 5], |_, _| Ok(())).unwrap();
        assert!(!half.resume(long.len() as u64 + 10));
    }

    #[test]
    fn clean_log_round_trips() {
        let bytes = log_of(&[b"one", b"", b"three"]);
        assert_eq!(&bytes[..7], FILE_MAGIC);
        let r = decode_all(&bytes).unwrap();
        let payloads: Vec<&[u8]> = r.records.iter().map(|(_, p)| *p).collect();
        assert_eq!(payloads, vec![&b"one"[..], b"", b"three"]);
        assert_eq!(r.records[0].0, FILE_HEADER_LEN as u64);
        assert_eq!(r.valid_len, bytes.len() as u64);
        assert_eq!(r.torn_bytes, 0);
    }

    #[test]
    fn an_empty_image_and_a_bare_header_are_empty_logs() {
        let r = decode_all(&[]).unwrap();
        assert_eq!((r.records.len(), r.valid_len, r.torn_bytes), (0, 0, 0));
        let header = empty_log();
        let r = decode_all(&header).unwrap();
        assert_eq!(
            (r.records.len(), r.valid_len, r.torn_bytes),
            (0, FILE_HEADER_LEN as u64, 0)
        );
    }

    #[test]
    fn frames_without_a_file_header_decode_as_frames_only() {
        let mut frames = Vec::new();
        encode_frame(b"a", &mut frames);
        encode_frame(b"bc", &mut frames);
        let r = decode_frames(&frames).unwrap();
        assert_eq!(payloads_of(&r), vec![b"a".to_vec(), b"bc".to_vec()]);
        assert_eq!(r.records[0].0, 0);
        // A log image needs its header: these frames alone are a damaged header
        // followed by a valid frame.
        assert!(matches!(
            decode_all(&frames),
            Err(LogError::CorruptMiddle {
                offset: 0,
                reason: "no file header",
                ..
            })
        ));
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
        let second = FILE_HEADER_LEN + FRAME_HEADER_LEN + 5;
        let third = second + FRAME_HEADER_LEN + 4;
        bytes[second + FRAME_HEADER_LEN] ^= 0xFF;
        let err = decode_all(&bytes).unwrap_err();
        assert_eq!(
            err,
            LogError::CorruptMiddle {
                offset: second as u64,
                reason: "payload checksum mismatch",
                next_valid: third as u64,
            }
        );
        assert!(err.to_string().contains("offset 29"), "{err}");
    }

    /// The planted regression. Version 1 framed `[len][CRC-32 of payload]`
    /// with the length outside any checksum, and judged a frame whose length
    /// ran past the end of the log a torn tail. One flipped bit in a length in
    /// the middle of a synced log therefore cut that record and every
    /// acknowledged one after it, silently. Version 2 checks the header first.
    #[test]
    fn flipped_length_in_the_middle_is_refused_where_version_1_cut_acknowledged_records() {
        let payloads: [&[u8]; 4] = [b"acked-1", b"acked-2", b"acked-3", b"acked-4"];

        // The version 1 rule, verbatim in substance: the valid prefix it kept.
        fn v1_valid_len(log: &[u8]) -> Result<usize, &'static str> {
            let mut pos = 0;
            while pos < log.len() {
                let rest = log.len() - pos;
                if rest < 8 {
                    return Ok(pos);
                }
                let len = u32_at(log, pos) as usize;
                let end = 8 + len;
                if len > FRAME_PAYLOAD_MAX {
                    return if end >= rest {
                        Ok(pos)
                    } else {
                        Err("impossible frame length")
                    };
                }
                if end > rest {
                    return Ok(pos); // "torn"
                }
                if crc32fast::hash(&log[pos + 8..pos + end]) != u32_at(log, pos + 4) {
                    return if end == rest { Ok(pos) } else { Err("checksum mismatch") };
                }
                pos += end;
            }
            Ok(pos)
        }
        let mut v1 = Vec::new();
        let mut v1_second = 0;
        for (i, p) in payloads.iter().enumerate() {
            if i == 1 {
                v1_second = v1.len();
            }
            v1.extend_from_slice(&(p.len() as u32).to_le_bytes());
            v1.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            v1.extend_from_slice(p);
        }
        // Bit 12 of the second record's length: 7 becomes 4103, past the end.
        v1[v1_second + 1] ^= 0x10;
        assert_eq!(v1_valid_len(&v1), Ok(v1_second), "version 1 kept only the first record");

        // The same flip in version 2 is refused, naming the damaged frame.
        let (mut v2, offsets) = log_with_offsets(&payloads.iter().map(|p| p.to_vec()).collect::<Vec<_>>());
        v2[offsets[1] as usize + 1] ^= 0x10;
        assert_eq!(
            decode_all(&v2),
            Err(LogError::CorruptMiddle {
                offset: offsets[1],
                reason: "frame header checksum mismatch",
                next_valid: offsets[2],
            })
        );
    }

    #[test]
    fn a_bad_header_checksum_in_the_middle_is_corrupt_even_if_its_length_points_past_the_end() {
        let (mut bytes, offsets) = log_with_offsets(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        bytes[offsets[0] as usize + 3] ^= 0x80; // length 1 becomes 2^31 + 1
        let err = decode_all(&bytes).unwrap_err();
        assert!(
            matches!(err, LogError::CorruptMiddle { offset, next_valid, .. } if offset == offsets[0] && next_valid == offsets[1]),
            "{err}"
        );
    }

    #[test]
    fn zeros_never_pass_for_a_frame() {
        assert_ne!(crc32fast::hash(&[0u8; 8]), 0);
        let mut bytes = log_of(&[b"kept"]);
        let good = bytes.len() as u64;
        bytes.extend_from_slice(&[0u8; 300]);
        let r = decode_all(&bytes).unwrap();
        assert_eq!((r.records.len(), r.valid_len, r.torn_bytes), (1, good, 300));
        // A new log whose first write left only zeros behind.
        let r = decode_all(&[0u8; 64]).unwrap();
        assert_eq!((r.records.len(), r.valid_len, r.torn_bytes), (0, 0, 64));
    }

    #[test]
    fn a_damaged_file_header_is_torn_alone_and_corrupt_before_frames() {
        let mut bytes = log_of(&[b"one"]);
        bytes[7] ^= 0x01; // the version byte: the header checksum no longer holds
        assert_eq!(
            decode_all(&bytes),
            Err(LogError::CorruptMiddle {
                offset: 0,
                reason: "file header checksum mismatch",
                next_valid: FILE_HEADER_LEN as u64,
            })
        );
        let mut header = empty_log();
        header[2] ^= 0x04;
        let r = decode_all(&header).unwrap();
        assert_eq!((r.valid_len, r.torn_bytes), (0, FILE_HEADER_LEN as u64));
    }

    #[test]
    fn an_unknown_format_version_is_refused() {
        let mut bytes = FILE_MAGIC.to_vec();
        bytes.push(3);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        encode_frame(b"from the future", &mut bytes);
        let err = decode_all(&bytes).unwrap_err();
        assert_eq!(err, LogError::UnsupportedVersion { found: 3 });
        assert!(err.to_string().contains("format version 3 is not supported"), "{err}");
    }

    #[test]
    fn a_version_1_log_is_refused_not_truncated() {
        let mut v1 = Vec::new();
        for p in [&b"{\"record\":1}"[..], b"{\"record\":2}"] {
            v1.extend_from_slice(&(p.len() as u32).to_le_bytes());
            v1.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            v1.extend_from_slice(p);
        }
        let err = decode_all(&v1).unwrap_err();
        assert_eq!(err, LogError::UnsupportedVersion { found: 1 });
        assert!(err.to_string().contains("version 1 log has no file header"), "{err}");
        // Streamed a byte at a time, the same verdict.
        assert_eq!(stream(&v1, &[1]), Err(LogError::UnsupportedVersion { found: 1 }));
    }

    #[test]
    fn the_scan_after_damage_carries_only_a_header_through_garbage() {
        let mut bytes = log_of(&[b"one", b"two"]);
        let good = bytes.len();
        let mut x = 0x9E37_79B9_u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bytes.push(x as u8);
        }
        let mut s = FrameStream::new(bytes.len() as u64);
        let mut frames = 0;
        for chunk in bytes.chunks(97) {
            s.feed(chunk, |_, _| {
                frames += 1;
                Ok(())
            })
            .unwrap();
            assert!(s.carry.len() < FRAME_HEADER_LEN + 97, "carried {}", s.carry.len());
        }
        let summary = s.finish();
        assert_eq!((frames, summary.valid_len), (2, good as u64));
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

    fn whole(bytes: &[u8]) -> Decoded {
        decode_all(bytes).map(|r| {
            let frames: Vec<(u64, Vec<u8>)> = r.records.iter().map(|(o, p)| (*o, p.to_vec())).collect();
            let summary = StreamSummary {
                records: r.records.len() as u64,
                valid_len: r.valid_len,
                torn_bytes: r.torn_bytes,
            };
            (frames, summary)
        })
    }

    fn payloads(max: usize) -> impl Strategy<Value = Vec<Vec<u8>>> {
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..max)
    }

    proptest! {
        /// Any chunking of any log, damaged or not, gives what the whole image
        /// fed at once gives (`decode_all`).
        #[test]
        fn stream_agrees_with_decode_all(
            payloads in payloads(8),
            damage in 0..7u8,
            at in 0..10_000usize,
            byte in any::<u8>(),
            garbage in proptest::collection::vec(any::<u8>(), 0..60),
            chunks in proptest::collection::vec(1..50usize, 1..6),
        ) {
            let (mut bytes, _) = log_with_offsets(&payloads);
            let n = bytes.len();
            match damage {
                1 => bytes.truncate(at % n),
                2 => bytes[at % n] ^= byte | 1,
                3 => bytes.extend_from_slice(&[byte, 0xFF, 0xFF, 0xFF, 1, 2]),
                4 => bytes.extend(std::iter::repeat_n(0, at % 200)),
                5 => bytes.extend_from_slice(&garbage),
                6 => {
                    // Damage in the middle, and a tail after it.
                    bytes[at % n] ^= byte | 1;
                    bytes.extend_from_slice(&garbage);
                }
                _ => {}
            }
            prop_assert_eq!(stream(&bytes, &chunks), whole(&bytes));
        }

        /// A flipped bit in a synced log is refused, naming the damaged frame
        /// and the valid one after it; only in the last frame (where a torn
        /// write could have left it) is it cut, and nothing before it.
        #[test]
        fn a_bit_flip_is_refused_with_its_offset_or_cuts_only_the_last_frame(
            payloads in payloads(8),
            at in any::<proptest::sample::Index>(),
            bit in 0..8u8,
        ) {
            let (mut bytes, offsets) = log_with_offsets(&payloads);
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            // The frame holding the flipped byte (None: the file header).
            let k = offsets.iter().rposition(|&o| o <= i as u64);
            let result = decode_all(&bytes);
            let next = k.map_or(0, |k| k + 1);
            if next < offsets.len() {
                let damaged = k.map_or(0, |k| offsets[k]);
                match result {
                    Err(LogError::CorruptMiddle { offset, next_valid, .. }) => {
                        prop_assert_eq!(offset, damaged);
                        prop_assert_eq!(next_valid, offsets[next]);
                    }
                    other => prop_assert!(false, "flip at {} not refused: {:?}", i, other),
                }
            } else {
                // The last frame, or the header of a log without frames.
                let r = result.expect("a damaged last frame is a torn tail");
                let kept = k.unwrap_or(0);
                prop_assert_eq!(payloads_of(&r), payloads[..kept].to_vec());
                prop_assert_eq!(r.valid_len, k.map_or(0, |k| offsets[k]));
            }
        }

        /// A torn write leaves a prefix of the log: every complete frame in it
        /// is recovered, the rest is a torn tail.
        #[test]
        fn any_prefix_recovers_every_complete_frame(payloads in payloads(8), at in any::<proptest::sample::Index>()) {
            let (bytes, offsets) = log_with_offsets(&payloads);
            let cut = at.index(bytes.len() + 1);
            let r = decode_all(&bytes[..cut]).expect("a prefix is never corrupt");
            let ends: Vec<u64> = offsets.iter().zip(&payloads).map(|(o, p)| o + (FRAME_HEADER_LEN + p.len()) as u64).collect();
            let complete = ends.iter().filter(|&&e| e <= cut as u64).count();
            prop_assert_eq!(payloads_of(&r), payloads[..complete].to_vec());
            let valid_len = match complete {
                0 if cut < FILE_HEADER_LEN => 0,
                0 => FILE_HEADER_LEN as u64,
                c => ends[c - 1],
            };
            prop_assert_eq!((r.valid_len, r.torn_bytes), (valid_len, cut as u64 - valid_len));
        }

        /// Zeros or garbage after a valid log, with or without a partly written
        /// frame before them (what a crash during an append leaves), are cut;
        /// every frame before them is kept.
        #[test]
        fn zero_or_garbage_tails_are_cut_and_every_frame_kept(
            payloads in payloads(6),
            partial in proptest::collection::vec(any::<u8>(), 0..40),
            partial_keep in any::<proptest::sample::Index>(),
            zeros in any::<bool>(),
            garbage in proptest::collection::vec(any::<u8>(), 1..120),
        ) {
            let (mut bytes, _) = log_with_offsets(&payloads);
            let good = bytes.len() as u64;
            let mut next = Vec::new();
            encode_frame(&partial, &mut next);
            bytes.extend_from_slice(&next[..partial_keep.index(next.len())]);
            if zeros {
                bytes.extend(std::iter::repeat_n(0, garbage.len()));
            } else {
                bytes.extend_from_slice(&garbage);
            }
            // Zeros can complete a frame whose missing bytes were zeros: then it is whole.
            let (mut expected, mut valid_len) = (payloads.clone(), good);
            if bytes.len() >= good as usize + next.len() && bytes[good as usize..][..next.len()] == next[..] {
                expected.push(partial.clone());
                valid_len += next.len() as u64;
            }
            let r = decode_all(&bytes).expect("a tail is never corrupt");
            prop_assert_eq!(payloads_of(&r), expected);
            prop_assert_eq!((r.valid_len, r.torn_bytes), (valid_len, bytes.len() as u64 - valid_len));
            prop_assert_eq!(stream(&bytes, &[7, 1, 30]), whole(&bytes));
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
