//! The log writer: applies one batch of appends to the [`FileDisk`] and
//! syncs it once (group commit). The batch is written to the page cache on
//! the driver's thread (a `pwrite` into preallocated space, no hand-off to
//! another thread); its `fdatasync` runs on one of [`SYNCS_IN_FLIGHT_MAX`]
//! sync threads; a compaction's new file is written and synced on a thread
//! of its own while appends go on to the old file.
//!
//! **Invariant:** batches are written one at a time, in the order the
//! writes were handed over, and `WriteDone { lsn }` means every write up to
//! `lsn` is durable (reports may come out of order: a report with a lower
//! `lsn` than an earlier one says nothing new, unless it is an error).
//! Writes handed over while every sync slot is busy wait in a queue and go
//! out together as the next batch as soon as a slot frees.

use super::file_disk::FileDisk;
use super::fs::FsFile;
use crate::broker::Lsn;
use crate::log::FRAME_HEADER_LEN;
use std::sync::{Arc, Mutex};
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

/// What the sync and compaction threads tell the writer.
enum Event {
    /// One batch's `fdatasync` returned; `file` is its descriptor, back to
    /// the pool if it succeeded and still belongs to the log.
    Synced {
        lsn: Lsn,
        result: Result<BatchReport, String>,
        file: Box<dyn FsFile>,
        generation: u64,
    },
    /// A compaction's new file holds the file header and the state, synced.
    CompactionWritten(std::io::Result<()>),
    /// The compaction's new file is the log now (open for writing), or the
    /// switch failed.
    Switched(std::io::Result<Box<dyn FsFile>>),
}

/// One batch written to the page cache, waiting for its `fdatasync`.
struct SyncJob {
    lsn: Lsn,
    report: BatchReport,
    file: Box<dyn FsFile>,
    /// The log file it is a descriptor of (a compaction starts a new one).
    generation: u64,
}

/// A compaction in progress. Its new file (file header, then the live state)
/// is written and synced by a thread of its own while batches go on being
/// appended to the old file, which keeps every record (the appends before
/// the rewrite included): until the switch, the old file is the log, whole
/// and durable as before. Then nothing is written while the thread appends
/// what the old file got since the state was taken (`since`) to the new file,
/// syncs it, renames it over the log and syncs the directory.
struct Compaction {
    lsn: Lsn,
    /// Bytes of the live state in the new file (after its file header).
    state_len: u64,
    /// Everything appended to the old file since the state was taken.
    since: Vec<u8>,
    /// The new file is written: the switch is under way, with `since_len`
    /// bytes of `since` (nothing is written meanwhile).
    switching: bool,
    since_len: u64,
    /// Hands `since` to the thread for the switch (dropped: abandoned).
    tail_tx: Option<std::sync::mpsc::Sender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The log writer: group commit, one batch at a time written to the page
/// cache by the driver's own thread (a `pwrite`, no hand-off), its
/// `fdatasync` run by one of [`SYNCS_IN_FLIGHT_MAX`] sync threads. Writes
/// handed over while every sync slot is busy (or a compaction switches
/// files) wait here and go out as one batch as soon as a slot frees.
pub struct LogWriter {
    disk: FileDisk,
    /// Handed over, not written yet.
    queue: PendingWrites,
    /// A batch cut at a second rewrite while a compaction still runs: the
    /// rest of its writes, and what its first part cost. Written first once
    /// that compaction is switched to.
    held: Option<(WriteBatch, BatchReport)>,
    events: mpsc::UnboundedReceiver<Event>,
    events_tx: mpsc::UnboundedSender<Event>,
    jobs: Option<std::sync::mpsc::Sender<SyncJob>>,
    sync_threads: Vec<std::thread::JoinHandle<()>>,
    /// Idle descriptors of the current log file.
    files: Vec<Box<dyn FsFile>>,
    generation: u64,
    in_flight: usize,
    /// A write or sync failed: nothing more is written.
    failed: bool,
    /// Reports given before any event: a write's error, or (the broken test
    /// writer) a batch reported before its sync.
    ready: std::collections::VecDeque<WriteDone>,
    compaction: Option<Compaction>,
    /// The last lsn handed over, and the last one reported back.
    handed: Option<Lsn>,
    reported: Option<Lsn>,
    reply_before_fsync: bool,
}

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

