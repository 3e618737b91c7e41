-- Deprecated images (issue 14): new machines are refused, machines made from them keep
-- working and keep showing their image's name. The row is kept (machines' history names it).
ALTER TABLE images ADD COLUMN deprecated_at BIGINT;
