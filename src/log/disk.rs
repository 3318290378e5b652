//! The disk interface the record log writes to, and an in-memory disk for
//! tests. The simulator's disk (durable vs volatile bytes, torn writes) and the
//! real file implement the same trait.

/// An append-only byte store with an explicit durability point.
pub trait Disk {
    /// Appends bytes; they are volatile until the next `sync`.
    fn append(&mut self, bytes: &[u8]);
    /// Makes everything appended so far durable.
    fn sync(&mut self);
    /// The whole current content (what a recovering process reads).
    fn read_all(&self) -> Vec<u8>;
    /// Cuts the content to `len` bytes (drops a torn tail after recovery).
    fn truncate(&mut self, len: u64);
    /// Atomically replaces the whole content (compaction). Durable once the
    /// next `sync` returns; a crash before that leaves the old content.
    fn replace(&mut self, bytes: &[u8]);
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
    }

    /// Simulates a crash that keeps the first `keep` unsynced appended bytes (a
    /// torn write). Only appends tear; an unsynced `replace` is simply lost.
    pub fn crash_torn(&mut self, keep: usize) {
        let durable_len = self.durable.len();
        if self.agree_len == durable_len && self.current.len() > durable_len {
            let kept = keep.min(self.current.len() - durable_len);
            self.current.truncate(durable_len + kept);
            self.sync();
        } else {
            self.crash();
        }
    }

    /// Bytes written but not yet synced.
    pub fn unsynced(&self) -> bool {
        self.agree_len != self.current.len() || self.agree_len != self.durable.len()
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
        self.current.extend_from_slice(bytes);
    }
    fn sync(&mut self) {
        self.durable.truncate(self.agree_len);
        self.durable.extend_from_slice(&self.current[self.agree_len..]);
        self.agree_len = self.current.len();
        self.syncs += 1;
    }
    fn read_all(&self) -> Vec<u8> {
        self.current.clone()
    }
    fn truncate(&mut self, len: u64) {
        let len = usize::try_from(len).expect("disk length fits in memory");
        self.current.truncate(len);
        self.agree_len = self.agree_len.min(len);
    }
    fn replace(&mut self, bytes: &[u8]) {
        self.current.clear();
        self.current.extend_from_slice(bytes);
        self.agree_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_only_synced_bytes() {
        let mut d = MemDisk::new();
        d.append(b"abc");
        d.sync();
        d.append(b"def");
        d.crash();
        assert_eq!(d.read_all(), b"abc");
    }

    #[test]
    fn torn_crash_keeps_a_prefix_of_unsynced_bytes() {
        let mut d = MemDisk::new();
        d.append(b"abc");
        d.sync();
        d.append(b"defgh");
        d.crash_torn(2);
        assert_eq!(d.read_all(), b"abcde");
    }

    #[test]
    fn replace_is_atomic_at_sync() {
        let mut d = MemDisk::new();
        d.append(b"old");
        d.sync();
        d.replace(b"new");
        d.crash();
        assert_eq!(d.read_all(), b"old");
        d.replace(b"new");
        d.sync();
        d.crash();
        assert_eq!(d.read_all(), b"new");
    }
}
