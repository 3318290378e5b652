//! A model of a file system with a page cache, for power-loss tests of the
//! real log code: an [`Fs`] whose writes are volatile until synced.
//!
//! **Invariant (the model's rules):** a file's bytes survive a power cut only
//! up to its last `fdatasync`/`fsync` (written bytes beyond it may survive as
//! a prefix: a torn write, whose end may read as zeros when the new size
//! reached the disk before the data); a created, removed or renamed name survives only
//! after `fsync` of its directory (before that, a cut keeps any prefix of the
//! directory operations since the last one, as a journal would); nothing else
//! survives. Reads see the page cache (what was written), as on Linux.
//!
//! [`PageCacheFs::crash_image`] is what a power cut at that instant leaves.
//! With recording on, an image is taken before every call that changes state
//! and at every [`PageCacheFs::note`], so a run yields one image per boundary
//! between file-system calls, in order, each tagged with how many notes
//! (acknowledgements the test saw) preceded it.

use super::fs::{Fs, FsFile, FsLock};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What a power cut leaves: the durable content of every named file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrashImage {
    /// Where the cut happened (the call it precedes, or the note).
    pub label: String,
    /// Boundaries (file-system calls and notes) before this one.
    pub step: u64,
    /// Notes taken before the cut: acknowledgements in hand at that instant.
    pub notes: u64,
    /// Some unsynced bytes or directory operations survived (a torn write).
    pub torn: bool,
    pub files: BTreeMap<PathBuf, Vec<u8>>,
}

#[derive(Debug, Default)]
struct Inode {
    /// The page cache: what reads see.
    data: Vec<u8>,
    /// What survives a cut.
    durable: Vec<u8>,
    /// Syncs started, and the latest start whose content is `durable`:
    /// concurrent syncs of one file may return in any order, and one that
    /// started earlier never takes back what a later one made durable.
    syncs_started: u64,
    durable_as_of: u64,
}

#[derive(Clone, Debug)]
enum DirOp {
    Link(PathBuf, usize),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf),
}

