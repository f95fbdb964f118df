//! How full the HTTP server is. Past its connection cap the listener stops accepting and new
//! connections wait in the kernel's backlog, heartbeats among them: a flood of slow clients can
//! then hold back every rank's heartbeat. While the server is (or just was) saturated, silence
//! is the server's fault, not the rank's, so no rank is declared hung for it
//! (`domain::liveness`).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The share of the cap at which the server counts as saturated.
const SATURATED_PERCENT: usize = 90;

#[derive(Debug)]
pub struct HttpPressure {
    cap: usize,
    open: AtomicUsize,
    last_saturated: Mutex<Option<Instant>>,
}

impl HttpPressure {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(HttpPressure {
            cap: cap.max(1),
            open: AtomicUsize::new(0),
            last_saturated: Mutex::new(None),
        })
    }

    fn threshold(&self) -> usize {
        (self.cap * SATURATED_PERCENT / 100).max(1)
    }

    /// Counts one accepted connection until the guard is dropped (with the connection).
    pub fn connected(self: &Arc<Self>) -> ConnectionGuard {
        let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        if open >= self.threshold() {
            *self
                .last_saturated
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        ConnectionGuard(self.clone())
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// How long ago the server was last saturated: zero while it is, none if never.
    pub fn saturated_ago(&self) -> Option<Duration> {
        if self.open() >= self.threshold() {
            return Some(Duration::ZERO);
        }
        let last = *self
            .last_saturated
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        last.map(|t| t.elapsed())
    }
}

/// One open HTTP connection.
pub struct ConnectionGuard(Arc<HttpPressure>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let was = self.0.open.fetch_sub(1, Ordering::SeqCst);
        if was >= self.0.threshold() {
            // It was saturated up to this moment.
            *self
                .0
                .last_saturated
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }
}
