-- Provision tasks that found no room wait here until capacity may have changed (a host
-- joined, came back, changed its size or problems, was uncordoned, or a machine left one),
-- instead of each retrying every 2 s: a backlog cost work in proportion to its size while
-- nothing changed (issues 12 and 13).
ALTER TABLE tasks ADD COLUMN waiting_for_capacity INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tasks_waiting_for_capacity ON tasks (waiting_for_capacity)
    WHERE waiting_for_capacity = 1;
-- Moves on with every such change. A task parks only if it has not moved since its placement
-- attempt read it, so a change that lands meanwhile is never missed.
CREATE TABLE capacity_epoch (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL
);
INSERT INTO capacity_epoch (id, epoch) VALUES (1, 0);