    fn spawn_with(disk: FileDisk, reply_before_fsync: bool) -> std::io::Result<LogWriter> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<SyncJob>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let mut sync_threads = Vec::new();
        for i in 0..SYNCS_IN_FLIGHT_MAX {
            let (jobs_rx, tx) = (jobs_rx.clone(), events_tx.clone());
            let path = disk.path().to_path_buf();
            sync_threads.push(
                std::thread::Builder::new()
                    .name(format!("sagamq-sync{i}"))
                    .spawn(move || sync_thread(&jobs_rx, &tx, &path))?,
            );
        }
        Ok(LogWriter {
            disk,
            queue: PendingWrites::default(),
            held: None,
            events,
            events_tx,
            jobs: Some(jobs_tx),
            sync_threads,
            files: Vec::new(),
            generation: 0,
            in_flight: 0,
            failed: false,
            ready: Default::default(),
            compaction: None,
            handed: None,
            reported: None,
            reply_before_fsync,
        })
    }

    /// The last lsn handed over whose batch has not been reported yet.
    pub fn in_flight(&self) -> Option<Lsn> {
        match (self.handed, self.reported) {
            (Some(h), Some(r)) if h <= r => None,
            (h, _) => h,
        }
    }

    /// Hands everything pending over: written at once as the next batch if a
    /// sync slot is free, otherwise as soon as one is.
    pub fn start(&mut self, pending: &mut PendingWrites) {
        let Some(lsn) = pending.lsn else { return };
        if self.failed {
            // The driver already saw the failure (or sees it next in `done`).
            return;
        }
        self.queue.absorb(pending);
        self.handed = Some(lsn);
        self.pump();
    }

    /// Waits for the next batch report (pending forever when nothing was
    /// handed over since the last one, for `select!`). Cancel-safe: an event
    /// is handled in full once received.
    pub async fn done(&mut self) -> WriteDone {
        loop {
            if let Some(d) = self.ready.pop_front() {
                self.reported = self.reported.max(Some(d.lsn));
                return d;
            }
            // Even with nothing in flight: a sync overtaken by a later one
            // still reports (an error included).
            let Some(event) = self.events.recv().await else {
                return std::future::pending().await;
            };
            if let Some(d) = self.on_event(event) {
                self.reported = self.reported.max(Some(d.lsn));
                return d;
            }
        }
    }

    fn on_event(&mut self, event: Event) -> Option<WriteDone> {
        match event {
            Event::Synced {
                lsn,
                result,
                file,
                generation,
            } => {
                self.in_flight -= 1;
                if result.is_err() {
                    // After a failed fsync nothing more may be written.
                    self.failed = true;
                } else if generation == self.generation {
                    self.files.push(file);
                }
                self.pump();
                Some(WriteDone { lsn, result })
            }
            Event::CompactionWritten(result) => {
                let c = self.compaction.as_mut().expect("a compaction runs");
                match result {
                    Ok(()) => {
                        // Nothing is written until the switch is done.
                        c.switching = true;
                        let since = std::mem::take(&mut c.since);
                        c.since_len = since.len() as u64;
                        if let Some(tx) = c.tail_tx.take() {
                            let _ = tx.send(since);
                        }
                        None
                    }
                    Err(e) => {
                        let lsn = c.lsn;
                        self.end_compaction();
                        self.fail(lsn, format!("compaction of {}: {e}", self.disk.path().display()))
                    }
                }
            }
            Event::Switched(result) => {
                let c = self.compaction.as_ref().expect("a compaction runs");
                let (lsn, len) = (c.lsn, c.state_len);
                let since_len = c.since_len;
                self.end_compaction();
                match result {
                    Ok(file) => {
                        self.disk.install_compacted(file, len + since_len);
                        // Descriptors of the old file would sync the old file.
                        self.files.clear();
                        self.generation += 1;
                        self.pump();
                        None
                    }
                    Err(e) => self.fail(lsn, format!("compaction of {}: {e}", self.disk.path().display())),
                }
            }
        }
    }

    fn end_compaction(&mut self) {
        if let Some(mut c) = self.compaction.take() {
            c.tail_tx = None;
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// A write failed: nothing more is written; the error is reported next.
    fn fail(&mut self, lsn: Lsn, e: String) -> Option<WriteDone> {
        self.failed = true;
        Some(WriteDone { lsn, result: Err(e) })
    }

    /// Writes the next batch if it may go now.
    fn pump(&mut self) {
        if self.failed || self.in_flight >= SYNCS_IN_FLIGHT_MAX {
            return;
        }
        let (batch, report) = match self.held.take() {
            Some(held) if self.compaction.is_none() => held,
            Some(held) => {
                self.held = Some(held);
                return;
            }
            None if self.compaction.as_ref().is_some_and(|c| c.switching) => return,
            None => match self.queue.take() {
                Some(batch) => (batch, BatchReport::default()),
                None => return,
            },
        };
        if let Err(e) = self.write(batch, report) {
            let (lsn, e) = e;
            if let Some(d) = self.fail(lsn, e) {
                self.ready.push_back(d);
            }
        }
    }

    /// Writes a batch and starts its sync (or holds the rest of it at a
    /// second rewrite while a compaction runs).
    fn write(&mut self, batch: WriteBatch, mut report: BatchReport) -> Result<(), (Lsn, String)> {
        let lsn = batch.lsn;
        let path = self.disk.path().display().to_string();
        let mut ops = batch.ops.into_iter();
        while let Some(op) = ops.next() {
            match op {
                WriteOp::Append(b) => {
                    self.disk
                        .try_append(&b)
                        .map_err(|e| (lsn, format!("append to {path}: {e}")))?;
                    report.bytes += b.len() as u64;
                    report.records += count_frames(&b);
                    if let Some(c) = &mut self.compaction {
                        c.since.extend_from_slice(&b);
                    }
                }
                WriteOp::Replace(state) => {
                    if self.compaction.is_some() {
                        // One compaction at a time (a second one so soon is
                        // rare): the rest waits for the switch.
                        let mut rest = vec![WriteOp::Replace(state)];
                        rest.extend(ops);
                        self.held = Some((WriteBatch { ops: rest, lsn }, report));
                        return Ok(());
                    }
                    report.bytes += state.len() as u64;
                    report.records += count_frames(&state);
                    report.replaced = true;
                    self.compaction = Some(self.start_compaction(lsn, state).map_err(|e| (lsn, e))?);
                }
            }
        }
        let file = match self.files.pop() {
            Some(f) => f,
            None => self
                .disk
                .open_sync_descriptor()
                .map_err(|e| (lsn, format!("open {path} to sync it: {e}")))?,
        };
        if self.reply_before_fsync {
            self.ready.push_back(WriteDone { lsn, result: Ok(report) });
        }
        let job = SyncJob {
            lsn,
            report,
            file,
            generation: self.generation,
        };
        self.in_flight += 1;
        if let Some(jobs) = &self.jobs {
            if jobs.send(job).is_err() {
                self.in_flight -= 1;
                return Err((lsn, "the log sync threads stopped".into()));
            }
        }
        Ok(())
    }

    fn start_compaction(&mut self, lsn: Lsn, state: Vec<u8>) -> Result<Compaction, String> {
        let write = self.disk.compaction_writer();
        let switch = self.disk.compaction_switcher();
        let events = self.events_tx.clone();
        let (tail_tx, tail_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let state_len = state.len() as u64;
        let thread = std::thread::Builder::new()
            .name("sagamq-compact".into())
            .spawn(move || {
                let file = match write(&state) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = events.send(Event::CompactionWritten(Err(e)));
                        return;
                    }
                };
                drop(state);
                if events.send(Event::CompactionWritten(Ok(()))).is_err() {
                    return;
                }
                // The writer stopped meanwhile: the temp file is left to be
                // removed at the next start; the old file is the log.
                let Ok(since) = tail_rx.recv() else { return };
                let _ = events.send(Event::Switched(switch(file, &since)));
            })
            .map_err(|e| format!("start the compaction thread: {e}"))?;
        Ok(Compaction {
            lsn,
            state_len,
            since: Vec::new(),
            switching: false,
            since_len: 0,
            tail_tx: Some(tail_tx),
            thread: Some(thread),
        })
    }
}
impl Drop for LogWriter {
    /// The syncs already started finish before it returns (their reports
    /// are dropped); a compaction still writing its new file is waited for
    /// and left unfinished (its temp file is removed at the next start).
    fn drop(&mut self) {
        self.jobs = None;
        self.end_compaction();
        for t in self.sync_threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `fdatasync` calls in flight at once, each on its own descriptor of the
/// log, by as many sync threads. The device flushes of concurrent calls are
/// coalesced by the kernel's block layer, so more of them complete per second
/// than one at a time (on this project's VM disk, 4 concurrent callers did
/// several times the syncs per second of one).
///
/// Each sync reports as soon as it returns, and `WriteDone { lsn }` still
/// means every write up to `lsn` is durable: an `fdatasync` makes durable all
/// that was written to the file before it (POSIX), through any descriptor. On
/// Linux it first waits for the writeback of every dirty or in-flight page of
/// the file, an earlier sync's included, and fails if any of those writes
/// failed since this descriptor's last sync; a descriptor goes back to the
/// pool only after a successful sync, and after any failure nothing more is
/// written. So a later sync may report before an earlier, slower one (whose
/// report then says nothing new), and an error from any sync still reaches
/// the driver.
pub const SYNCS_IN_FLIGHT_MAX: usize = 4;

fn sync_thread(
    jobs: &Mutex<std::sync::mpsc::Receiver<SyncJob>>,
    events: &mpsc::UnboundedSender<Event>,
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
        let result = result
            .map(|()| job.report)
            .map_err(|e| format!("fdatasync {}: {e}", path.display()));
        let _ = events.send(Event::Synced {
            lsn: job.lsn,
            result,
            file: job.file,
            generation: job.generation,
        });
    }
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
