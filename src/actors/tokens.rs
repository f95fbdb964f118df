//! The worker tokens of a live job, shared by its Job (which issues one per incarnation) and
//! the worker API (which checks a request's token here, before reading its body and without a
//! trip through the Job's mailbox). A worker call then crosses the mailbox once, carrying the
//! attempt its token belongs to; the Job only checks that this attempt still runs.

use std::collections::HashSet;
use std::sync::Mutex;

use super::messages::WorkerRejected;

/// Each rank's current token digest (with its attempt) and the digests of its earlier ones.
pub struct WorkerTokens {
    ranks: Mutex<Vec<RankTokens>>,
}

#[derive(Default, Clone)]
struct RankTokens {
    current: Option<(String, u32)>,
    past: HashSet<String>,
}

impl WorkerTokens {
    pub fn new(world_size: u32) -> Self {
        WorkerTokens {
            ranks: Mutex::new(vec![RankTokens::default(); world_size as usize]),
        }
    }

    fn ranks(&self) -> std::sync::MutexGuard<'_, Vec<RankTokens>> {
        self.ranks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Incarnation `attempt` of `rank` gets the token whose digest is `hash`; the one before
    /// becomes stale.
    pub fn issue(&self, rank: u32, attempt: u32, hash: String) {
        if let Some(r) = self.ranks().get_mut(rank as usize)
            && let Some((old, _)) = r.current.replace((hash, attempt))
        {
            r.past.insert(old);
        }
    }

    /// A token of an earlier run (restored from the history): its calls get 409, not 401.
    pub fn retire(&self, rank: u32, hash: String) {
        if let Some(r) = self.ranks().get_mut(rank as usize) {
            r.past.insert(hash);
        }
    }

    /// The attempt of `rank` whose token has digest `hash`.
    pub fn attempt_of(&self, rank: u32, hash: &str) -> Result<u32, WorkerRejected> {
        let ranks = self.ranks();
        let r = ranks
            .get(rank as usize)
            .ok_or(WorkerRejected::UnknownRank)?;
        match &r.current {
            Some((current, attempt)) if current == hash => Ok(*attempt),
            _ if r.past.contains(hash) => Err(WorkerRejected::Stale),
            _ => Err(WorkerRejected::BadToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_makes_the_old_one_stale_and_strangers_are_refused() {
        let tokens = WorkerTokens::new(2);
        tokens.retire(0, "run1".into());
        tokens.issue(0, 3, "a".into());
        assert_eq!(tokens.attempt_of(0, "a"), Ok(3));
        tokens.issue(0, 4, "b".into());
        assert_eq!(tokens.attempt_of(0, "b"), Ok(4));
        assert_eq!(tokens.attempt_of(0, "a"), Err(WorkerRejected::Stale));
        assert_eq!(tokens.attempt_of(0, "run1"), Err(WorkerRejected::Stale));
        assert_eq!(tokens.attempt_of(1, "b"), Err(WorkerRejected::BadToken));
        assert_eq!(tokens.attempt_of(2, "b"), Err(WorkerRejected::UnknownRank));
    }
}
