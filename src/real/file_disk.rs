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
    len: u64,
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
        let file = fs.open_append(&path)?;
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
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
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
    /// write); volatile until [`FileDisk::try_sync`].
    pub fn try_append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.len == 0 && !bytes.is_empty() {
            let mut first = log::empty_log();
            first.extend_from_slice(bytes);
            self.file.write_all(&first)?;
            self.len = first.len() as u64;
            return Ok(());
        }
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Another descriptor of the log file, for an `fdatasync` on another
    /// thread (it makes durable whatever was written to the file before it,
    /// through any descriptor). Invalid after [`FileDisk::try_replace`].
    pub fn open_sync_descriptor(&self) -> io::Result<Box<dyn FsFile>> {
        self.fs.open_append(&self.path)
    }

    /// `fdatasync`: the appended data (and the file size) reach the device.
    pub fn try_sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Cuts a torn tail off and makes the cut durable.
    pub fn try_truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()?;
        self.len = len;
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
        self.file = self.fs.open_append(&self.path)?;
        self.len = (log::FILE_HEADER_LEN + bytes.len()) as u64;
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
