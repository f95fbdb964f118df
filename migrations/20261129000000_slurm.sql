-- Where every incarnation ran: the Slurm node of its step, or this host's name for the
-- local launcher. NULL for rows written before launchers existed.
ALTER TABLE incarnations ADD COLUMN node TEXT;

-- Nodes a job stopped using after its ranks kept failing there (bad-node quarantine), or
-- after Slurm reported the node down. Later launches of the job pass them to --exclude.
CREATE TABLE excluded_nodes (
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    node        TEXT NOT NULL,
    excluded_at TEXT NOT NULL,
    failures    INTEGER NOT NULL,          -- failures of the job's ranks on it when excluded
    reason      TEXT NOT NULL,             -- node_failure | repeated_failures
    detail      TEXT,
    PRIMARY KEY (job_id, node)
);
