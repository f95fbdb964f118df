-- The time the steps an incident lost had taken (its steps lost at the job's step time when it
-- was detected); null when unknown (no steps reported) or for incidents recorded before it.
ALTER TABLE incidents ADD COLUMN redo_s REAL;
