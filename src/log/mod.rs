//! The record log: one framing used by every driver (simulated disk, real
//! file), so the recovery code the simulator tests is the code that ships.
//!
//! Frame: `[payload length: u32 LE][CRC-32 of payload: u32 LE][payload]`.
//! **Invariant:** recovery tells a torn tail (an incomplete or failing last
//! frame: truncate it and continue) from corruption in the middle (a failing
//! frame followed by more data: refuse, naming the offset). It never skips data.

mod disk;
mod frame;

pub use disk::{Disk, MemDisk};
pub use frame::{
    FRAME_HEADER_LEN, FRAME_PAYLOAD_MAX, FrameStream, LogError, Recovered, StreamSummary, decode_all, encode_frame,
};
