//! The log writer thread: applies one batch of appends/replaces to the
//! [`FileDisk`] and syncs it once (group commit), off the async runtime.
//!
//! **Invariant:** the thread writes batches one at a time, in the order the
//! writes were handed over, and `WriteDone { lsn }` means every write up to
//! `lsn` is durable (reports may come out of order: a report with a lower
//! `lsn` than an earlier one says nothing new, unless it is an error).
//! Writes handed over meanwhile wait in a shared queue; the thread takes all
//! of them as its next batch as soon as it has written the previous one and
//! one of the [`SYNCS_IN_FLIGHT_MAX`] sync slots is free (no round trip
//! through the driver in between). A compaction's new file is written and
//! synced on a thread of its own while the appends go on to the old file,
//! which stays the log, whole, until the switch ([`Compaction`]).

use super::file_disk::FileDisk;
use super::fs::FsFile;
use crate::broker::Lsn;
use crate::log::FRAME_HEADER_LEN;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// One durable write the core asked for.
#[derive(Debug)]
pub enum WriteOp {
    /// `Persist`: append framed records.
    Append(Vec<u8>),
    /// `Rewrite`: replace the whole log (compaction).
    Replace(Vec<u8>),
}

/// The writes gathered while the previous batch was syncing.
#[derive(Debug, Default)]
pub struct PendingWrites {
    ops: Vec<WriteOp>,
    lsn: Option<Lsn>,
}

impl PendingWrites {
    pub fn is_empty(&self) -> bool {
        self.lsn.is_none()
    }

    pub fn append(&mut self, lsn: Lsn, frames: Vec<u8>) {
        // Consecutive appends become one write() call.
        match self.ops.last_mut() {
            Some(WriteOp::Append(buf)) => buf.extend_from_slice(&frames),
            _ => self.ops.push(WriteOp::Append(frames)),
        }
        self.lsn = Some(lsn);
    }

    /// A rewrite holds the live state, which already includes the effect of
    /// every earlier `Persist`. The earlier appends are still written: the
    /// writer goes on appending to the old file while the new one is written
    /// (see [`write_and_sync`]), and the old file must hold every record.
    pub fn replace(&mut self, lsn: Lsn, frames: Vec<u8>) {
        self.ops.push(WriteOp::Replace(frames));
        self.lsn = Some(lsn);
    }

    fn take(&mut self) -> Option<WriteBatch> {
        let lsn = self.lsn.take()?;
        Some(WriteBatch {
            ops: std::mem::take(&mut self.ops),
            lsn,
        })
    }

    /// Moves everything in `other` behind what is here.
    fn absorb(&mut self, other: &mut PendingWrites) {
        let Some(lsn) = other.lsn.take() else { return };
        for op in other.ops.drain(..) {
            match op {
                WriteOp::Append(frames) => self.append(lsn, frames),
                WriteOp::Replace(frames) => self.replace(lsn, frames),
            }
        }
        self.lsn = Some(lsn);
    }
}

#[derive(Debug)]
struct WriteBatch {
    ops: Vec<WriteOp>,
    lsn: Lsn,
}

/// What one batch cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    pub bytes: u64,
    pub records: u64,
    pub replaced: bool,
    pub sync_time: Duration,
}

#[derive(Debug)]
pub struct WriteDone {
    pub lsn: Lsn,
    pub result: Result<BatchReport, String>,
}

/// What the driver and the writer thread share: the writes handed over and
/// not yet taken.
struct Queue {
    pending: PendingWrites,
    /// The thread sleeps on the condvar (a hand-over must wake it).
    idle: bool,
    /// No more batches: the handle was dropped or a write failed.
    closed: bool,
    /// A compaction's new file is written and synced: the writer switches to
    /// it before its next batch.
    compaction_ready: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle to the writer thread. Dropping it ends the thread after the writes
/// already handed over.
pub struct LogWriter {
    shared: Arc<Shared>,
    done: mpsc::Receiver<WriteDone>,
    /// The last lsn handed over, and the last one reported back.
    handed: Option<Lsn>,
    reported: Option<Lsn>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Reports waiting for the driver; a full channel holds the thread back.
const REPORTS_QUEUED_MAX: usize = 64;

impl LogWriter {
    pub fn spawn(disk: FileDisk) -> std::io::Result<LogWriter> {
        LogWriter::spawn_with(disk, false)
    }

    /// A deliberately broken writer for the power-loss test: it reports each
    /// batch durable after its writes but *before* its `fdatasync`.
    #[cfg(test)]
    pub(crate) fn spawn_replying_before_fsync(disk: FileDisk) -> std::io::Result<LogWriter> {
        LogWriter::spawn_with(disk, true)
    }

