-- One word per concept: a tenant's machine is a "machine" at every layer (the API, the agent
-- protocol, these tables); "domain" is kept for the hypervisor's object. Renames only, no data
-- changes; constraints and indexes follow their tables by identity.
ALTER TABLE vms RENAME TO machines;
ALTER TABLE vm_events RENAME TO machine_events;
ALTER TABLE machine_events RENAME COLUMN vm_id TO machine_id;
ALTER TABLE tasks RENAME COLUMN vm_id TO machine_id;

ALTER INDEX vms_owner_hostname_live RENAME TO machines_owner_hostname_live;
ALTER INDEX vms_owner_seq RENAME TO machines_owner_seq;
ALTER INDEX vms_status RENAME TO machines_status;
ALTER INDEX vms_host RENAME TO machines_host;
ALTER INDEX vm_events_vm RENAME TO machine_events_machine;
ALTER INDEX tasks_vm RENAME TO tasks_machine;
