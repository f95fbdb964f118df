//! Save on notice: the rules by which a job's ranks are asked to checkpoint before the server
//! ends them on purpose (stop, server SIGTERM, a preemption signal) or when a client asks for a
//! checkpoint now, which step they save at, and what an interruption then cost. Plain data and
//! functions: the Job actor carries out what they return.

use serde::{Deserialize, Serialize};

/// Who asked for the save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NoticeCause {
    /// `POST /jobs/{id}/stop` (saves unless `{"save": false}`).
    Stop,
    /// `POST /jobs/{id}/checkpoint`: save now and keep running.
    Checkpoint,
    /// The server got SIGTERM or SIGINT: save, then stop the ranks; the next server resumes.
    ServerShutdown,
    /// A rank got SIGUSR1 (Slurm's `--signal` before a preemption or the time limit, or an
    /// operator) and told the server in its heartbeat.
    Signal,
    /// A rank of a synchronous built-in trainer job died: before the group restarts, the
    /// survivors save the last step every rank completed, the dead rank's part included.
    RankDied,
}

impl NoticeCause {
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeCause::Stop => "stop",
            NoticeCause::Checkpoint => "checkpoint",
            NoticeCause::ServerShutdown => "server_shutdown",
            NoticeCause::Signal => "signal",
            NoticeCause::RankDied => "rank_died",
        }
    }

    /// Whether the ranks stop training once their part is saved: every cause but a plain
    /// checkpoint ends the ranks next, and a step made after the save would be lost.
    pub fn halts(self) -> bool {
        self != NoticeCause::Checkpoint
    }
}

/// What a rank is told in the answer to its heartbeat (and, in a synchronous built-in trainer
/// job, in the answer of the all-reduce round that fixes the step): save your part of `by_step`
/// right after finishing that step; with `halt`, then train no further until this request
/// changes (the server ends the rank, or raises `by_step`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SaveRequest {
    pub by_step: u64,
    /// The cause, as in [`NoticeCause::as_str`].
    pub reason: String,
    pub halt: bool,
    /// Ranks that died: the lowest surviving rank writes their parts too (every replica of a
    /// synchronous job is the same model, and a rank's data position is a function of the
    /// step), registering each with `"for_rank"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub for_ranks: Vec<u32>,
}

/// Whether `rank` writes the parts of the dead ranks: the lowest rank not among them.
pub fn writes_for_the_dead(rank: u32, world: u32, dead: &[u32]) -> bool {
    (0..world).find(|r| !dead.contains(r)) == Some(rank)
}

/// Whether the survivors of a synchronous group can save before it restarts, and at which
/// step: the last step every rank completed (the last all-reduce round), when it is newer
/// than the last checkpoint (otherwise the restart loses nothing a save would keep).
pub fn survivors_step(last_round: Option<u64>, last_checkpoint: Option<u64>) -> Option<u64> {
    last_round.filter(|&s| s > last_checkpoint.unwrap_or(0))
}

/// The step every rank saves at when the ranks are not in lock step through the server: one
/// past the furthest rank's last report (no report yet counts as step 0).
pub fn first_by_step(steps: impl IntoIterator<Item = Option<u64>>) -> u64 {
    steps.into_iter().flatten().max().unwrap_or(0) + 1
}

/// A rank that reports a step past `by_step` without having saved it missed the request (it
/// was past the step when the answer reached it): every rank then saves past that rank, as far
/// ahead of it as it overshot (the steps it makes while an answer travels), so the parts meet
/// at one step again. A rank at `by_step` itself may be writing its part: it raises nothing.
/// (Not from the job's steps/s: one burst of heartbeats can make that figure huge, and a step
/// set far ahead is never reached within the grace.)
pub fn raised_by_step(by_step: u64, rank_step: u64, saved_by_step: bool) -> u64 {
    if rank_step > by_step && !saved_by_step {
        rank_step + 1 + (rank_step - by_step)
    } else {
        by_step
    }
}

/// How a notice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NoticeOutcome {
    /// Every rank's part of the step committed.
    Saved,
    /// No commit within `save_grace_s` (a rank ignored the request, a part could not be
    /// written): the job goes on from the last checkpoint.
    TimedOut,
    /// A rank ended before the save committed.
    Interrupted,
    /// No rank was running: nothing to save.
    NothingToSave,
    /// A running rank can neither read the request (it never heartbeated) nor was given
    /// SIGUSR1 (`save_signal`), so no save could commit: the server did not wait.
    Unasked,
}

impl NoticeOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeOutcome::Saved => "saved",
            NoticeOutcome::TimedOut => "timed_out",
            NoticeOutcome::Interrupted => "interrupted",
            NoticeOutcome::NothingToSave => "nothing_to_save",
            NoticeOutcome::Unasked => "unasked",
        }
    }
}

/// Whether a save can commit at all: every running rank has said it saves on notice (and
/// reads the request in its heartbeat's answer), or is given SIGUSR1 (`save_signal`). A script
/// that never said so (an unchanged torchrun script, a shell loop) is not waited for: its stop
/// is as prompt as it was before saves on notice.
pub fn can_be_asked(saves_on_notice: impl IntoIterator<Item = bool>, signal: bool) -> bool {
    signal || saves_on_notice.into_iter().all(|h| h)
}

