-- Two numbers instead of one `generation` (as neon's storage controller keeps them apart):
-- `version` is the row's compare-and-swap guard and moves on every write; `spec_generation`
-- is what agents are sent and moves only when what they build changes. Agents already hold
-- the old generation of each machine: starting spec_generation there keeps every agent's
-- copy current (a smaller one would be refused as stale).
ALTER TABLE machines RENAME COLUMN generation TO version;
ALTER TABLE machines ADD COLUMN spec_generation BIGINT NOT NULL DEFAULT 1;
UPDATE machines SET spec_generation = version;

-- An Idempotency-Key's outcome is domain data (which machine its request created), not a
-- rendered HTTP answer: the API renders the machine again on a replay. Finished keys keep
-- their machine, read from the Location they stored; a finished key without one (never
-- written) is forgotten rather than left looking like an abandoned claim.
ALTER TABLE idempotency_keys ADD COLUMN machine_id TEXT;
UPDATE idempotency_keys SET machine_id = substr(response_location, 18)
    WHERE response_status IS NOT NULL AND response_location LIKE '/api/v1/machines/%';
DELETE FROM idempotency_keys WHERE response_status IS NOT NULL AND machine_id IS NULL;
ALTER TABLE idempotency_keys DROP COLUMN response_status;
ALTER TABLE idempotency_keys DROP COLUMN response_body;
ALTER TABLE idempotency_keys DROP COLUMN response_location;
