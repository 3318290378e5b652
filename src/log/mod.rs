//! The record log: one format used by every driver (simulated disk, real
//! file), so the recovery code the simulator tests is the code that ships.
//!
//! Format version 2. A log opens with a 12-byte file header,
//! `["SAGAMQ\0"][version: u8 = 2][CRC-32 of those 8 bytes: u32 LE]`, written
//! by the [`Disk`] when a log is created (first append to an empty log) or
//! rewritten (compaction's `replace`), so the cores that produce frames never
//! see it. Recovery refuses any other version by name (a version 1 log, which
//! had no header, is recognised by its first frame). Then frames:
//! `[payload length: u32 LE][CRC-32 of payload: u32 LE][CRC-32 of the 8 bytes
//! before it: u32 LE][payload]`. The header checksum is why version 2 exists:
//! in version 1 the length was outside any checksum, so one flipped bit in a
//! length in the middle of a log could point past the end and pose as a torn
//! tail. Now a length is trusted only once its header checks, and the header
//! can be judged on its own (12 bytes) before the payload is read, which is
//! what lets recovery scan for a valid frame at every byte after damage. A
//! separate payload CRC keeps the header check cheap; CRC-32 (`crc32fast`,
//! already a dependency, hardware-accelerated) detects every error burst of up
//! to 32 bits, so every flipped bit; an all-zero header never checks (CRC-32
//! of 8 zero bytes is not 0).
//!
//! **Invariant:** recovery never cuts a record that a frame after it proves
//! was followed by more durable data. A torn tail is only what an interrupted
//! unsynced write can leave: an incomplete header at the very end, a checked
//! header whose payload runs past the end, a last frame failing its payload
//! CRC, zeros, or garbage. Precisely: the valid prefix ends at the first
//! damage (the file header or a frame that does not validate); if a frame that
//! validates (header CRC and payload CRC, wholly inside the log) starts at any
//! later byte, that is corruption in the middle and recovery refuses, naming
//! the damage's offset and the valid frame's ([`LogError::CorruptMiddle`]),
//! even when the damaged length points past the end. Otherwise the rest is a
//! torn tail, cut at the damage. It never skips data. The flip side is
//! fail-safe: bytes after a crash that happen to hold a whole valid frame
//! (stale data from an older log, or a record whose content embeds a frame
//! image) make recovery refuse rather than cut.

mod disk;
mod frame;

pub use disk::{Disk, MemDisk, Tail};
pub use frame::{
    FILE_HEADER_LEN, FILE_MAGIC, FORMAT_VERSION, FRAME_HEADER_LEN, FRAME_PAYLOAD_MAX, FrameStream, LogError, Recovered,
    StreamSummary, decode_all, decode_frames, empty_log, encode_file_header, encode_frame, seal_frame,
};
