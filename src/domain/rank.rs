//! A rank as its Job sees it: its state and the bookkeeping restored after a server restart.

use super::RankState;
use super::progress::RankView;

/// One rank's bookkeeping, restored from the history after a server restart.
#[derive(Debug, Clone)]
pub struct RankSlot {
    pub state: RankState,
    /// The attempt number the next launch uses; the current incarnation is `next_attempt - 1`.
    pub next_attempt: u32,
    /// A restart is waiting for this rank's next launch (its `restarted_at` is recorded then).
    pub restart_pending: bool,
    pub progress: RankView,
}

impl RankSlot {
    pub fn new() -> Self {
        RankSlot {
            state: RankState::Pending,
            next_attempt: 0,
            restart_pending: false,
            progress: RankView::default(),
        }
    }
}

impl Default for RankSlot {
    fn default() -> Self {
        Self::new()
    }
}
