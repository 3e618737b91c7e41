-- Resize and rebuild (issue 15): a machine's disk generation moves with every rebuild (the
-- agent makes a fresh disk when the spec's is above the one it recorded), and tasks gain the
-- two kinds that carry them out.
ALTER TABLE machines ADD COLUMN disk_generation BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks DROP CONSTRAINT tasks_kind_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_kind_check
    CHECK (kind IN ('provision', 'start', 'stop', 'reboot', 'delete', 'resize', 'rebuild'));
