-- One word per concept: a tenant's machine is a "machine" at every layer (the API, the agent
-- protocol, these tables); "domain" is kept for the hypervisor's object. Renames only, no data
-- changes. SQLite rewrites the foreign keys and index definitions that name the renamed
-- tables and columns; indexes cannot be renamed, so they are recreated under the new names.
ALTER TABLE vms RENAME TO machines;
ALTER TABLE vm_events RENAME TO machine_events;
ALTER TABLE machine_events RENAME COLUMN vm_id TO machine_id;
ALTER TABLE tasks RENAME COLUMN vm_id TO machine_id;

DROP INDEX vms_owner_hostname_live;
CREATE UNIQUE INDEX machines_owner_hostname_live ON machines (owner_id, hostname)
    WHERE deleted_at IS NULL;
DROP INDEX vms_owner_seq;
CREATE INDEX machines_owner_seq ON machines (owner_id, seq);
DROP INDEX vms_status;
CREATE INDEX machines_status ON machines (status);
DROP INDEX vms_host;
CREATE INDEX machines_host ON machines (host_id);
DROP INDEX vm_events_vm;
CREATE INDEX machine_events_machine ON machine_events (machine_id, seq);
DROP INDEX tasks_vm;
CREATE INDEX tasks_machine ON tasks (machine_id);
