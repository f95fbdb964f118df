//! The domain: plain types and decisions the actors, the store and the API share. Nothing
//! here knows actix or sqlx, so every rule in it is testable without a server.

pub mod error_file;
pub mod failure_policy;
pub mod incident;
pub mod liveness;
pub mod progress;
pub mod python_command;
pub mod rank;
pub mod restart;
pub mod state;
pub mod straggler;
pub mod verdict;
pub mod worker_env;

pub use rank::RankSlot;
pub use restart::{Decision, RestartCounts, RestartPolicy, RestartScope};
pub use state::{Ending, Exit, ExitCause, JobState, Outcome, RankState};

use chrono::{DateTime, SecondsFormat, Utc};

/// The one timestamp format of the database and the API: RFC 3339, UTC, microseconds.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn now() -> String {
    ts(Utc::now())
}
