//! States as data: a job's lifecycle, a rank's state as its Job sees it, and how one
//! incarnation of a rank ended. Their strings are what the database and the API carry.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A job's lifecycle: `pending → running → succeeded | failed | stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Stopped,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Stopped => "stopped",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Stopped
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "stopped" => JobState::Stopped,
            _ => return None,
        })
    }
}

impl<'de> Deserialize<'de> for JobState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        JobState::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown state {s}")))
    }
}

/// Where a rank stands, as its Job sees it, with when it got there (pueue's `TaskStatus`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankState {
    Pending,
    /// Its incarnation's row is being written or its process started.
    Starting {
        since: DateTime<Utc>,
    },
    Running {
        since: DateTime<Utc>,
    },
    /// Waiting out its backoff before the next launch.
    Backoff {
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    },
    Stopping {
        since: DateTime<Utc>,
    },
    Succeeded {
        at: DateTime<Utc>,
    },
    /// Failed for good, or stopped because the group failed; `outcome` says how its last
    /// incarnation ended when it was the cause.
    Failed {
        at: DateTime<Utc>,
        outcome: Option<Outcome>,
    },
    Stopped {
        at: DateTime<Utc>,
    },
}

impl RankState {
    pub fn starting() -> Self {
        RankState::Starting { since: Utc::now() }
    }

    pub fn running() -> Self {
        RankState::Running { since: Utc::now() }
    }

    pub fn backoff(ms: u64) -> Self {
        let since = Utc::now();
        let until = since + chrono::Duration::milliseconds(ms.min(i64::MAX as u64) as i64);
        RankState::Backoff { since, until }
    }

    pub fn stopping() -> Self {
        RankState::Stopping { since: Utc::now() }
    }

    pub fn succeeded() -> Self {
        RankState::Succeeded { at: Utc::now() }
    }

    pub fn failed(outcome: Option<Outcome>) -> Self {
        RankState::Failed {
            at: Utc::now(),
            outcome,
        }
    }

    pub fn stopped() -> Self {
        RankState::Stopped { at: Utc::now() }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RankState::Pending => "pending",
            RankState::Starting { .. } => "starting",
            RankState::Running { .. } => "running",
            RankState::Backoff { .. } => "backoff",
            RankState::Stopping { .. } => "stopping",
            RankState::Succeeded { .. } => "succeeded",
            RankState::Failed { .. } => "failed",
            RankState::Stopped { .. } => "stopped",
        }
    }

    /// When the rank got into this state (none while pending).
    pub fn since(self) -> Option<DateTime<Utc>> {
        match self {
            RankState::Pending => None,
            RankState::Starting { since }
            | RankState::Running { since }
            | RankState::Backoff { since, .. }
            | RankState::Stopping { since } => Some(since),
            RankState::Succeeded { at }
            | RankState::Failed { at, .. }
            | RankState::Stopped { at } => Some(at),
        }
    }

    /// A process exists or is being spawned.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            RankState::Starting { .. } | RankState::Running { .. } | RankState::Stopping { .. }
        )
    }

    pub fn is_succeeded(self) -> bool {
        matches!(self, RankState::Succeeded { .. })
    }

    pub fn is_failed(self) -> bool {
        matches!(self, RankState::Failed { .. })
    }
}

/// How one incarnation of a rank ended: the `outcome` of an incarnation row and the `reason`
/// of a restart row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    ExitCode,
    Signal,
    HeartbeatTimeout,
    SpawnError,
    Stopped,
    ServerRestart,
    /// The rank's node went down (or stopped responding).
    NodeFailure,
    /// The kernel's OOM killer ended the rank at its memory limit (a container's limit).
    OomKilled,
    /// Restarted for stepping too slowly (`straggler_action: restart`).
    Straggler,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Succeeded,
        Outcome::ExitCode,
        Outcome::Signal,
        Outcome::HeartbeatTimeout,
        Outcome::SpawnError,
        Outcome::Stopped,
        Outcome::ServerRestart,
        Outcome::NodeFailure,
        Outcome::OomKilled,
        Outcome::Straggler,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::ExitCode => "exit_code",
            Outcome::Signal => "signal",
            Outcome::HeartbeatTimeout => "heartbeat_timeout",
            Outcome::SpawnError => "spawn_error",
            Outcome::Stopped => "stopped",
            Outcome::ServerRestart => "server_restart",
            Outcome::NodeFailure => "node_failure",
            Outcome::OomKilled => "oom_killed",
            Outcome::Straggler => "straggler",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// A failure of the rank (not an end the job asked for or a success).
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Succeeded | Outcome::Stopped)
    }
}

