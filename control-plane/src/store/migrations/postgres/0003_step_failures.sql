-- Failing agent steps are retried a bounded number of times, then the machine fails with the
-- step's reason: the count lives on the task, apart from `attempts` (which also counts waits
-- for capacity or for an unreachable host).
ALTER TABLE tasks ADD COLUMN step_failures BIGINT NOT NULL DEFAULT 0;

-- What a host's agent reports wrong with itself on every heartbeat (a tool that does not
-- run, an unwritable data dir), one problem a line; empty when healthy. Placement skips a
-- host with problems, and admins see them in GET /hosts.
ALTER TABLE hosts ADD COLUMN problems TEXT NOT NULL DEFAULT '';
