-- Log lines dropped by the per-job retention limit (oldest first).
ALTER TABLE jobs ADD COLUMN logs_dropped INTEGER NOT NULL DEFAULT 0;
