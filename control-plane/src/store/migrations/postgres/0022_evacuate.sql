-- Evacuating a host (issue 14): when an administrator asked for it (null: never, or ended
-- by an uncordon), and, on a machine being moved, the host its copy goes to
-- (its room there is claimed while it moves; it is on both hosts' books until the move ends
-- or is undone).
ALTER TABLE hosts ADD COLUMN evacuation_requested_at BIGINT;
ALTER TABLE machines ADD COLUMN move_to_host_id TEXT REFERENCES hosts (id);
-- The reconciler reads the machines of a host, those being moved to it included.
CREATE INDEX machines_move_to ON machines (move_to_host_id) WHERE move_to_host_id IS NOT NULL;
-- Tasks gain the kind `move`.
ALTER TABLE tasks DROP CONSTRAINT tasks_kind_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_kind_check
    CHECK (kind IN ('provision', 'start', 'stop', 'reboot', 'delete', 'resize', 'rebuild',
                    'move'));
