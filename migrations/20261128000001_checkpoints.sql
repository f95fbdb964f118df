-- Committed checkpoints, one row per step (manifest written, LATEST moved).
CREATE TABLE checkpoints (
    job_id       TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    step         INTEGER NOT NULL,
    committed_at TEXT NOT NULL,
    bytes        INTEGER NOT NULL,          -- all parts together
    location     TEXT NOT NULL,             -- the step directory (path or URL)
    manifest     TEXT NOT NULL,             -- manifest.json as committed
    commit_ms    REAL NOT NULL,             -- last part registered -> LATEST durable
    pruned_at    TEXT,                      -- deleted by retention (keep_last)
    PRIMARY KEY (job_id, step)
);
