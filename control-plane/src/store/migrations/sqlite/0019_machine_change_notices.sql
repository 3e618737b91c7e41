-- Kept in step with postgres/0019 (which announces machine events to every replica). SQLite
-- has one process: the store wakes its waiters itself after each commit.
SELECT 1;
