-- The audit log (issue 14): every mutating call by anyone and every login, who, what, target,
-- outcome, request id, client address and time. Rows are only added, and removed when older
-- than the retention (--audit-retention-days). `actor_id` is the authenticated caller;
-- `actor_name` the username a login or registration named (no token yet), so an account's
-- owner also sees the attempts made on its name.
CREATE TABLE audit_events (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         BIGINT NOT NULL,
    actor_id   TEXT,
    actor_name TEXT,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    outcome    BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    client     TEXT NOT NULL
);
CREATE INDEX audit_events_actor ON audit_events (actor_id, seq);
CREATE INDEX audit_events_actor_name ON audit_events (actor_name, seq);
CREATE INDEX audit_events_at ON audit_events (at);