fn apply_dir_op(names: &mut BTreeMap<PathBuf, usize>, op: &DirOp) {
    match op {
        DirOp::Link(p, i) => {
            names.insert(p.clone(), *i);
        }
        DirOp::Unlink(p) => {
            names.remove(p);
        }
        DirOp::Rename(from, to) => {
            if let Some(i) = names.remove(from) {
                names.insert(to.clone(), i);
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    inodes: Vec<Inode>,
    dirs: BTreeSet<PathBuf>,
    names: BTreeMap<PathBuf, usize>,
    durable_names: BTreeMap<PathBuf, usize>,
    /// Directory operations since the last directory fsync, oldest first.
    dir_ops: Vec<DirOp>,
    locks: BTreeSet<PathBuf>,
    step: u64,
    notes: u64,
    recording: bool,
    images: Vec<CrashImage>,
    rng: u64,
    syncs: u64,
}

impl State {
    fn next_random(&mut self) -> u64 {
        // splitmix64: enough to pick tear lengths.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_random() % n }
    }

    /// The image of a cut now; `torn` keeps a random prefix of the directory
    /// operations and of each file's unsynced appended bytes.
    fn image(&mut self, label: &str, torn: bool) -> CrashImage {
        let mut names = self.durable_names.clone();
        let mut any_torn = false;
        if torn {
            let keep = self.below(self.dir_ops.len() as u64 + 1) as usize;
            any_torn |= keep > 0;
            for op in &self.dir_ops[..keep] {
                apply_dir_op(&mut names, op);
            }
        }
        let mut files = BTreeMap::new();
        for (path, &ino) in &names {
            // The unsynced changes start at the first byte where the page
            // cache and the durable content differ: appended bytes, or bytes
            // overwritten in place (a preallocated log).
            let (durable_len, data_len, first_change) = {
                let i = &self.inodes[ino];
                let common = i.durable.iter().zip(&i.data).take_while(|(d, c)| d == c).count();
                (i.durable.len(), i.data.len(), common)
            };
            let mut bytes = self.inodes[ino].durable.clone();
            if torn && data_len >= durable_len && data_len > first_change {
                let extra = self.below((data_len - first_change) as u64 + 1) as usize;
                any_torn |= extra > 0;
                // A prefix of the unsynced changes survives, written in order;
                // in a third of the cuts only part of it has its data, the rest
                // reads as before: the old bytes, or zeros where the file grew
                // (the new size reached the disk before the data did).
                let with_data = if self.below(3) == 0 {
                    self.below(extra as u64 + 1) as usize
                } else {
                    extra
                };
                if bytes.len() < first_change + extra {
                    bytes.resize(first_change + extra, 0);
                }
                bytes[first_change..first_change + with_data]
                    .copy_from_slice(&self.inodes[ino].data[first_change..first_change + with_data]);
            }
            files.insert(path.clone(), bytes);
        }
        CrashImage {
            label: label.to_string(),
            step: self.step,
            notes: self.notes,
            torn: any_torn,
            files,
        }
    }

    /// A boundary: record the clean image and, if it differs, a torn one.
    fn boundary(&mut self, label: &str) {
        if self.recording {
            let clean = self.image(label, false);
            let torn = self.image(label, true);
            let differs = torn.files != clean.files;
            self.images.push(clean);
            if differs {
                self.images.push(torn);
            }
        }
        self.step += 1;
    }

    fn inode_of(&self, path: &Path) -> io::Result<usize> {
        self.names
            .get(path)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display())))
    }

    fn create(&mut self, path: &Path) -> io::Result<usize> {
        let parent = path.parent().unwrap_or(Path::new(""));
        if !self.dirs.contains(parent) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such directory", parent.display()),
            ));
        }
        self.inodes.push(Inode::default());
        let ino = self.inodes.len() - 1;
        self.names.insert(path.to_path_buf(), ino);
        self.dir_ops.push(DirOp::Link(path.to_path_buf(), ino));
        Ok(ino)
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// How long each sync takes, as on a real device; state stays readable
    /// (and images can be taken) meanwhile.
    sync_latency: Mutex<Duration>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn latency(&self) -> Duration {
        *self.sync_latency.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The page-cache file system. Cheap to clone (shared state).
#[derive(Clone, Debug)]
pub struct PageCacheFs {
    inner: Arc<Inner>,
}

impl Default for PageCacheFs {
    fn default() -> Self {
        PageCacheFs::new(1)
    }
}

impl PageCacheFs {
    /// An empty file system; `seed` picks the tear lengths.
    pub fn new(seed: u64) -> PageCacheFs {
        let state = State {
            rng: seed,
            ..State::default()
        };
        PageCacheFs {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                sync_latency: Mutex::new(Duration::ZERO),
            }),
        }
    }

    /// The machine after a power cut that left `image` (all of it durable).
    pub fn from_image(image: &CrashImage, seed: u64) -> PageCacheFs {
        let fs = PageCacheFs::new(seed);
        {
            let mut st = fs.inner.lock();
            for (path, bytes) in &image.files {
                let mut p = path.parent();
                while let Some(d) = p {
                    st.dirs.insert(d.to_path_buf());
                    p = d.parent();
                }
                st.inodes.push(Inode {
                    data: bytes.clone(),
                    durable: bytes.clone(),
                    ..Inode::default()
                });
                let ino = st.inodes.len() - 1;
                st.names.insert(path.clone(), ino);
            }
            st.durable_names = st.names.clone();
        }
        fs
    }

    pub fn set_sync_latency(&self, d: Duration) {
        *self.inner.sync_latency.lock().unwrap_or_else(|e| e.into_inner()) = d;
    }

    /// Starts (or stops) taking an image at every boundary.
    pub fn record(&self, on: bool) {
        self.inner.lock().recording = on;
    }

    /// Marks an event of the test (an acknowledgement received) and takes an
    /// image right after it. Returns the note's index: images with
    /// `notes > index` were taken after it.
    pub fn note(&self) -> u64 {
        let mut st = self.inner.lock();
        let n = st.notes;
        st.notes += 1;
        st.boundary("note");
        n
    }

    /// What a power cut now would leave (clean or torn).
    pub fn crash_image(&self, label: &str, torn: bool) -> CrashImage {
        self.inner.lock().image(label, torn)
    }

    pub fn take_images(&self) -> Vec<CrashImage> {
        std::mem::take(&mut self.inner.lock().images)
    }

    /// File and directory syncs so far.
    pub fn syncs(&self) -> u64 {
        self.inner.lock().syncs
    }

    /// The current (page cache) content of a file.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let st = self.inner.lock();
        st.names.get(path).map(|&i| st.inodes[i].data.clone())
    }

    fn file(&self, ino: usize) -> Box<dyn FsFile> {
        Box::new(PageCacheFile {
            fs: self.clone(),
            ino,
            pos: 0,
        })
    }

    /// A sync: what was written before the call is durable when it returns.
    fn sync_file(&self, ino: usize, label: &str) {
        let (target, started) = {
            let mut st = self.inner.lock();
            st.boundary(label);
            let inode = &mut st.inodes[ino];
            inode.syncs_started += 1;
            (inode.data.clone(), inode.syncs_started)
        };
        std::thread::sleep(self.inner.latency());
        let mut st = self.inner.lock();
        let inode = &mut st.inodes[ino];
        if started > inode.durable_as_of {
            inode.durable = target;
            inode.durable_as_of = started;
        }
        st.syncs += 1;
    }
}

