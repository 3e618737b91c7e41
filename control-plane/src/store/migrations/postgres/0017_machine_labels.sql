-- Machine labels (issue 15). `machines.labels` is the set as shown (a JSON object);
-- `machine_labels` holds the same pairs one per row, written in the same transactions, so a
-- list filtered by a label probes an index instead of parsing every machine's JSON.
ALTER TABLE machines ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
CREATE TABLE machine_labels (
    machine_id TEXT NOT NULL REFERENCES machines (id),
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (machine_id, key)
);
CREATE INDEX machine_labels_pair ON machine_labels (key, value, machine_id);
