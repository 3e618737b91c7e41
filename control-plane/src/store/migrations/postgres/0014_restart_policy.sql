-- What happens when a machine's QEMU dies (issue 14): `never` (it reads stopped and waits for
-- its tenant) or `on-failure` (the reconciler starts it again, within limits). `restarts`
-- holds the times (Unix microseconds) of its recent automatic restarts as a JSON array, so
-- the limit holds across replicas and restarts of the control plane.
ALTER TABLE machines ADD COLUMN restart_policy TEXT NOT NULL DEFAULT 'never'
    CHECK (restart_policy IN ('never', 'on-failure'));
ALTER TABLE machines ADD COLUMN restarts TEXT NOT NULL DEFAULT '[]';