/// What the supervisor had done to an incarnation before it exited, in precedence order: an
/// incarnation declared hung and then killed ended because it hung, whatever the kill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Nothing: the process ended on its own.
    Natural,
    /// Asked to stop (the job stops, or a group restart).
    Terminated,
    /// Declared hung (no heartbeat for the job's timeout) and killed.
    Hung,
    /// Declared a straggler and restarted (`straggler_action: restart`).
    Straggler,
}

/// How a launcher saw a process end.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Something the launcher knows beyond the code: the node failed, the OOM killer struck,
    /// or the exit could not be observed.
    pub cause: Option<ExitCause>,
    /// When the launcher saw the process end, when that was before the exit was known (a
    /// container's end is seen through its host pid before the engine reports its code):
    /// the instant the failure was detected.
    pub seen_at: Option<std::time::Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitCause {
    NodeFailure(String),
    OomKilled,
    Unobserved(String),
}

impl Exit {
    /// The one place an exit becomes an outcome.
    pub fn outcome(&self, ending: Ending) -> Outcome {
        match (ending, &self.cause) {
            (Ending::Hung, _) => Outcome::HeartbeatTimeout,
            (Ending::Straggler, _) => Outcome::Straggler,
            (_, Some(ExitCause::NodeFailure(_))) => Outcome::NodeFailure,
            (_, Some(ExitCause::OomKilled)) => Outcome::OomKilled,
            (Ending::Terminated, _) => Outcome::Stopped,
            _ if self.code == Some(0) => Outcome::Succeeded,
            _ if self.signal.is_some() => Outcome::Signal,
            _ => Outcome::ExitCode,
        }
    }

    /// The human half of a restart row's `detail`.
    pub fn describe(&self, outcome: Outcome, heartbeat_timeout_s: f64) -> String {
        match (&self.cause, outcome) {
            (Some(ExitCause::Unobserved(e)), _) => format!("could not wait for the process: {e}"),
            (_, Outcome::HeartbeatTimeout) => {
                format!("no heartbeat for {heartbeat_timeout_s:.3}s (heartbeat_timeout_s)")
            }
            (_, Outcome::Straggler) => {
                "stepped slower than the job's median for straggler_window_s (straggler_action: restart)"
                    .to_string()
            }
            (Some(ExitCause::NodeFailure(what)), _) => what.clone(),
            (Some(ExitCause::OomKilled), _) => {
                "killed by the OOM killer at its memory limit".to_string()
            }
            _ => match (self.signal, self.code) {
                (Some(sig), _) => format!("killed by signal {sig} ({})", signal_name(sig)),
                (_, Some(code)) => format!("exited with code {code}"),
                _ => "exited".to_string(),
            },
        }
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_becomes_one_outcome_by_precedence() {
        let killed = Exit {
            signal: Some(9),
            ..Exit::default()
        };
        assert_eq!(killed.outcome(Ending::Hung), Outcome::HeartbeatTimeout);
        assert_eq!(killed.outcome(Ending::Terminated), Outcome::Stopped);
        assert_eq!(killed.outcome(Ending::Natural), Outcome::Signal);
        let node = Exit {
            cause: Some(ExitCause::NodeFailure("its Slurm node n2 failed".into())),
            ..Exit::default()
        };
        assert_eq!(node.outcome(Ending::Terminated), Outcome::NodeFailure);
        let oom = Exit {
            code: Some(137),
            cause: Some(ExitCause::OomKilled),
            ..Exit::default()
        };
        assert_eq!(oom.outcome(Ending::Natural), Outcome::OomKilled);
        let ok = Exit {
            code: Some(0),
            ..Exit::default()
        };
        assert_eq!(ok.outcome(Ending::Natural), Outcome::Succeeded);
        assert_eq!(
            Exit {
                code: Some(3),
                ..Exit::default()
            }
            .describe(Outcome::ExitCode, 1.0),
            "exited with code 3"
        );
    }

    #[test]
    fn outcome_strings_round_trip() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
    }
}