#[derive(Debug)]
struct PageCacheFile {
    fs: PageCacheFs,
    ino: usize,
    /// Read position.
    pos: usize,
}

impl FsFile for PageCacheFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.fs.inner.lock();
        st.boundary("write");
        st.inodes[self.ino].data.extend_from_slice(bytes);
        Ok(())
    }
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.fs.inner.lock();
        st.boundary("pwrite");
        let at = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let data = &mut st.inodes[self.ino].data;
        if data.len() < at + bytes.len() {
            // A write past the end leaves a hole, which reads as zeros.
            data.resize(at + bytes.len(), 0);
        }
        data[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let st = self.fs.inner.lock();
        let data = &st.inodes[self.ino].data;
        let n = buf.len().min(data.len().saturating_sub(self.pos));
        buf[..n].copy_from_slice(&data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.fs.sync_file(self.ino, "fdatasync");
        Ok(())
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.fs.sync_file(self.ino, "fsync");
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut st = self.fs.inner.lock();
        st.boundary("set_len");
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        st.inodes[self.ino].data.resize(len, 0);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.fs.inner.lock().inodes[self.ino].data.len() as u64)
    }
}

#[derive(Debug)]
struct PageCacheLock {
    fs: PageCacheFs,
    path: PathBuf,
}

impl FsLock for PageCacheLock {}

impl Drop for PageCacheLock {
    fn drop(&mut self) {
        self.fs.inner.lock().locks.remove(&self.path);
    }
}

