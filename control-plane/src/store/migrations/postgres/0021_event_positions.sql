-- The event stream (GET /events, issue 15) needs every event in the order its transaction
-- committed, and `seq` is not that order: an identity number is taken at INSERT and becomes
-- visible at COMMIT, so a reader can see 11 while 10's transaction is still open, and a
-- stream that moved past 11 would never send 10. `position` is given at commit instead: a
-- deferred trigger runs at each event-writing transaction's COMMIT, takes one advisory lock
-- (held until the transaction ends) and numbers its events from a sequence. Transactions that
-- write events therefore number them one after another, each finished before the next takes
-- the lock, so a visible position N+1 means N is visible too, or was never committed. (These
-- transactions already take turns at commit: each NOTIFYs, migration 0019.)
ALTER TABLE machine_events ADD COLUMN position BIGINT;
UPDATE machine_events SET position = seq;
CREATE SEQUENCE machine_events_position_seq;
SELECT setval('machine_events_position_seq',
              COALESCE((SELECT MAX(seq) FROM machine_events), 0) + 1, false);
CREATE UNIQUE INDEX machine_events_position_idx ON machine_events (position);
CREATE FUNCTION skygate_machine_event_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- 0x53474556, "SGEV": SkyGate's events.
    PERFORM pg_advisory_xact_lock(1397179734);
    UPDATE machine_events SET position = nextval('machine_events_position_seq')
        WHERE seq = NEW.seq;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER machine_events_position AFTER INSERT ON machine_events
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION skygate_machine_event_position();
