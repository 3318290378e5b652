//! The disk interface the record log writes to, and an in-memory disk for
//! tests. The simulator's disk (durable vs volatile bytes, torn writes, tails
//! of zeros or garbage, flipped bits) and the real file implement the same
//! trait.

use super::frame::encode_file_header;

/// An append-only log store with an explicit durability point.
///
/// **Invariant:** a non-empty log opens with the file header
/// ([`super::encode_file_header`]): the implementation writes it before the
/// first bytes appended to an empty log and before the content of every
/// `replace`. Callers deal in frames only; lengths and offsets (`truncate`,
/// recovery's `valid_len`) count the header.
pub trait Disk {
    /// Appends bytes (after the file header if the log is empty); they are
    /// volatile until the next `sync`.
    fn append(&mut self, bytes: &[u8]);
    /// Makes everything appended so far durable.
    fn sync(&mut self);
    /// The whole current content (what a recovering process reads).
    fn read_all(&self) -> Vec<u8>;
    /// Cuts the content to `len` bytes (drops a torn tail after recovery).
    fn truncate(&mut self, len: u64);
    /// Atomically replaces the whole content by the file header and `bytes`
    /// (compaction). Durable once the next `sync` returns; a crash before that
    /// leaves the old content.
    fn replace(&mut self, bytes: &[u8]);
}

/// What a crash during an append can leave after the bytes that reached the
/// disk, when the file system made the new length durable before the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail<'a> {
    /// This many zero bytes (unwritten blocks).
    Zeros(usize),
    /// These bytes (stale blocks): the caller draws them from its seed.
    Garbage(&'a [u8]),
}

/// A disk in memory that tracks which content is durable, so tests and the
/// simulator can crash it. Every operation costs O(bytes changed), not O(log):
/// `current` and `durable` agree on their first `agree_len` bytes.
#[derive(Clone, Debug, Default)]
pub struct MemDisk {
    /// Content as the running process sees it.
    current: Vec<u8>,
    /// Content that survives a crash.
    durable: Vec<u8>,
    agree_len: usize,
    /// Ranges whose sync failed: the durable image holds zeros there however
    /// often the running process syncs again (see [`MemDisk::sync_failed`]).
    lost: Vec<std::ops::Range<usize>>,
    pub syncs: u64,
}

