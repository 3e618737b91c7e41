-- What each tenant's live machines hold, kept by the transactions that create and delete
-- them, so that a create checks its quota against one row instead of summing every live
-- machine of the tenant (issue 12: the sum made creates slower as a tenant grew). Rows are
-- made on a tenant's first create; existing tenants start from what they hold now.
CREATE TABLE tenant_usage (
    owner_id   TEXT PRIMARY KEY REFERENCES users (id),
    machines   BIGINT NOT NULL,
    vcpus      BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL
);
INSERT INTO tenant_usage (owner_id, machines, vcpus, memory_mib)
    SELECT owner_id, COUNT(*), SUM(vcpus), SUM(memory_mib) FROM machines
    WHERE deleted_at IS NULL GROUP BY owner_id;
