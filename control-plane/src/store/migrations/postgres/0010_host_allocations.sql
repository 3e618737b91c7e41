-- What each host's live machines hold, kept by the transactions that place a machine there
-- and that stamp one deleted, so that placement reads one row per host and claims on the one
-- row it spends, instead of summing every live machine of every host under a lock on every
-- host (issue 13: each placement cost O(live machines), and placements ran one at a time).
-- Existing hosts start from what they hold now.
ALTER TABLE hosts ADD COLUMN allocated_machines BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN allocated_vcpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN allocated_memory_mib BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN allocated_disk_gib BIGINT NOT NULL DEFAULT 0;
UPDATE hosts SET
    allocated_machines = (SELECT COUNT(*) FROM machines m
        WHERE m.host_id = hosts.id AND m.deleted_at IS NULL),
    allocated_vcpus = (SELECT COALESCE(SUM(m.vcpus), 0) FROM machines m
        WHERE m.host_id = hosts.id AND m.deleted_at IS NULL),
    allocated_memory_mib = (SELECT COALESCE(SUM(m.memory_mib), 0) FROM machines m
        WHERE m.host_id = hosts.id AND m.deleted_at IS NULL),
    allocated_disk_gib = (SELECT COALESCE(SUM(m.disk_gib), 0) FROM machines m
        WHERE m.host_id = hosts.id AND m.deleted_at IS NULL);
