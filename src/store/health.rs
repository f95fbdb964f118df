//! Whether the history can be written: the recorder's degraded state (a write failed for a
//! storage reason, such as a full disk, and is being retried), the log lines dropped meanwhile,
//! and the free space of the data dir against its low-disk watermark. `/health`, `/ready` and
//! the door of `POST /jobs` read it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;

/// How often the data dir's free space is measured.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Why the history cannot be written now, and since when.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Degraded {
    /// The storage error of the last failed write, e.g. `database or disk is full`.
    pub reason: String,
    /// When the first write failed (RFC 3339).
    pub since: String,
}

/// Shared between the recorder (which writes it) and the API (which reads it).
#[derive(Debug, Default)]
pub struct StoreHealth {
    degraded: Mutex<Option<Degraded>>,
    is_degraded: AtomicBool,
    /// History operations accepted but not yet durable.
    pending: AtomicUsize,
    /// Log lines dropped because they could not be written, since the server started.
    logs_dropped: AtomicU64,
    disk: DiskState,
}

#[derive(Debug, Default)]
struct DiskState {
    free_bytes: AtomicU64,
    low: AtomicBool,
    measured: AtomicBool,
}

impl StoreHealth {
    pub fn degraded(&self) -> Option<Degraded> {
        if !self.is_degraded.load(Ordering::Acquire) {
            return None;
        }
        self.degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A write failed for a storage reason; returns true when this starts a degraded period.
    pub(super) fn set_degraded(&self, reason: String) -> bool {
        let mut d = self.degraded.lock().unwrap_or_else(|p| p.into_inner());
        let first = d.is_none();
        match d.as_mut() {
            Some(d) => d.reason = reason,
            None => {
                *d = Some(Degraded {
                    reason,
                    since: crate::domain::now(),
                })
            }
        }
        self.is_degraded.store(true, Ordering::Release);
        first
    }

    /// A write succeeded; returns how the degraded period looked if one just ended.
    pub(super) fn set_ok(&self) -> Option<Degraded> {
        if !self.is_degraded.load(Ordering::Acquire) {
            return None;
        }
        let mut d = self.degraded.lock().unwrap_or_else(|p| p.into_inner());
        self.is_degraded.store(false, Ordering::Release);
        d.take()
    }

    pub(super) fn set_pending(&self, n: usize) {
        self.pending.store(n, Ordering::Relaxed);
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub(super) fn add_logs_dropped(&self, n: u64) {
        self.logs_dropped.fetch_add(n, Ordering::Relaxed);
    }

    pub fn logs_dropped(&self) -> u64 {
        self.logs_dropped.load(Ordering::Relaxed)
    }

    /// The data dir's free bytes at the last measure, if any was made.
    pub fn disk_free_bytes(&self) -> Option<u64> {
        self.disk
            .measured
            .load(Ordering::Relaxed)
            .then(|| self.disk.free_bytes.load(Ordering::Relaxed))
    }

    /// True while the data dir's free space is under the watermark.
    pub fn disk_low(&self) -> bool {
        self.disk.low.load(Ordering::Relaxed)
    }

    /// Records a measure; returns `Some(low)` when the low-disk state changed.
    fn measured(&self, free: u64, watermark: u64) -> Option<bool> {
        self.disk.free_bytes.store(free, Ordering::Relaxed);
        self.disk.measured.store(true, Ordering::Relaxed);
        let low = free < watermark;
        (self.disk.low.swap(low, Ordering::Relaxed) != low).then_some(low)
    }

    /// Measures the data dir's free space now and every few seconds, warning once when it
    /// falls under `watermark` bytes (and once when it is back above).
    pub fn watch_disk(self: &std::sync::Arc<Self>, dir: PathBuf, watermark: u64) {
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                health.check_disk(&dir, watermark);
                tokio::time::sleep(DISK_CHECK_EVERY).await;
            }
        });
    }

    fn check_disk(&self, dir: &Path, watermark: u64) {
        let Ok(free) = free_bytes(dir) else { return };
        match self.measured(free, watermark) {
            Some(true) => tracing::warn!(
                data_dir = %dir.display(),
                free_mb = free / (1 << 20),
                watermark_mb = watermark / (1 << 20),
                "the data dir is low on space: when it is full, new jobs are refused and log \
                 lines are dropped until space is freed"
            ),
            Some(false) => tracing::info!(
                data_dir = %dir.display(),
                free_mb = free / (1 << 20),
                "the data dir has space again"
            ),
            None => {}
        }
    }
}

/// Bytes available to this (unprivileged) process on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// A failure of the storage under the database (full disk, I/O error, read-only or vanished
/// file), as opposed to a fault of one statement (a constraint). Such a failure fails the
/// whole transaction: it is rolled back and retried, never skipped.
pub fn is_storage_fault(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
            // SQLITE_ERROR (1), CONSTRAINT (19), MISMATCH (20) and RANGE (25) are faults of
            // one statement; everything else (FULL 13, IOERR 10, READONLY 8, CANTOPEN 14,
            // BUSY 5, LOCKED 6, NOMEM 7, CORRUPT 11, ...) is the storage's.
            !matches!(code & 0xff, 1 | 19 | 20 | 25)
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degraded_periods_start_and_end_once() {
        let h = StoreHealth::default();
        assert!(h.degraded().is_none());
        assert!(h.set_degraded("database or disk is full".into()));
        assert!(!h.set_degraded("disk I/O error".into()));
        assert_eq!(h.degraded().unwrap().reason, "disk I/O error");
        assert!(h.set_ok().is_some());
        assert!(h.set_ok().is_none());
        assert!(h.degraded().is_none());
    }

    #[test]
    fn the_low_disk_state_changes_only_when_crossing_the_watermark() {
        let h = StoreHealth::default();
        assert_eq!(h.disk_free_bytes(), None);
        assert_eq!(h.measured(10, 5), None);
        assert_eq!(h.measured(4, 5), Some(true));
        assert_eq!(h.measured(3, 5), None);
        assert!(h.disk_low());
        assert_eq!(h.measured(6, 5), Some(false));
        assert_eq!(h.disk_free_bytes(), Some(6));
    }

    #[test]
    fn free_bytes_of_a_real_directory() {
        assert!(free_bytes(&std::env::temp_dir()).unwrap() > 0);
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }
}
