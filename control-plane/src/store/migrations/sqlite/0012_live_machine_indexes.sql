-- Indexes that hold live machines only, keyed as they are asked for. The reconciler reads
-- each host's live machines on every pass (1,000 hosts: 1,000 reads a pass) and the monitor
-- reads each transitional status's overdue machines every tick. With `deleted_at IS NULL` in
-- both, PostgreSQL without fresh statistics (autovacuum off, or a table that grew since its
-- last ANALYZE) combined `machines_host` with the partial unique index on live hostnames and
-- read every live machine's entry for each host: 3.5 ms a host at 20,000 machines, most of
-- PostgreSQL's CPU in a 1,000-host storm (issue 13). An index that is exactly the predicate
-- leaves the planner nothing better to guess.
CREATE INDEX machines_host_live ON machines (host_id) WHERE deleted_at IS NULL;
CREATE INDEX machines_status_live ON machines (status, status_changed_at) WHERE deleted_at IS NULL;
