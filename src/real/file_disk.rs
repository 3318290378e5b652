//! The record log on a real file: append + `fdatasync`, and compaction by an
//! atomic replace (temp file, `fdatasync`, rename, directory fsync).
//!
//! **Invariant:** after `sync` returns, every byte appended before it survives
//! a crash; after `replace` returns, the file holds either the old or the new
//! content as a whole, never a mix (the rename is the commit point). One
//! process at a time owns a data directory: an exclusive lock on its lock file,
//! which the OS releases when the process dies (so `kill -9` leaves none behind).
//! As every [`Disk`], it writes the log's file header itself: on the first
//! append to an empty log (in the same `write`) and ahead of every `replace`.
//!
//! **Preallocation** (opt-in, [`FileDisk::preallocate`]; the broker's log
//! uses it): the file is grown ahead of the log in slices of written zeros,
//! and appends overwrite those zeros in place, so most `fdatasync`s need not
//! commit a new file size (on ext4 an overwrite inside the file's size skips
//! the journal commit an append needs). Real zeros, not `fallocate`: an
//! unwritten extent still needs a metadata change at its first write. The
//! log's length ([`FileDisk::len`]) is then less than the file's; recovery
//! reads the zeros after the last frame as a tail that holds no record, and
//! [`FileDisk::adopt_zero_tail`] keeps them as preallocated space.

use super::fs::{Fs, FsFile, FsLock, std_fs};
use crate::log::{self, Disk};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of the log inside the data directory.
pub const LOG_FILE_NAME: &str = "sagamq.log";
/// Compaction writes here first, then renames over [`LOG_FILE_NAME`].
pub const LOG_TEMP_FILE_NAME: &str = "sagamq.log.tmp";
/// Held locked (`flock`) while a process owns the directory. A file of its own:
/// the log's inode changes at every compaction.
pub const LOCK_FILE_NAME: &str = "sagamq.lock";

/// An append-only log file with explicit durability points.
#[derive(Debug)]
pub struct FileDisk {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    path: PathBuf,
    file: Box<dyn FsFile>,
    /// The log's length: where the next append goes.
    len: u64,
    /// The file's length (at least `len`; beyond `len`, preallocated zeros).
    alloc: u64,
    /// Grow the file by slices of this many bytes of zeros (0: plain appends).
    prealloc: u64,
    /// Locked for as long as this value lives.
    _lock: Box<dyn FsLock>,
}

/// Takes the data directory's lock, or says who holds it.
fn lock_dir(fs: &dyn Fs, dir: &Path) -> io::Result<Box<dyn FsLock>> {
    let path = dir.join(LOCK_FILE_NAME);
    fs.lock(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::ResourceBusy {
            io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "the data directory {} is in use by another process (it holds a lock on {})",
                    dir.display(),
                    path.display()
                ),
            )
        } else {
            e
        }
    })
}

impl FileDisk {
    /// Opens (or creates) the log in `dir`, creating `dir` if needed. A temp
    /// file left by a compaction that crashed before its rename is removed: the
    /// old log is still the committed one.
    pub fn open(dir: &Path) -> io::Result<FileDisk> {
        FileDisk::open_in(std_fs(), dir)
    }

