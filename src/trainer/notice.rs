//! The built-in trainer's side of save on notice: the server's save request, as the
//! heartbeat thread last heard it (or the all-reduce round carried it), and SIGUSR1, which
//! the rank passes on to the server in an immediate heartbeat (Slurm's `--signal`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::domain::notice::SaveRequest;

/// The request as last heard, with the number of heartbeat answers heard so far, and a way
/// to have the heartbeat thread beat now.
#[derive(Clone, Default)]
pub struct SaveSlot {
    heard: Arc<Mutex<(u64, Option<SaveRequest>)>>,
    beat_now: Arc<Notify>,
}

impl SaveSlot {
    /// A heartbeat's answer.
    pub fn heard(&self, request: Option<SaveRequest>) {
        let mut slot = self.heard.lock().unwrap();
        slot.0 += 1;
        slot.1 = request;
    }

    pub fn current(&self) -> Option<SaveRequest> {
        self.heard.lock().unwrap().1.clone()
    }

    fn answers(&self) -> u64 {
        self.heard.lock().unwrap().0
    }

    /// Resolves when the training loop wants a heartbeat sent at once.
    pub async fn beat_wanted(&self) {
        self.beat_now.notified().await
    }

    /// After saving `step` for a request that halts: trains no further until an answer sent
    /// after this call (not one already on its way) no longer holds the rank at `step` — the
    /// server ends the rank first, or raises the step, or releases it.
    pub async fn hold_at(&self, step: u64) {
        let entered = self.answers();
        // The server learns the held step now, not at the next regular beat.
        self.beat_now.notify_one();
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let fresh = self.answers() >= entered + 2;
            if fresh && !holds(self.current().as_ref(), step) {
                return;
            }
        }
    }
}

pub use crate::domain::notice::writes_for_the_dead;

/// Where rank `rank`'s data stream stands after `step` steps: from its part of the newest
/// checkpoint (or the start), replayed batch by batch — a rank's position is a function of
/// the step, so a survivor can write a dead rank's part.
pub async fn cursor_of(
    store: &crate::storage::BlobStore,
    dataset: &super::data::Dataset,
    shards: &[super::data::Shard],
    rank: u32,
    world: u32,
    step: u64,
    batch_size: usize,
) -> anyhow::Result<super::data::Cursor> {
    let mut stream =
        super::data::RankStream::new(shards.to_vec(), rank as usize, world as usize, "")?;
    let (resume, _) = crate::checkpoint::find_resume(store, rank, world).await?;
    let mut at = 0;
    if let Some(resume) = resume {
        let (header, _) = super::decode_part(&resume.part)?;
        at = header.step;
        stream.cursor = header.cursor;
    }
    anyhow::ensure!(
        at <= step,
        "the newest checkpoint ({at}) is past step {step}"
    );
    for _ in at..step {
        stream.prepare(dataset, batch_size).await?;
        stream.next_batch(batch_size);
    }
    Ok(stream.cursor)
}

/// Whether `request` keeps a rank that finished `step` from training on.
pub fn holds(request: Option<&SaveRequest>, step: u64) -> bool {
    request.is_some_and(|r| r.halt && r.by_step == step)
}

/// Whether the rank saves its part right after finishing `step` (unless it already has).
pub fn due(request: Option<&SaveRequest>, step: u64) -> bool {
    request.is_some_and(|r| r.by_step == step)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(by_step: u64, halt: bool) -> SaveRequest {
        SaveRequest {
            by_step,
            reason: "stop".into(),
            halt,
            for_ranks: Vec::new(),
        }
    }

    #[test]
    fn a_rank_saves_at_the_step_and_holds_only_there() {
        // (request, step) -> (due, holds)
        let table = [
            (None, 10, (false, false)),
            (Some(req(10, true)), 9, (false, false)),
            (Some(req(10, true)), 10, (true, true)),
            // Missed: trains on, the server raises the step past it.
            (Some(req(10, true)), 11, (false, false)),
            (Some(req(10, false)), 10, (true, false)),
        ];
        for (request, step, want) in table {
            let got = (due(request.as_ref(), step), holds(request.as_ref(), step));
            assert_eq!(got, want, "{request:?} at {step}");
        }
    }
}
