//! The log writer thread: applies one batch of appends/replaces to the
//! [`FileDisk`] and syncs it once (group commit), off the async runtime.
//!
//! **Invariant:** at most one batch is in flight (the driver waits for its
//! [`WriteDone`] before sending the next), so batches are applied in order and
//! `WriteDone { lsn }` means every write up to `lsn` is durable.

use super::file_disk::FileDisk;
use crate::broker::Lsn;
use crate::log::FRAME_HEADER_LEN;
use std::sync::mpsc as std_mpsc;
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
    /// every earlier `Persist`: earlier pending ops are superseded.
    pub fn replace(&mut self, lsn: Lsn, frames: Vec<u8>) {
        self.ops.clear();
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

/// Handle to the writer thread. Dropping it ends the thread after its current batch.
pub struct LogWriter {
    jobs: Option<std_mpsc::SyncSender<WriteBatch>>,
    done: mpsc::Receiver<WriteDone>,
    in_flight: Option<Lsn>,
    thread: Option<std::thread::JoinHandle<()>>,
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

    fn spawn_with(mut disk: FileDisk, reply_before_fsync: bool) -> std::io::Result<LogWriter> {
        // Capacity 1 on both sides: one batch in flight is the design.
        let (jobs_tx, jobs_rx) = std_mpsc::sync_channel::<WriteBatch>(1);
        let (done_tx, done_rx) = mpsc::channel::<WriteDone>(1);
        let thread = std::thread::Builder::new().name("sagamq-log".into()).spawn(move || {
            while let Ok(batch) = jobs_rx.recv() {
                if reply_before_fsync {
                    let result = apply_unsynced(&mut disk, &batch.ops);
                    let failed = result.is_err();
                    if done_tx.blocking_send(WriteDone { lsn: batch.lsn, result }).is_err() || failed {
                        break;
                    }
                    if disk.try_sync().is_err() {
                        break;
                    }
                    continue;
                }
                let result = apply(&mut disk, &batch.ops);
                let failed = result.is_err();
                if done_tx.blocking_send(WriteDone { lsn: batch.lsn, result }).is_err() || failed {
                    // After a failed fsync nothing more may be written.
                    break;
                }
            }
        })?;
        Ok(LogWriter {
            jobs: Some(jobs_tx),
            done: done_rx,
            in_flight: None,
            thread: Some(thread),
        })
    }

    pub fn in_flight(&self) -> Option<Lsn> {
        self.in_flight
    }

    /// Starts a batch with everything pending, unless one is already in flight.
    pub fn start(&mut self, pending: &mut PendingWrites) {
        if self.in_flight.is_some() {
            return;
        }
        let Some(batch) = pending.take() else { return };
        let lsn = batch.lsn;
        let Some(jobs) = &self.jobs else { return };
        // The thread only stops after a failure, which the driver already saw.
        if jobs.send(batch).is_ok() {
            self.in_flight = Some(lsn);
        }
    }

    /// Waits for the batch in flight (pending forever when none is, for `select!`).
    pub async fn done(&mut self) -> WriteDone {
        if self.in_flight.is_none() {
            return std::future::pending().await;
        }
        match self.done.recv().await {
            Some(d) => {
                self.in_flight = None;
                d
            }
            None => {
                let lsn = self.in_flight.take().unwrap_or_default();
                WriteDone {
                    lsn,
                    result: Err("log writer thread stopped".into()),
                }
            }
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.jobs.take();
        self.done.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn apply(disk: &mut FileDisk, ops: &[WriteOp]) -> Result<BatchReport, String> {
    let mut report = apply_unsynced(disk, ops)?;
    let t0 = Instant::now();
    disk.try_sync()
        .map_err(|e| format!("fdatasync {}: {e}", disk.path().display()))?;
    report.sync_time = t0.elapsed();
    Ok(report)
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
    fn pending_merges_appends_and_a_replace_supersedes_them() {
        let mut p = PendingWrites::default();
        assert!(p.is_empty());
        p.append(Lsn(1), b"a".to_vec());
        p.append(Lsn(2), b"b".to_vec());
        assert_eq!(p.ops.len(), 1);
        p.replace(Lsn(3), b"R".to_vec());
        p.append(Lsn(4), b"c".to_vec());
        let batch = p.take().unwrap();
        assert_eq!(batch.lsn, Lsn(4));
        assert!(matches!(&batch.ops[..], [WriteOp::Replace(r), WriteOp::Append(c)] if r == b"R" && c == b"c"));
        assert!(p.is_empty());
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
            p.append(Lsn(2), f.clone());
            w.start(&mut p); // one in flight: stays pending
            assert!(!p.is_empty());
            let d = w.done().await;
            assert_eq!(d.lsn, Lsn(1));
            assert_eq!(d.result.unwrap().records, 1);
            w.start(&mut p);
            let d = w.done().await;
            assert_eq!(d.lsn, Lsn(2));
        });
        let disk = FileDisk::open(&dir).unwrap();
        assert_eq!(decode_all(&disk.try_read_all().unwrap()).unwrap().records.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
