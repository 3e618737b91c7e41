-- SkyGate schema v1 (SQLite). Ids are UUID text, times are Unix microseconds (UTC), JSON is text.
-- Kept column-for-column equal to postgres/0001_init.sql: the store's SQL is shared.

CREATE TABLE users (
    id              TEXT PRIMARY KEY,
    username        TEXT NOT NULL UNIQUE,
    email           TEXT NOT NULL UNIQUE,
    password_hash   TEXT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('user', 'admin')),
    session_version BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

CREATE TABLE refresh_tokens (
    id                TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    family_id         TEXT NOT NULL,
    family_created_at BIGINT NOT NULL,
    token_hash        TEXT NOT NULL UNIQUE,
    expires_at        BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    revoked_at        BIGINT,
    replaced_by       TEXT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);

CREATE TABLE login_failures (
    username     TEXT PRIMARY KEY,
    window_start BIGINT NOT NULL,
    failures     BIGINT NOT NULL
);

CREATE TABLE images (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    source     TEXT NOT NULL,
    format     TEXT NOT NULL,
    sha256     TEXT,
    boot       TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE ssh_keys (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (user_id, name)
);

CREATE TABLE hosts (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    grpc_address      TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('ready', 'cordoned', 'unreachable')),
    hypervisor        TEXT NOT NULL,
    vcpus             BIGINT NOT NULL,
    memory_mib        BIGINT NOT NULL,
    disk_gib          BIGINT NOT NULL,
    labels            TEXT NOT NULL DEFAULT '{}',
    last_heartbeat_at BIGINT,
    created_at        BIGINT NOT NULL
);

-- seq gives keyset pagination a strictly increasing, unique sort key.
CREATE TABLE vms (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    owner_id       TEXT NOT NULL REFERENCES users (id),
    hostname       TEXT NOT NULL,
    status         TEXT NOT NULL,
    desired_state  TEXT NOT NULL,
    host_id        TEXT REFERENCES hosts (id),
    image_id       TEXT NOT NULL REFERENCES images (id),
    vcpus          BIGINT NOT NULL,
    memory_mib     BIGINT NOT NULL,
    disk_gib       BIGINT NOT NULL,
    ssh_keys       TEXT NOT NULL,
    user_data      TEXT,
    network        TEXT,
    failure_reason TEXT,
    generation     BIGINT NOT NULL DEFAULT 1,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    deleted_at     BIGINT
);
CREATE UNIQUE INDEX vms_owner_hostname_live ON vms (owner_id, hostname) WHERE deleted_at IS NULL;
CREATE INDEX vms_owner_seq ON vms (owner_id, seq);
CREATE INDEX vms_status ON vms (status);

CREATE TABLE vm_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id      TEXT NOT NULL REFERENCES vms (id),
    action     TEXT NOT NULL,
    status     TEXT NOT NULL,
    message    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX vm_events_vm ON vm_events (vm_id, seq);

CREATE TABLE idempotency_keys (
    user_id         TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key             TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    -- Which request holds the key: completion and release only act on their own claim.
    claim_id        TEXT NOT NULL,
    response_status BIGINT,
    response_body   TEXT,
    response_location TEXT,
    locked_until    BIGINT,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