    fn spawn_with(mut disk: FileDisk, reply_before_fsync: bool) -> std::io::Result<LogWriter> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                pending: PendingWrites::default(),
                idle: false,
                closed: false,
                compaction_ready: false,
            }),
            wake: Condvar::new(),
        });
        let (done_tx, done_rx) = mpsc::channel::<WriteDone>(REPORTS_QUEUED_MAX);
        let queue = shared.clone();
        let thread = std::thread::Builder::new().name("sagamq-log".into()).spawn(move || {
            if reply_before_fsync {
                while let Some(next) = next_batch(&queue) {
                    let Next::Batch(batch) = next else { continue };
                    let result = apply_unsynced(&mut disk, &batch.ops);
                    let failed = result.is_err();
                    if done_tx.blocking_send(WriteDone { lsn: batch.lsn, result }).is_err() || failed {
                        break;
                    }
                    if disk.try_sync().is_err() {
                        break;
                    }
                }
            } else {
                write_and_sync(&mut disk, &queue, done_tx);
            }
            queue.lock().closed = true;
        })?;
        Ok(LogWriter {
            shared,
            done: done_rx,
            handed: None,
            reported: None,
            thread: Some(thread),
        })
    }

    /// The last lsn handed over whose batch has not been reported yet.
    pub fn in_flight(&self) -> Option<Lsn> {
        match (self.handed, self.reported) {
            (Some(h), Some(r)) if h <= r => None,
            (h, _) => h,
        }
    }

    /// Hands everything pending to the thread: it joins the writes the thread
    /// has not taken yet, and goes out with them in its next batch.
    pub fn start(&mut self, pending: &mut PendingWrites) {
        let Some(lsn) = pending.lsn else { return };
        let mut q = self.shared.lock();
        // The thread only stops after a failure, which the driver already saw
        // (or sees next in `done`).
        if q.closed {
            return;
        }
        q.pending.absorb(pending);
        self.handed = Some(lsn);
        if q.idle {
            q.idle = false;
            drop(q);
            self.shared.wake.notify_one();
        }
    }

    /// Waits for the next batch report (pending forever when nothing was
    /// handed over since the last one, for `select!`).
    pub async fn done(&mut self) -> WriteDone {
        // Even with nothing in flight: a sync overtaken by a later one still
        // reports (an error included, which must not wait for more work).
        match self.done.recv().await {
            Some(d) => {
                self.reported = self.reported.max(Some(d.lsn));
                d
            }
            None => match self.in_flight() {
                Some(handed) => {
                    self.reported = Some(handed);
                    WriteDone {
                        lsn: handed,
                        result: Err("log writer thread stopped".into()),
                    }
                }
                None => std::future::pending().await,
            },
        }
    }
}

/// `fdatasync` calls in flight at once, each on its own descriptor of the
/// log, by as many sync threads. The device flushes of concurrent calls are
/// coalesced by the kernel's block layer, so more of them complete per second
/// than one at a time (on this project's VM disk, 4 concurrent callers did
/// several times the syncs per second of one).
pub const SYNCS_IN_FLIGHT_MAX: usize = 4;
/// One batch written to the page cache, waiting for its `fdatasync`.
struct SyncJob {
    lsn: Lsn,
    report: BatchReport,
    file: Box<dyn FsFile>,
    /// The log file it is a descriptor of (a compaction starts a new one).
    generation: u64,
}

/// What the writer thread and the sync threads share.
#[derive(Default)]
struct SyncState {
    in_flight: usize,
    /// Idle descriptors of the current log file.
    files: Vec<Box<dyn FsFile>>,
    generation: u64,
    failed: bool,
}

struct Syncs {
    state: Mutex<SyncState>,
    changed: Condvar,
}

impl Syncs {
    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, SyncState>) -> MutexGuard<'a, SyncState> {
        self.changed.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer thread: writes each batch to the page cache at once, then has
