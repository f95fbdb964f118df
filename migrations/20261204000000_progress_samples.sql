-- A job's progress over time, for its charts: one sample every max(2 s, running time / 1000),
-- so a week-long job keeps about 7,000 rows (the first minutes in detail, later ones coarser).
CREATE TABLE progress_samples (
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    at          TEXT NOT NULL,
    step        INTEGER,
    steps_per_s REAL,
    loss        REAL,
    PRIMARY KEY (job_id, at)
);
