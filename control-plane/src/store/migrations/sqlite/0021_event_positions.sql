-- Kept in step with postgres/0021 (which numbers events in commit order for the event stream).
-- SQLite has one writer: `seq` is already that order.
SELECT 1;