/// one of [`SYNCS_IN_FLIGHT_MAX`] sync threads `fdatasync` it while it writes
/// and syncs the next. Each sync reports as soon as it returns, and
/// `WriteDone { lsn }` still means every write up to `lsn` is durable: an
/// `fdatasync` makes durable all that was written to the file before it
/// (POSIX), through any descriptor. On Linux it first waits for the
/// writeback of every dirty or in-flight page of the file, an earlier sync's
/// included, and fails if any of those writes failed since this descriptor's
/// last sync; a descriptor goes back to the pool only after a successful
/// sync, and after any failure nothing more is dispatched. So a later sync
/// may report before an earlier, slower one (whose report then says nothing
/// new), and an error from any sync still reaches the driver. A compaction
/// (`Replace`) runs alongside the appends (see [`Compaction`]); only its
/// switch to the new file, between two batches, holds them back.
fn write_and_sync(disk: &mut FileDisk, queue: &Arc<Shared>, done_tx: mpsc::Sender<WriteDone>) {
    let syncs = Arc::new(Syncs {
        state: Mutex::new(SyncState::default()),
        changed: Condvar::new(),
    });
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<SyncJob>();
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let mut threads = Vec::new();
    for i in 0..SYNCS_IN_FLIGHT_MAX {
        let (syncs, jobs_rx, tx) = (syncs.clone(), jobs_rx.clone(), done_tx.clone());
        let path = disk.path().to_path_buf();
        let t = std::thread::Builder::new()
            .name(format!("sagamq-sync{i}"))
            .spawn(move || sync_thread(&syncs, &jobs_rx, &tx, &path));
        match t {
            Ok(t) => threads.push(t),
            Err(e) => {
                let _ = done_tx.blocking_send(WriteDone {
                    lsn: Lsn::default(),
                    result: Err(format!("start a log sync thread: {e}")),
                });
                return;
            }
        }
    }
    let mut compaction: Option<Compaction> = None;
    let fail = |lsn: Lsn, e: String| {
        let _ = done_tx.blocking_send(WriteDone { lsn, result: Err(e) });
    };
    while let Some(next) = next_batch(queue) {
        if syncs.lock().failed {
            break;
        }
        let batch = match next {
            Next::Compacted => {
                if let Some(c) = compaction.take() {
                    let lsn = c.lsn;
                    if let Err(e) = c.finish(disk, &syncs) {
                        fail(lsn, e);
                        break;
                    }
                }
                continue;
            }
            Next::Batch(batch) => batch,
        };
        let mut report = BatchReport::default();
        let mut failed = None;
        for op in batch.ops {
            match op {
                WriteOp::Append(b) => {
                    if let Err(e) = disk.try_append(&b) {
                        failed = Some(format!("append to {}: {e}", disk.path().display()));
                        break;
                    }
                    report.bytes += b.len() as u64;
                    report.records += count_frames(&b);
                    if let Some(c) = &mut compaction {
                        c.since.extend_from_slice(&b);
                    }
                }
                WriteOp::Replace(state) => {
                    // One compaction at a time: a second one (rare) waits
                    // for the first to be switched to.
                    if let Some(c) = compaction.take()
                        && let Err(e) = c.finish(disk, &syncs)
                    {
                        failed = Some(e);
                        break;
                    }
                    report.bytes += state.len() as u64;
                    report.records += count_frames(&state);
                    report.replaced = true;
                    match Compaction::start(disk, queue, batch.lsn, state) {
                        Ok(c) => compaction = Some(c),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
        }
        if let Some(e) = failed {
            fail(batch.lsn, e);
            break;
        }
        let mut g = syncs.lock();
        while g.in_flight >= SYNCS_IN_FLIGHT_MAX && !g.failed {
            g = syncs.wait(g);
        }
        if g.failed {
            break;
        }
        let file = match g.files.pop() {
            Some(f) => f,
            None => match disk.open_sync_descriptor() {
                Ok(f) => f,
                Err(e) => {
                    drop(g);
                    fail(batch.lsn, format!("open {} to sync it: {e}", disk.path().display()));
                    break;
                }
            },
        };
        g.in_flight += 1;
        let generation = g.generation;
        drop(g);
        let job = SyncJob {
            lsn: batch.lsn,
            report,
            file,
            generation,
        };
        if jobs_tx.send(job).is_err() {
            break;
        }
    }
    // A compaction still running is finished (or, after a failure, left: its
    // temp file is removed at the next start and the old file is the log).
    if let Some(c) = compaction.take() {
        let lsn = c.lsn;
        if !syncs.lock().failed {
            if let Err(e) = c.finish(disk, &syncs) {
                fail(lsn, e);
            }
        } else {
            let _ = c.thread.join();
        }
    }
    // The syncs already started finish and are reported before the thread ends.
    drop(jobs_tx);
    for t in threads {
        let _ = t.join();
    }
}

fn sync_thread(
    syncs: &Syncs,
    jobs: &Mutex<std::sync::mpsc::Receiver<SyncJob>>,
    done_tx: &mpsc::Sender<WriteDone>,
    path: &std::path::Path,
) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(mut job) = job else { return };
        let t0 = Instant::now();
        let result = job.file.sync_data();
        job.report.sync_time = t0.elapsed();
        let failed = result.is_err();
        let result = result
            .map(|()| job.report)
            .map_err(|e| format!("fdatasync {}: {e}", path.display()));
        let mut g = syncs.lock();
        if failed {
            // After a failed fsync nothing more may be written.
            g.failed = true;
        } else if job.generation == g.generation {
            g.files.push(job.file);
        }
        // Reported at once, under the lock (so that no sync in flight means
        // every sync reported): it covers every batch written before it.
        let _ = done_tx.blocking_send(WriteDone { lsn: job.lsn, result });
        g.in_flight -= 1;
        drop(g);
        syncs.changed.notify_all();
    }
}

/// What the writer thread does next.
enum Next {
    /// Everything handed over so far, as one batch.
    Batch(WriteBatch),
    /// Switch to the compacted file (before anything else).
    Compacted,
}

/// The writer thread's wait for work; `None` once closed with nothing left
/// (a compaction still running is then finished by the caller).
fn next_batch(shared: &Shared) -> Option<Next> {
    let mut q = shared.lock();
    loop {
        if std::mem::take(&mut q.compaction_ready) {
            return Some(Next::Compacted);
        }
        if let Some(batch) = q.pending.take() {
            return Some(Next::Batch(batch));
        }
        if q.closed {
            return None;
        }
        q.idle = true;
        q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
    }
}

/// A compaction in progress: its new file (file header and the live state)
/// is written and synced by a thread of its own while the writer goes on
/// appending to the old file, which keeps every record, so the old file is
/// the log, whole and durable as before, until the switch.
struct Compaction {
    lsn: Lsn,
    /// Bytes of the live state (the new file holds the file header, these,
    /// then `since`).
    state_len: u64,
    /// Everything appended to the old file since the compaction's state was
    /// taken, copied to the new file at the switch.
    since: Vec<u8>,
    done: std::sync::mpsc::Receiver<std::io::Result<Box<dyn FsFile>>>,
    thread: std::thread::JoinHandle<()>,
    queue: Arc<Shared>,
    started: Instant,
}

impl Compaction {
    fn start(disk: &FileDisk, queue: &Arc<Shared>, lsn: Lsn, state: Vec<u8>) -> Result<Compaction, String> {
        let (tx, done) = std::sync::mpsc::channel();
        let write = disk.compaction_writer();
        let ready = queue.clone();
        let state_len = state.len() as u64;
        let thread = std::thread::Builder::new()
            .name("sagamq-compact".into())
            .spawn(move || {
                let _ = tx.send(write(&state));
                ready.lock().compaction_ready = true;
                ready.wake.notify_one();
            })
            .map_err(|e| format!("start the compaction thread: {e}"))?;
        Ok(Compaction {
            lsn,
            state_len,
            since: Vec::new(),
            done,
            thread,
            queue: queue.clone(),
            started: Instant::now(),
        })
    }

    /// Waits for the new file, appends `since` to it, syncs it and makes it
    /// the log (rename, directory fsync). The sync descriptors of the old file
    /// are dropped: a sync on the old file still in flight covers bytes the
    /// new file holds durably already (synced before the rename).
    fn finish(self, disk: &mut FileDisk, syncs: &Syncs) -> Result<(), String> {
        let file = self
            .done
            .recv()
            .map_err(|_| "the compaction thread stopped".to_string());
        let _ = self.thread.join();
        // Its wake-up (set before the join returned) is this switch.
        self.queue.lock().compaction_ready = false;
        let file = file?.map_err(|e| format!("compaction of {}: {e}", disk.path().display()))?;
        {
            let mut g = syncs.lock();
            g.files.clear();
            g.generation += 1;
        }
        let t0 = Instant::now();
        disk.switch_to_compacted(file, self.state_len, &self.since)
            .map_err(|e| format!("compaction of {}: {e}", disk.path().display()))?;
        tracing::info!(
            bytes = self.state_len,
            appended_meanwhile = self.since.len(),
            total_ms = self.started.elapsed().as_secs_f64() * 1e3,
            appends_held_ms = t0.elapsed().as_secs_f64() * 1e3,
            "compacted the log"
        );
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        self.done.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writes of one batch, not yet synced (a `Replace` is durable on its own).
fn apply_unsynced(disk: &mut FileDisk, ops: &[WriteOp]) -> Result<BatchReport, String> {
    let mut report = BatchReport::default();
    for op in ops {
        match op {
            WriteOp::Append(b) => {
                disk.try_append(b)
                    .map_err(|e| format!("append to {}: {e}", disk.path().display()))?;
                report.bytes += b.len() as u64;
                report.records += count_frames(b);
            }
            WriteOp::Replace(b) => {
                disk.try_replace(b)
                    .map_err(|e| format!("compaction of {}: {e}", disk.path().display()))?;
                report.bytes += b.len() as u64;
                report.records += count_frames(b);
                report.replaced = true;
            }
        }
    }
    Ok(report)
}

/// Number of frames in a buffer of whole frames (walks the length headers).
pub fn count_frames(mut bytes: &[u8]) -> u64 {
    let mut n = 0;
    while bytes.len() >= FRAME_HEADER_LEN {
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        let end = FRAME_HEADER_LEN.saturating_add(len).min(bytes.len());
        bytes = &bytes[end..];
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{decode_all, decode_frames, encode_frame};

    #[test]
    fn pending_merges_appends_and_keeps_them_ahead_of_a_replace() {
        let mut p = PendingWrites::default();
        assert!(p.is_empty());
        p.append(Lsn(1), b"a".to_vec());
        p.append(Lsn(2), b"b".to_vec());
        assert_eq!(p.ops.len(), 1);
        p.replace(Lsn(3), b"R".to_vec());
        p.append(Lsn(4), b"c".to_vec());
        let batch = p.take().unwrap();
        assert_eq!(batch.lsn, Lsn(4));
        // The appends before the rewrite still go to the old file, which
        // stays the log until the compacted one replaces it.
        assert!(matches!(&batch.ops[..],
            [WriteOp::Append(ab), WriteOp::Replace(r), WriteOp::Append(c)] if ab == b"ab" && r == b"R" && c == b"c"));
        assert!(p.is_empty());
    }

    #[test]
    fn handing_over_joins_the_queue_in_order() {
        let mut queue = PendingWrites::default();
        let mut p = PendingWrites::default();
        p.append(Lsn(1), b"a".to_vec());
        queue.absorb(&mut p);
        assert!(p.is_empty());
        p.append(Lsn(2), b"b".to_vec());
        queue.absorb(&mut p);
        assert_eq!(queue.lsn, Some(Lsn(2)));
        assert!(matches!(&queue.ops[..], [WriteOp::Append(ab)] if ab == b"ab"));
        p.replace(Lsn(3), b"R".to_vec());
        p.append(Lsn(4), b"c".to_vec());
        queue.absorb(&mut p);
        let batch = queue.take().unwrap();
        assert_eq!(batch.lsn, Lsn(4));
        assert!(matches!(&batch.ops[..],
            [WriteOp::Append(ab), WriteOp::Replace(r), WriteOp::Append(c)] if ab == b"ab" && r == b"R" && c == b"c"));
        // Nothing to hand over: the queue is unchanged.
        queue.absorb(&mut p);
        assert!(queue.is_empty());
    }

    #[test]
    fn counts_frames() {
        let mut buf = Vec::new();
        for p in [&b"x"[..], b"", b"hello"] {
            encode_frame(p, &mut buf);
        }
        assert_eq!(count_frames(&buf), 3);
        assert_eq!(decode_frames(&buf).unwrap().records.len(), 3);
    }

    #[test]
    fn writer_applies_batches_in_order_and_reports_durable_lsn() {
        let dir = std::env::temp_dir().join(format!("sagamq-logwriter-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut w = LogWriter::spawn(FileDisk::open(&dir).unwrap()).unwrap();
            let mut p = PendingWrites::default();
            let mut f = Vec::new();
            encode_frame(b"one", &mut f);
            p.append(Lsn(1), f.clone());
            w.start(&mut p);
            assert_eq!(w.in_flight(), Some(Lsn(1)));
            assert!(p.is_empty());
            // Handed over while the first may still be syncing: it joins the
            // thread's next batch (or the first, if not yet taken).
            p.append(Lsn(2), f.clone());
            w.start(&mut p);
            assert_eq!(w.in_flight(), Some(Lsn(2)));
            let mut records = 0;
            let mut last = Lsn(0);
            while records < 2 {
                let d = w.done().await;
                last = last.max(d.lsn);
                records += d.result.unwrap().records;
            }
            assert_eq!(w.in_flight(), None);
            assert_eq!((last, records), (Lsn(2), 2));
        });
        let disk = FileDisk::open(&dir).unwrap();
        assert_eq!(decode_all(&disk.try_read_all().unwrap()).unwrap().records.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