    /// [`FileDisk::open`] on another file system (the page-cache model in tests).
    pub fn open_in(fs: Arc<dyn Fs>, dir: &Path) -> io::Result<FileDisk> {
        fs.create_dir_all(dir)?;
        // First, before touching anything: another process's compaction may
        // be writing the temp file this would remove.
        let lock = lock_dir(&*fs, dir)?;
        let tmp = dir.join(LOG_TEMP_FILE_NAME);
        if fs.exists(&tmp)? {
            fs.remove_file(&tmp)?;
        }
        let path = dir.join(LOG_FILE_NAME);
        let created = !fs.exists(&path)?;
        let file = fs.open_rw(&path)?;
        if created {
            // Make the new file's directory entry durable, or a crash could
            // lose the whole (acknowledged) log with it.
            fs.sync_dir(dir)?;
        }
        let len = file.len()?;
        Ok(FileDisk {
            fs,
            dir: dir.to_path_buf(),
            path,
            file,
            len,
            alloc: len,
            prealloc: 0,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log's length (on opening: the file's, which recovery reads whole).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// From now on, grow the file ahead of the log by `slice` bytes of zeros
    /// at a time (0: append without preallocating).
    pub fn preallocate(&mut self, slice: u64) {
        self.prealloc = slice;
    }

    /// When everything from `valid_len` to the end of the file reads as
    /// zeros (preallocated space, or a size that reached the disk before its
    /// data: no record either way), keeps it as preallocated space and makes
    /// `valid_len` the log's length, without touching the file. Returns
    /// whether it did; otherwise nothing changed.
    pub fn adopt_zero_tail(&mut self, valid_len: u64) -> io::Result<bool> {
        if valid_len > self.alloc {
            return Ok(false);
        }
        let mut f = self.open_reader()?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let end = at + n as u64;
            if end > valid_len {
                let from = valid_len.saturating_sub(at) as usize;
                if buf[from..n].iter().any(|b| *b != 0) {
                    return Ok(false);
                }
            }
            at = end;
        }
        if at != self.alloc {
            return Ok(false);
        }
        self.len = valid_len;
        Ok(true)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A reader of the log from its start (recovery streams it).
    pub fn open_reader(&self) -> io::Result<Box<dyn FsFile>> {
        self.fs.open_read(&self.path)
    }

    /// The whole content, as recovery reads it.
    pub fn try_read_all(&self) -> io::Result<Vec<u8>> {
        let mut f = self.open_reader()?;
        let mut out = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends (after the file header if the log is empty, in the same
    /// write); volatile until [`FileDisk::try_sync`]. With preallocation, an
    /// append that passes the end of the file grows it by a slice of zeros
    /// past the new bytes (written after them, so the file has no hole),
    /// and the next sync commits the new size once for the slice.
    pub fn try_append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let first;
        let bytes = if self.len == 0 {
            let mut b = log::empty_log();
            b.extend_from_slice(bytes);
            first = b;
            &first[..]
        } else {
            bytes
        };
        let end = self.len + bytes.len() as u64;
        self.file.write_all_at(self.len, bytes)?;
        self.len = end;
        if end > self.alloc {
            self.alloc = end;
            if self.prealloc > 0 {
                let zeros = vec![0u8; self.prealloc as usize];
                self.file.write_all_at(end, &zeros)?;
                self.alloc = end + self.prealloc;
            }
        }
        Ok(())
    }

    /// Another descriptor of the log file, for an `fdatasync` on another
    /// thread (it makes durable whatever was written to the file before it,
    /// through any descriptor). Invalid after [`FileDisk::try_replace`].
    pub fn open_sync_descriptor(&self) -> io::Result<Box<dyn FsFile>> {
        self.fs.open_rw(&self.path)
    }

    /// `fdatasync`: the written data (and the file size) reach the device.
    pub fn try_sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Cuts a torn tail off and makes the cut durable.
    pub fn try_truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()?;
        self.len = len;
        self.alloc = len;
        Ok(())
    }

    /// Atomically replaces the whole content by the file header and `bytes`,
    /// and makes it durable before returning.
    pub fn try_replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(LOG_TEMP_FILE_NAME);
        {
            let mut t = self.fs.create_truncate(&tmp)?;
            t.write_all(&log::empty_log())?;
            t.write_all(bytes)?;
            // Before the rename: a rename that reaches the disk ahead of the
            // data would commit an empty or partial log.
            t.sync_data()?;
        }
        self.fs.rename(&tmp, &self.path)?;
        // The rename is durable only once the directory is.
        self.fs.sync_dir(&self.dir)?;
        self.file = self.fs.open_rw(&self.path)?;
        self.len = (log::FILE_HEADER_LEN + bytes.len()) as u64;
        // The new file is appended to normally until the next append grows
        // it by a slice.
        self.alloc = self.len;
        Ok(())
    }
}

impl FileDisk {
    /// For a compaction alongside appends: a function, to run on another
    /// thread, that creates the temp file, writes the file header and
    /// `state`, syncs it and returns it open (its name is not durable yet).
    /// [`FileDisk::switch_to_compacted`] then makes it the log.
    pub fn compaction_writer(&self) -> impl FnOnce(&[u8]) -> io::Result<Box<dyn FsFile>> + Send + 'static {
        let fs = self.fs.clone();
        let tmp = self.dir.join(LOG_TEMP_FILE_NAME);
        move |state| {
            let mut t = fs.create_truncate(&tmp)?;
            t.write_all(&log::empty_log())?;
            t.write_all(state)?;
            t.sync_data()?;
            Ok(t)
        }
    }

