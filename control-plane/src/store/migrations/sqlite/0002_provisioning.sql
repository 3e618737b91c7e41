-- Provisioning: agents register hosts, machines are placed, and every lifecycle action is a
-- durable task claimed with a lease.

-- `state` keeps reachability (ready | unreachable); cordoning is separate so a cordoned host
-- that goes away and comes back is still cordoned.
ALTER TABLE hosts ADD COLUMN cordoned BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN agent_version TEXT NOT NULL DEFAULT '';
ALTER TABLE hosts ADD COLUMN domain_prefix TEXT NOT NULL DEFAULT '';
ALTER TABLE hosts ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0;

-- When the machine entered its current status: transitional statuses have deadlines.
ALTER TABLE vms ADD COLUMN status_changed_at BIGINT NOT NULL DEFAULT 0;
UPDATE vms SET status_changed_at = updated_at;
CREATE INDEX vms_host ON vms (host_id);

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    vm_id            TEXT NOT NULL REFERENCES vms (id),
    kind             TEXT NOT NULL CHECK (kind IN ('provision', 'start', 'stop', 'reboot', 'delete')),
    -- queued (claimable when run_after has passed and no live lease), done, failed.
    state            TEXT NOT NULL CHECK (state IN ('queued', 'done', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    run_after        BIGINT NOT NULL,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX tasks_due ON tasks (state, run_after);
CREATE INDEX tasks_vm ON tasks (vm_id);
