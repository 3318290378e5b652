//! The file-system calls the log makes, behind a trait, so a test can run the
//! real log code ([`super::file_disk`], [`super::log_writer`], recovery in
//! [`super::server`]) on a model of the page cache ([`super::page_cache`])
//! and cut power between any two calls.
//!
//! **Invariant:** [`StdFs`] is a one-to-one mapping onto `std::fs` (one trait
//! call, one system call or two); the durability rules the log relies on are
//! those of POSIX files: written bytes survive a crash only after
//! `fdatasync`/`fsync` of the file, a created, removed or renamed name only
//! after `fsync` of its directory.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// An open file.
#[allow(clippy::len_without_is_empty)]
pub trait FsFile: Send + fmt::Debug {
    /// Writes at the current position (a file made by
    /// [`Fs::create_truncate`] is written front to back with it).
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// `pwrite`: writes at `offset` (overwriting, or extending the file),
    /// whatever the current position.
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Reads from the current position (files opened for reading start at 0).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// `fdatasync`: written bytes and the size reach the device.
    fn sync_data(&mut self) -> io::Result<()>;
    /// `fsync`: as `sync_data`, plus the rest of the file's metadata.
    fn sync_all(&mut self) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// The size (a `Result`, unlike a collection's: it is a system call).
    fn len(&self) -> io::Result<u64>;
}

/// Held while a process owns a directory; dropping it releases the lock.
pub trait FsLock: Send + fmt::Debug {}

/// The directory and file operations of the log.
pub trait Fs: Send + Sync + fmt::Debug + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// An exclusive lock on `path` (created if missing); `ErrorKind::ResourceBusy` when held elsewhere.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn FsLock>>;
    fn exists(&self, path: &Path) -> io::Result<bool>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Opens for reading and writing at given offsets (not `O_APPEND`: a
    /// preallocated log is overwritten in place), creating the file if missing.
    fn open_rw(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Opens an existing file for reading from its start.
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Creates (or empties) a file for writing.
    fn create_truncate(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// `fsync` of a directory: its entries (creations, renames) become durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The operating system's file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdFs;

/// The process-wide [`StdFs`].
pub fn std_fs() -> Arc<dyn Fs> {
    Arc::new(StdFs)
}

#[derive(Debug)]
struct StdFile(File);

impl FsFile for StdFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, bytes, offset)
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

#[derive(Debug)]
struct StdLock(#[allow(dead_code)] File);

impl FsLock for StdLock {}

/// Opens `path` for reading and writing, creating it empty if absent (never truncating).
fn open_existing_or_new(path: &Path) -> io::Result<fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

impl Fs for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn FsLock>> {
        let lock = open_existing_or_new(path)?;
        match lock.try_lock() {
            Ok(()) => Ok(Box::new(StdLock(lock))),
            Err(fs::TryLockError::WouldBlock) => Err(io::ErrorKind::ResourceBusy.into()),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn open_rw(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let f = open_existing_or_new(path)?;
        Ok(Box::new(StdFile(f)))
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        Ok(Box::new(StdFile(File::open(path)?)))
    }
    fn create_truncate(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let f = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
        Ok(Box::new(StdFile(f)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