impl Fs for PageCacheFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        // Directories are created once, before any log exists; the model
        // treats them as durable at once.
        let mut st = self.inner.lock();
        let mut p = Some(dir);
        while let Some(d) = p {
            st.dirs.insert(d.to_path_buf());
            p = d.parent();
        }
        Ok(())
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn FsLock>> {
        let mut st = self.inner.lock();
        if !st.names.contains_key(path) {
            st.boundary("create lock file");
            st.create(path)?;
        }
        if !st.locks.insert(path.to_path_buf()) {
            return Err(io::ErrorKind::ResourceBusy.into());
        }
        Ok(Box::new(PageCacheLock {
            fs: self.clone(),
            path: path.to_path_buf(),
        }))
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        let st = self.inner.lock();
        Ok(st.names.contains_key(path) || st.dirs.contains(path))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.inner.lock();
        st.inode_of(path)?;
        st.boundary("unlink");
        st.names.remove(path);
        st.dir_ops.push(DirOp::Unlink(path.to_path_buf()));
        Ok(())
    }
    fn open_rw(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let ino = {
            let mut st = self.inner.lock();
            match st.names.get(path) {
                Some(&i) => i,
                None => {
                    st.boundary("create");
                    st.create(path)?
                }
            }
        };
        Ok(self.file(ino))
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let ino = self.inner.lock().inode_of(path)?;
        Ok(self.file(ino))
    }
    fn create_truncate(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let ino = {
            let mut st = self.inner.lock();
            match st.names.get(path).copied() {
                Some(i) => {
                    st.boundary("truncate");
                    st.inodes[i].data.clear();
                    i
                }
                None => {
                    st.boundary("create");
                    st.create(path)?
                }
            }
        };
        Ok(self.file(ino))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.inner.lock();
        let ino = st.inode_of(from)?;
        st.boundary("rename");
        st.names.remove(from);
        st.names.insert(to.to_path_buf(), ino);
        st.dir_ops.push(DirOp::Rename(from.to_path_buf(), to.to_path_buf()));
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let (names, ops) = {
            let mut st = self.inner.lock();
            if !st.dirs.contains(dir) {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: no such directory", dir.display()),
                ));
            }
            st.boundary("fsync dir");
            (st.names.clone(), st.dir_ops.len())
        };
        std::thread::sleep(self.inner.latency());
        let mut st = self.inner.lock();
        // One directory holds every file of the log: its fsync makes every
        // name operation so far durable.
        st.durable_names = names;
        st.dir_ops.drain(..ops);
        st.syncs += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        PathBuf::from("/pc/data")
    }

    #[test]
    fn written_bytes_survive_only_after_a_sync_and_names_only_after_a_directory_sync() {
        let fs = PageCacheFs::new(3);
        fs.create_dir_all(&dir()).unwrap();
        let log = dir().join("log");
        let mut f = fs.open_rw(&log).unwrap();
        f.write_all(b"abc").unwrap();
        f.sync_data().unwrap();
        // The file's name was never made durable: a cut loses the file.
        assert!(fs.crash_image("t", false).files.is_empty());
        fs.sync_dir(&dir()).unwrap();
        f.write_all(b"def").unwrap();
        assert_eq!(fs.read_file(&log).unwrap(), b"abcdef", "reads see the page cache");
        assert_eq!(fs.crash_image("t", false).files[&log], b"abc");
        // A torn image keeps a prefix of the unsynced bytes (or their size,
        // reading as zeros), never more.
        let mut zeros = false;
        for _ in 0..60 {
            let torn = &fs.crash_image("t", true).files[&log];
            assert!(
                torn.len() >= 3 && torn.len() <= 6 && torn.starts_with(b"abc"),
                "{torn:?}"
            );
            for (i, b) in torn.iter().enumerate().skip(3) {
                assert!(*b == b"abcdef"[i] || torn[i..].iter().all(|z| *z == 0), "{torn:?}");
            }
            zeros |= torn.ends_with(&[0]);
        }
        assert!(zeros, "no torn image read as zeros");
        f.sync_data().unwrap();
        assert_eq!(fs.crash_image("t", false).files[&log], b"abcdef");
    }

    #[test]
    fn a_rename_survives_only_after_the_directory_sync() {
        let fs = PageCacheFs::new(5);
        fs.create_dir_all(&dir()).unwrap();
        let (log, tmp) = (dir().join("log"), dir().join("tmp"));
        let mut f = fs.open_rw(&log).unwrap();
        f.write_all(b"old").unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(&dir()).unwrap();
        let mut t = fs.create_truncate(&tmp).unwrap();
        t.write_all(b"new").unwrap();
        t.sync_data().unwrap();
        fs.rename(&tmp, &log).unwrap();
        assert_eq!(fs.crash_image("t", false).files[&log], b"old");
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            seen.insert(fs.crash_image("t", true).files[&log].clone());
        }
        assert!(seen.iter().all(|c| c == b"old" || c == b"new"), "{seen:?}");
        fs.sync_dir(&dir()).unwrap();
        let img = fs.crash_image("t", false);
        assert_eq!(img.files[&log], b"new");
        assert!(!img.files.contains_key(&tmp));
    }
}
