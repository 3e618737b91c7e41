-- The claim walks queued tasks in due order and takes the first one no other task of its
-- machine holds a lease on. With (state, run_after) the planner scanned every queued task,
-- sorted them, and checked each one's machine through a bitmap of every queued task again:
-- O(backlog²) per storm, most of a PostgreSQL replica's CPU under a backlog of 2,000 (issue
-- 13). This index is the queue in claim order, so a claim reads past the leased and locked
-- tasks only; finished tasks, most of the table, are not in it.
DROP INDEX tasks_due;
CREATE INDEX tasks_queue ON tasks (run_after, created_at) WHERE state = 'queued';
-- Purging finished tasks (`Store::task_purge_finished`) reads by age among the finished ones.
CREATE INDEX tasks_finished ON tasks (updated_at) WHERE state IN ('done', 'failed');
