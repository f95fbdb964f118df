-- One row per failure of a job and the recovery from it (a group restart is one incident).
-- Times are RFC 3339 UTC strings, as everywhere; the phases are in order:
-- detected_at <= spawned_at <= first_heartbeat_at <= training_at.
CREATE TABLE incidents (
    job_id             TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq                INTEGER NOT NULL,        -- 1, 2, ... within the job
    rank               INTEGER NOT NULL,        -- the rank whose failure started it
    reason             TEXT NOT NULL,           -- exit_code | signal | heartbeat_timeout | ...
    detail             TEXT NOT NULL,
    scope              TEXT NOT NULL,           -- worker | job
    ranks              TEXT NOT NULL,           -- JSON array of the ranks restarted for it
    backoff_ms         INTEGER NOT NULL,
    detected_at        TEXT NOT NULL,
    spawned_at         TEXT,                    -- every replacement running
    first_heartbeat_at TEXT,
    training_at        TEXT,                    -- every replaced rank stepped past resumed_step
    ended_at           TEXT,
    end_state          TEXT NOT NULL,           -- open | recovered | job_ended | server_restart | failed_again
    last_step          INTEGER,                 -- highest step of the restarted ranks at the failure
    resumed_step       INTEGER,                 -- the checkpoint resumed from (NULL: the start)
    steps_lost         INTEGER NOT NULL,        -- last_step - resumed_step: done again
    seconds_lost       REAL NOT NULL,           -- detected_at to training_at (or ended_at)
    stacks             TEXT NOT NULL DEFAULT '[]', -- JSON: every rank's stacks before a hung rank was killed
    PRIMARY KEY (job_id, seq)
);