impl MemDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a crash: everything not synced is lost.
    pub fn crash(&mut self) {
        self.current.truncate(self.agree_len);
        self.current.extend_from_slice(&self.durable[self.agree_len..]);
        self.agree_len = self.current.len();
        self.lost.clear();
    }

    /// Simulates a sync that failed (EIO) during an append: the blocks the
    /// file grew by reached the disk as zeros, the data never did. The running
    /// process still reads its bytes (the page cache), and a later sync does
    /// not write them again (Linux marks the failed pages clean, "fsyncgate"):
    /// a process that carries on after the failure builds a log with a hole.
    /// An unsynced `replace` is simply not done. Returns whether bytes were lost.
    pub fn sync_failed(&mut self) -> bool {
        if !self.appending() {
            self.crash();
            return false;
        }
        let from = self.durable.len();
        self.durable.resize(self.current.len(), 0);
        self.lost.push(from..self.current.len());
        true
    }

    /// Whether the only unsynced change is an append (which can tear).
    fn appending(&self) -> bool {
        let durable_len = self.durable.len();
        self.agree_len == durable_len && self.current.len() > durable_len
    }

    /// Simulates a crash that keeps the first `keep` unsynced appended bytes (a
    /// torn write). Only appends tear; an unsynced `replace` is simply lost.
    pub fn crash_torn(&mut self, keep: usize) {
        if self.appending() {
            let durable_len = self.durable.len();
            let kept = keep.min(self.current.len() - durable_len);
            self.current.truncate(durable_len + kept);
            self.sync();
        } else {
            self.crash();
        }
    }

    /// Simulates a crash during an unsynced append that left the file longer
    /// than what reached it: the first `keep` unsynced bytes survive (0: none),
    /// then `tail`. Without an unsynced append (nothing appended, or an
    /// unsynced `replace`, whose temporary file is simply lost) it is a plain
    /// [`MemDisk::crash`] and adds nothing. Returns whether a tail was added.
    /// Deterministic: garbage comes from the caller.
    pub fn crash_with_tail(&mut self, keep: usize, tail: Tail<'_>) -> bool {
        if !self.appending() {
            self.crash();
            return false;
        }
        let durable_len = self.durable.len();
        let kept = keep.min(self.current.len() - durable_len);
        self.current.truncate(durable_len + kept);
        match tail {
            Tail::Zeros(n) => self.current.resize(self.current.len() + n, 0),
            Tail::Garbage(bytes) => self.current.extend_from_slice(bytes),
        }
        // What the crash left is what a restart reads: durable, not a sync.
        self.durable.truncate(self.agree_len);
        self.durable.extend_from_slice(&self.current[self.agree_len..]);
        self.agree_len = self.current.len();
        true
    }

    /// Flips bit `bit` (0: least significant) of byte `offset` of the durable
    /// image, as a medium error would: a probe that recovery must refuse, or
    /// cut only a last frame. The running process sees it too where it reads
    /// durable bytes. Panics if `offset` is outside the durable image.
    pub fn flip_bit(&mut self, offset: usize, bit: u8) {
        assert!(bit < 8, "bit {bit} of a byte");
        assert!(
            offset < self.durable.len(),
            "offset {offset} outside the durable image of {} bytes",
            self.durable.len()
        );
        self.durable[offset] ^= 1 << bit;
        if offset < self.agree_len {
            self.current[offset] ^= 1 << bit;
        }
    }

    /// The durable image (what a crash now would leave), for tests.
    /// An `fdatasync` that promises only the first `len` bytes (what was
    /// written when it was called): later writes stay unsynced. After a
    /// `replace` or a truncation below what is durable, a whole sync.
    pub fn sync_to(&mut self, len: usize) {
        if len < self.agree_len || len > self.current.len() {
            return self.sync();
        }
        self.sync_prefix(len);
    }

    /// Makes the first `len` bytes durable (`agree_len <= len <= current.len()`),
    /// bytes of a failed sync staying zeros.
    fn sync_prefix(&mut self, len: usize) {
        self.durable.truncate(self.agree_len);
        self.durable.extend_from_slice(&self.current[self.agree_len..len]);
        self.agree_len = len;
        for r in &self.lost {
            let end = r.end.min(self.durable.len());
            if r.start < end {
                self.durable[r.start..end].fill(0);
                self.agree_len = self.agree_len.min(r.start);
            }
        }
        self.syncs += 1;
    }

    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    /// Bytes written but not yet synced.
    pub fn unsynced(&self) -> bool {
        self.agree_len != self.current.len() || self.agree_len != self.durable.len()
    }

    /// Length of the content a crash would leave.
    pub fn durable_len(&self) -> usize {
        self.durable.len()
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

impl Disk for MemDisk {
    fn append(&mut self, bytes: &[u8]) {
        if self.current.is_empty() && !bytes.is_empty() {
            encode_file_header(&mut self.current);
        }
        self.current.extend_from_slice(bytes);
    }
    fn sync(&mut self) {
        self.sync_prefix(self.current.len());
    }
    fn read_all(&self) -> Vec<u8> {
        self.current.clone()
    }
    fn truncate(&mut self, len: u64) {
        let len = usize::try_from(len).expect("disk length fits in memory");
        self.current.truncate(len);
        self.agree_len = self.agree_len.min(len);
        self.lost.retain(|r| r.start < len);
    }
    fn replace(&mut self, bytes: &[u8]) {
        self.current.clear();
        encode_file_header(&mut self.current);
        self.current.extend_from_slice(bytes);
        self.agree_len = 0;
        self.lost.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{FILE_HEADER_LEN, LogError, decode_all, empty_log, encode_frame};

    /// The file header then `rest`: what a disk holds after appending `rest`.
    fn log(rest: &[u8]) -> Vec<u8> {
        let mut out = empty_log();
        out.extend_from_slice(rest);
        out
    }

    #[test]
    fn the_first_append_and_every_replace_write_the_file_header() {
        let mut d = MemDisk::new();
        d.append(b"");
        assert!(d.is_empty(), "nothing appended, no header");
        d.append(b"abc");
        d.append(b"def");
        assert_eq!(d.read_all(), log(b"abcdef"));
        d.replace(b"xy");
        assert_eq!(d.read_all(), log(b"xy"));
        d.truncate(0);
        d.append(b"z");
        assert_eq!(d.read_all(), log(b"z"));
        assert_eq!(FILE_HEADER_LEN, empty_log().len());
    }

    #[test]
    fn crash_keeps_only_synced_bytes() {
        let mut d = MemDisk::new();
        d.append(b"abc");
        d.sync();
        d.append(b"def");
        d.crash();
        assert_eq!(d.read_all(), log(b"abc"));
    }

    #[test]
    fn torn_crash_keeps_a_prefix_of_unsynced_bytes() {
        let mut d = MemDisk::new();
        d.append(b"abc");
        d.sync();
        d.append(b"defgh");
        d.crash_torn(2);
        assert_eq!(d.read_all(), log(b"abcde"));
    }

    #[test]
    fn replace_is_atomic_at_sync() {
        let mut d = MemDisk::new();
        d.append(b"old");
        d.sync();
        d.replace(b"new");
        d.crash();
        assert_eq!(d.read_all(), log(b"old"));
        d.replace(b"new");
        d.sync();
        d.crash();
        assert_eq!(d.read_all(), log(b"new"));
    }

    #[test]
    fn a_failed_sync_leaves_zeros_that_later_syncs_do_not_fill() {
        let mut d = MemDisk::new();
        d.append(b"aaaa");
        d.sync();
        d.append(b"bbbb");
        assert!(d.sync_failed());
        // The process still reads its bytes; the disk has zeros there.
        assert_eq!(d.read_all(), log(b"aaaabbbb"));
        assert_eq!(d.durable(), &log(b"aaaa\0\0\0\0")[..]);
        // Carrying on: the next sync makes later bytes durable, not the lost ones.
        d.append(b"cccc");
        d.sync();
        assert_eq!(d.durable(), &log(b"aaaa\0\0\0\0cccc")[..]);
        d.crash();
        assert_eq!(d.read_all(), log(b"aaaa\0\0\0\0cccc"));
        // A fail-stop right after the failure leaves a tail of zeros only.
        let mut d = MemDisk::new();
        d.append(b"aaaa");
        d.sync();
        d.append(b"bbbb");
        d.sync_failed();
        d.crash();
        assert_eq!(d.read_all(), log(b"aaaa\0\0\0\0"));
    }

    #[test]
    fn a_crash_with_a_tail_keeps_a_prefix_then_zeros_or_garbage() {
        let mut d = MemDisk::new();
        d.append(b"abc");
        d.sync();
        d.append(b"defgh");
        assert!(d.crash_with_tail(2, Tail::Zeros(3)));
        assert_eq!(d.read_all(), log(b"abcde\0\0\0"));
        d.crash();
        assert_eq!(d.read_all(), log(b"abcde\0\0\0"), "the tail is what the disk holds");
        d.append(b"ij");
        assert!(d.crash_with_tail(0, Tail::Garbage(b"??")));
        assert_eq!(d.read_all(), log(b"abcde\0\0\0??"));
        // Nothing unsynced (or an unsynced replace): a plain crash, no tail.
        assert!(!d.crash_with_tail(5, Tail::Zeros(4)));
        d.replace(b"new");
        assert!(!d.crash_with_tail(5, Tail::Zeros(4)));
        assert_eq!(d.read_all(), log(b"abcde\0\0\0??"));
    }

    #[test]
    fn a_crash_while_creating_the_log_can_leave_garbage_where_the_header_goes() {
        let mut d = MemDisk::new();
        d.append(b"first frames");
        assert!(d.crash_with_tail(3, Tail::Garbage(&[7; 20])));
        let image = d.read_all();
        let r = decode_all(&image).expect("nothing was synced: a torn tail");
        assert_eq!((r.records.len(), r.valid_len), (0, 0));
    }

    #[test]
    fn tails_after_synced_frames_are_cut_by_recovery() {
        for tail in [Tail::Zeros(40), Tail::Garbage(&[0xA5; 40])] {
            let mut d = MemDisk::new();
            let mut frames = Vec::new();
            encode_frame(b"acked", &mut frames);
            d.append(&frames);
            d.sync();
            let synced = d.len() as u64;
            d.append(&frames);
            assert!(d.crash_with_tail(7, tail));
            let image = d.read_all();
            let r = decode_all(&image).unwrap();
            assert_eq!((r.records.len(), r.valid_len), (1, synced), "{tail:?}");
        }
    }

    #[test]
    fn a_flipped_bit_in_a_synced_frame_before_the_last_is_refused() {
        let mut d = MemDisk::new();
        let mut frames = Vec::new();
        for p in [&b"one"[..], b"two", b"three"] {
            encode_frame(p, &mut frames);
        }
        d.append(&frames);
        d.sync();
        let second = FILE_HEADER_LEN + 12 + 3;
        d.flip_bit(second + 1, 4);
        assert_eq!(d.read_all()[second + 1], frames[second + 1 - FILE_HEADER_LEN] ^ 0x10);
        d.crash();
        let err = decode_all(&d.read_all()).unwrap_err();
        assert!(
            matches!(err, LogError::CorruptMiddle { offset, .. } if offset == second as u64),
            "{err}"
        );
    }
}