/// What an interruption with notice cost, as the summary, the CLI and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NoticeReport {
    pub cause: NoticeCause,
    pub outcome: NoticeOutcome,
    /// The step the next incarnation resumes from: the saved step, else the last checkpoint
    /// (null: none, it starts over).
    pub saved_at_step: Option<u64>,
    /// The furthest step any rank had reported when the ranks were ended (or, for a
    /// checkpoint, when the save ended).
    pub reached_step: Option<u64>,
    /// `reached_step - saved_at_step`: the steps the next incarnation has to do again (0 when
    /// the save committed).
    pub steps_lost: u64,
    /// From the request to the commit (or to giving up).
    pub wait_ms: f64,
    pub at: String,
}

/// The accounting of a notice: where the next incarnation resumes and how many steps it does
/// again. A save that committed resumes at its step; any other outcome at the newest committed
/// checkpoint (or step 0).
pub fn account(
    outcome: NoticeOutcome,
    saved: Option<u64>,
    last_checkpoint: Option<u64>,
    reached: Option<u64>,
) -> (Option<u64>, u64) {
    let resume = match (outcome, saved) {
        (NoticeOutcome::Saved, Some(step)) => Some(step.max(last_checkpoint.unwrap_or(0))),
        _ => last_checkpoint,
    };
    let lost = reached.unwrap_or(0).saturating_sub(resume.unwrap_or(0));
    (resume, lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_step_to_save_is_one_past_the_furthest_rank() {
        let table: &[(&[Option<u64>], u64)] = &[
            (&[], 1),
            (&[None, None], 1),
            (&[Some(7), None], 8),
            (&[Some(7), Some(9), Some(8)], 10),
            (&[Some(0)], 1),
        ];
        for (steps, want) in table {
            assert_eq!(first_by_step(steps.iter().copied()), *want, "{steps:?}");
        }
    }

    #[test]
    fn a_rank_that_missed_the_step_moves_it_past_itself() {
        // (by_step, rank's step, saved by_step) -> by_step
        let table = [
            ((10, 4, false), 10),  // not there yet
            ((10, 10, false), 10), // at the step: writing its part
            ((10, 10, true), 10),
            ((10, 11, true), 10), // saved, then went on (a checkpoint that does not halt)
            ((10, 11, false), 13),
            ((10, 40, false), 71), // 30 steps over: the next step is 30 ahead of it
        ];
        for ((by, step, saved), want) in table {
            assert_eq!(raised_by_step(by, step, saved), want, "{by} {step} {saved}");
        }
    }

    #[test]
    fn a_committed_save_loses_nothing_and_anything_else_falls_back() {
        use NoticeOutcome::*;
        // (outcome, saved, last checkpoint, reached) -> (resume, lost)
        let table = [
            ((Saved, Some(120), Some(100), Some(120)), (Some(120), 0)),
            ((Saved, Some(120), None, Some(120)), (Some(120), 0)),
            ((TimedOut, None, Some(100), Some(130)), (Some(100), 30)),
            ((TimedOut, None, None, Some(30)), (None, 30)),
            (
                (Interrupted, Some(120), Some(100), Some(121)),
                (Some(100), 21),
            ),
            ((NothingToSave, None, Some(100), None), (Some(100), 0)),
            // The ranks went past the saved step before they were ended (a checkpoint).
            ((Saved, Some(120), Some(100), Some(125)), (Some(120), 5)),
        ];
        for ((outcome, saved, last, reached), want) in table {
            assert_eq!(
                account(outcome, saved, last, reached),
                want,
                "{outcome:?} {saved:?} {last:?} {reached:?}"
            );
        }
    }

    #[test]
    fn a_save_is_awaited_only_when_every_rank_can_be_asked() {
        // (ranks that heartbeated, save_signal) -> wait for the save
        let table: &[(&[bool], bool, bool)] = &[
            (&[true, true], false, true),
            (&[true, false], false, false),
            (&[true, false], true, true),
            (&[false, false], true, true),
            (&[false], false, false),
        ];
        for (beats, signal, want) in table {
            assert_eq!(
                can_be_asked(beats.iter().copied(), *signal),
                *want,
                "{beats:?} {signal}"
            );
        }
    }

    #[test]
    fn survivors_save_the_last_round_when_it_is_newer_than_the_checkpoint() {
        let table = [
            ((None, None), None),
            ((Some(0), None), None),
            ((Some(7), None), Some(7)),
            ((Some(7), Some(5)), Some(7)),
            ((Some(5), Some(5)), None),
        ];
        for ((round, ckpt), want) in table {
            assert_eq!(survivors_step(round, ckpt), want, "{round:?} {ckpt:?}");
        }
        // (rank, world, dead) -> writes the dead ranks' parts
        assert!(writes_for_the_dead(0, 4, &[2]));
        assert!(!writes_for_the_dead(1, 4, &[2]));
        assert!(writes_for_the_dead(1, 4, &[0]));
        assert!(writes_for_the_dead(2, 4, &[0, 1]));
    }

    #[test]
    fn only_a_plain_checkpoint_lets_the_ranks_train_on() {
        for cause in [
            NoticeCause::Stop,
            NoticeCause::ServerShutdown,
            NoticeCause::Signal,
        ] {
            assert!(cause.halts(), "{cause:?}");
        }
        assert!(!NoticeCause::Checkpoint.halts());
    }
}
