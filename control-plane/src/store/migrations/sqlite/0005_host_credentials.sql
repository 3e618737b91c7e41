-- Per-host identity: an agent joins with the shared join token once and receives its host's
-- own credential, HMAC(server secret, host id, generation); the control plane stores no
-- secret, only whether one was issued and its generation. A host with `credential_issued = 1`
-- can be registered only with its credential. Resetting a lost credential bumps the
-- generation (the old one stops working) and opens the host to the join token again.
ALTER TABLE hosts ADD COLUMN credential_generation BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN credential_issued BIGINT NOT NULL DEFAULT 0;
