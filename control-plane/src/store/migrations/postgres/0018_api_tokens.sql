-- API tokens for automation (issue 15): named, scoped (read or full), expiring bearer
-- secrets of one account. Only the SHA-256 of a token is stored; revoking one deletes it.
CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    scope        TEXT NOT NULL CHECK (scope IN ('read', 'full')),
    expires_at   BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    UNIQUE (user_id, name)
);
