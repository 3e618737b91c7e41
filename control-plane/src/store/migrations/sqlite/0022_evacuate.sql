-- Evacuating a host (issue 14): when an administrator asked for it (null: never, or ended
-- by an uncordon), and, on a machine being moved, the host its copy goes to
-- (its room there is claimed while it moves; it is on both hosts' books until the move ends
-- or is undone).
ALTER TABLE hosts ADD COLUMN evacuation_requested_at BIGINT;
ALTER TABLE machines ADD COLUMN move_to_host_id TEXT REFERENCES hosts (id);
-- The reconciler reads the machines of a host, those being moved to it included.
CREATE INDEX machines_move_to ON machines (move_to_host_id) WHERE move_to_host_id IS NOT NULL;

-- Tasks gain the kind `move`; SQLite cannot change a CHECK in place, so the table is made
-- again with its data, columns and indexes as they are (nothing references tasks).
CREATE TABLE tasks_new (
    id                   TEXT PRIMARY KEY,
    machine_id           TEXT NOT NULL REFERENCES machines (id),
    kind                 TEXT NOT NULL CHECK (kind IN ('provision', 'start', 'stop', 'reboot',
                                                       'delete', 'resize', 'rebuild', 'move')),
    -- queued (claimable when run_after has passed and no live lease), done, failed.
    state                TEXT NOT NULL CHECK (state IN ('queued', 'done', 'failed')),
    attempts             BIGINT NOT NULL DEFAULT 0,
    run_after            BIGINT NOT NULL,
    lease_owner          TEXT,
    lease_expires_at     BIGINT,
    last_error           TEXT,
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL,
    step_failures        BIGINT NOT NULL DEFAULT 0,
    waiting_for_capacity INTEGER NOT NULL DEFAULT 0
);
INSERT INTO tasks_new (id, machine_id, kind, state, attempts, run_after, lease_owner,
    lease_expires_at, last_error, created_at, updated_at, step_failures, waiting_for_capacity)
SELECT id, machine_id, kind, state, attempts, run_after, lease_owner, lease_expires_at,
    last_error, created_at, updated_at, step_failures, waiting_for_capacity FROM tasks;
DROP TABLE tasks;
ALTER TABLE tasks_new RENAME TO tasks;
CREATE INDEX tasks_machine ON tasks (machine_id);
CREATE INDEX tasks_queue ON tasks (run_after, created_at) WHERE state = 'queued';
CREATE INDEX tasks_finished ON tasks (updated_at) WHERE state IN ('done', 'failed');
CREATE INDEX tasks_waiting_for_capacity ON tasks (waiting_for_capacity)
    WHERE waiting_for_capacity = 1;
