-- trainvisor history. Times are RFC 3339 UTC strings with microseconds
-- ('2026-11-28T14:03:00.123456Z'), so sqlite3's datetime() and plain string
-- comparison both work on them.

CREATE TABLE jobs (
    id          TEXT PRIMARY KEY,          -- UUID
    name        TEXT,
    spec        TEXT NOT NULL,             -- the resolved job spec, JSON
    state       TEXT NOT NULL,             -- pending | running | succeeded | failed | stopped
    world_size  INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT,
    reason      TEXT,                      -- why it failed or was stopped
    summary     TEXT                       -- final summary JSON, written when the job ends
);
CREATE INDEX jobs_state ON jobs(state);

-- One row per process launched for a rank (an "incarnation"). attempt counts from 0.
CREATE TABLE incarnations (
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    rank        INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    pid         INTEGER,                   -- NULL when the spawn failed
    master_port INTEGER NOT NULL,
    token_hash  TEXT NOT NULL,             -- sha256 of TRAINVISOR_TOKEN, never the token
    started_at  TEXT NOT NULL,
    ended_at    TEXT,
    exit_code   INTEGER,
    signal      INTEGER,
    outcome     TEXT,                      -- succeeded | exit_code | signal | heartbeat_timeout | spawn_error | stopped | server_restart
    PRIMARY KEY (job_id, rank, attempt)
);

-- One row per restart decision. For restart_scope = job, one row names the rank that failed;
-- every rank of the job is relaunched with attempt + 1.
CREATE TABLE restarts (
    id           INTEGER PRIMARY KEY,
    job_id       TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    rank         INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,         -- the attempt that was launched by this restart
    scope        TEXT NOT NULL,            -- worker | job
    reason       TEXT NOT NULL,            -- exit_code | signal | heartbeat_timeout | spawn_error | server_restart
    exit_code    INTEGER,
    signal       INTEGER,
    detail       TEXT,                     -- human-readable cause and the last lines the rank printed
    detected_at  TEXT NOT NULL,
    backoff_ms   INTEGER NOT NULL,
    restarted_at TEXT,                     -- when the replacement was spawned
    UNIQUE (job_id, rank, attempt)
);
CREATE INDEX restarts_job ON restarts(job_id, detected_at);

-- Every line every rank printed, plus trainvisor's own notes (stream = 'system').
-- seq is global and strictly increasing; it is the SSE event id.
CREATE TABLE logs (
    seq     INTEGER PRIMARY KEY,
    job_id  TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    rank    INTEGER,
    attempt INTEGER,
    stream  TEXT NOT NULL,                 -- stdout | stderr | system
    ts      TEXT NOT NULL,
    line    TEXT NOT NULL
);
CREATE INDEX logs_job_seq ON logs(job_id, seq);
CREATE INDEX logs_job_rank_seq ON logs(job_id, rank, seq);