    /// Appends `since` (what was appended to the old file after the
    /// compaction's state was taken) to the synced temp file `new`, syncs
    /// it, and makes it the log as [`FileDisk::try_replace`] does: rename,
    /// then the directory's fsync. Either name holds every record synced so
    /// far at any instant: the old file until the rename is durable, the new
    /// one (synced before the rename) after.
    pub fn switch_to_compacted(&mut self, mut new: Box<dyn FsFile>, state_len: u64, since: &[u8]) -> io::Result<()> {
        if !since.is_empty() {
            new.write_all(since)?;
            new.sync_data()?;
        }
        drop(new);
        let tmp = self.dir.join(LOG_TEMP_FILE_NAME);
        self.fs.rename(&tmp, &self.path)?;
        self.fs.sync_dir(&self.dir)?;
        self.file = self.fs.open_rw(&self.path)?;
        self.len = log::FILE_HEADER_LEN as u64 + state_len + since.len() as u64;
        self.alloc = self.len;
        Ok(())
    }
}

/// The infallible [`Disk`] interface for code shared with the simulator. An IO
/// error on the log cannot be retried safely (after a failed `fsync` the page
/// cache state is unknown), so it ends the process's use of the log: panic.
/// The server's writer uses the `try_*` methods and shuts down cleanly instead.
impl Disk for FileDisk {
    fn append(&mut self, bytes: &[u8]) {
        self.try_append(bytes)
            .unwrap_or_else(|e| panic!("append to {}: {e}", self.path.display()));
    }
    fn sync(&mut self) {
        self.try_sync()
            .unwrap_or_else(|e| panic!("fdatasync {}: {e}", self.path.display()));
    }
    fn read_all(&self) -> Vec<u8> {
        self.try_read_all()
            .unwrap_or_else(|e| panic!("read {}: {e}", self.path.display()))
    }
    fn truncate(&mut self, len: u64) {
        self.try_truncate(len)
            .unwrap_or_else(|e| panic!("truncate {}: {e}", self.path.display()));
    }
    fn replace(&mut self, bytes: &[u8]) {
        self.try_replace(bytes)
            .unwrap_or_else(|e| panic!("replace {}: {e}", self.path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// What the file holds after appending `rest` to an empty log.
    fn with_header(rest: &[u8]) -> Vec<u8> {
        let mut out = log::empty_log();
        out.extend_from_slice(rest);
        out
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sagamq-filedisk-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn append_sync_reopen_reads_back() {
        let d = temp_dir("append");
        let mut disk = FileDisk::open(&d).unwrap();
        disk.append(b"abc");
        disk.append(b"def");
        disk.sync();
        drop(disk);
        let disk = FileDisk::open(&d).unwrap();
        assert_eq!(disk.read_all(), with_header(b"abcdef"));
        assert_eq!(disk.len(), 18);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn replace_then_append_and_truncate() {
        let d = temp_dir("replace");
        let mut disk = FileDisk::open(&d).unwrap();
        disk.append(b"old-old-old");
        disk.sync();
        disk.replace(b"new");
        disk.append(b"+tail");
        disk.sync();
        assert_eq!(disk.read_all(), with_header(b"new+tail"));
        disk.truncate(15);
        assert_eq!(disk.read_all(), with_header(b"new"));
        disk.truncate(0);
        disk.append(b"again");
        assert_eq!(disk.read_all(), with_header(b"again"));
        assert!(!d.join(LOG_TEMP_FILE_NAME).exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_second_owner_of_the_directory_is_refused_until_the_first_is_gone() {
        let d = temp_dir("lock");
        let first = FileDisk::open(&d).unwrap();
        let err = FileDisk::open(&d).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        assert!(err.to_string().contains("in use by another process"), "{err}");
        drop(first);
        FileDisk::open(&d).expect("the lock goes with its owner");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn stale_temp_file_from_a_crashed_compaction_is_discarded() {
        let d = temp_dir("stale");
        let mut disk = FileDisk::open(&d).unwrap();
        disk.append(b"committed");
        disk.sync();
        drop(disk);
        fs::write(d.join(LOG_TEMP_FILE_NAME), b"half-written compaction").unwrap();
        let disk = FileDisk::open(&d).unwrap();
        assert_eq!(disk.read_all(), with_header(b"committed"));
        assert!(!d.join(LOG_TEMP_FILE_NAME).exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
