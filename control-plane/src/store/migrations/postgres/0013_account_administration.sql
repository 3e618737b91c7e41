-- Account administration (issue 14): an administrator can disable an account (its tokens stop
-- working at once; its machines keep running) and give a tenant limits of its own. A null
-- limit is the server-wide default (the --quota-* flags), so changing a flag still reaches
-- every tenant nobody gave limits to. They live on the account row because every request
-- already reads that row, from the replica's cache of accounts: a create learns its owner's
-- limits without another query.
ALTER TABLE users ADD COLUMN disabled_at BIGINT;
ALTER TABLE users ADD COLUMN max_machines BIGINT;
ALTER TABLE users ADD COLUMN max_vcpus BIGINT;
ALTER TABLE users ADD COLUMN max_memory_mib BIGINT;
