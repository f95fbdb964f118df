//! SQLite access. Reads go through the pool from anywhere; every write a running job makes
//! goes through the single `Recorder` task, in order and batched.

pub mod health;
pub mod history;
pub mod jobs;
pub mod logs;
pub mod recorder;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use health::{StoreHealth, is_storage_fault};
pub use recorder::Recorder;

/// Opens (creating if needed) `<data_dir>/trainvisor.db` in WAL mode and applies migrations.
pub async fn open(data_dir: &Path) -> anyhow::Result<SqlitePool> {
    let path = data_dir.join("trainvisor.db");
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true)
        // The WAL is truncated back to this after a checkpoint, so space a burst of writes
        // took is given back (and is there for the catch-up after a full disk).
        .pragma("journal_size_limit", (64u64 << 20).to_string());
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    Ok(pool)
}

pub use crate::domain::{now, ts};
