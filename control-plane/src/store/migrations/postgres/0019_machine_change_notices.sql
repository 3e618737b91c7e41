-- Every machine event is announced on channel skygate_machines with the machine's id, from
-- inside the transaction that writes it, so the notice is delivered when that commits (issue
-- 15: GET /machines/{id}/wait wakes on it, on every replica). PostgreSQL folds identical
-- notices of one transaction into one.
CREATE FUNCTION skygate_machine_event_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('skygate_machines', NEW.machine_id);
    RETURN NULL;
END
$$;
CREATE TRIGGER machine_events_notify AFTER INSERT ON machine_events
    FOR EACH ROW EXECUTE FUNCTION skygate_machine_event_notify();
