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

/// A disk in memory that tracks which prefix is durable, so tests can crash it.
#[derive(Clone, Debug, Default)]
pub struct MemDisk {
    /// Content as the running process sees it.
    current: Vec<u8>,
    /// Content that survives a crash.
    durable: Vec<u8>,
    pub syncs: u64,
}

impl MemDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a crash: everything not synced is lost.
    pub fn crash(&mut self) {
        self.current = self.durable.clone();
    }

    /// Simulates a crash that keeps the first `keep` unsynced bytes (a torn write).
    pub fn crash_torn(&mut self, keep: usize) {
        let durable_len = self.durable.len();
        if self.current.len() > durable_len && self.current.starts_with(&self.durable) {
            let kept = keep.min(self.current.len() - durable_len);
            self.current.truncate(durable_len + kept);
            self.durable = self.current.clone();
        } else {
            self.crash();
        }
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
        self.durable = self.current.clone();
        self.syncs += 1;
    }
    fn read_all(&self) -> Vec<u8> {
        self.current.clone()
    }
    fn truncate(&mut self, len: u64) {
        self.current.truncate(len as usize);
    }
    fn replace(&mut self, bytes: &[u8]) {
        self.current = bytes.to_vec();
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
