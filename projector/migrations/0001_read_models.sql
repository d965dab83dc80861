-- Read models folded from the ledger. Portable SQL: the same file runs on SQLite (embedded)
-- and PostgreSQL (distributed). Integers are BIGINT, timestamps RFC 3339 text in UTC
-- (lexicographic order = time order), money in nano-dollars.

CREATE TABLE keys (
    id            TEXT PRIMARY KEY,
    name          TEXT   NOT NULL,
    key_prefix    TEXT   NOT NULL,
    key_hash      TEXT   NOT NULL UNIQUE,
    rpm_limit     BIGINT NOT NULL,
    admin_allowed BIGINT NOT NULL,
    created_at    TEXT   NOT NULL,
    revoked_at    TEXT,
    revoke_reason TEXT,
    last_used_at  TEXT
);

-- All-time totals per key and tier.
CREATE TABLE key_totals (
    key_id            TEXT   NOT NULL,
    tier              TEXT   NOT NULL,
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    cost_nanos        BIGINT NOT NULL,
    PRIMARY KEY (key_id, tier)
);

-- Usage per key, UTC day, served model and tier.
CREATE TABLE usage_daily (
    key_id            TEXT   NOT NULL,
    day               TEXT   NOT NULL,
    model             TEXT   NOT NULL,
    tier              TEXT   NOT NULL,
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    cost_nanos        BIGINT NOT NULL,
    PRIMARY KEY (key_id, day, model, tier)
);

-- One row per served request, for exact time-window queries.
CREATE TABLE requests (
    event_id          TEXT PRIMARY KEY,
    request_id        TEXT   NOT NULL,
    key_id            TEXT   NOT NULL,
    occurred_at       TEXT   NOT NULL,
    model             TEXT   NOT NULL,
    tier              TEXT   NOT NULL,
    provider          TEXT   NOT NULL,
    status            BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    cost_nanos        BIGINT NOT NULL
);
CREATE INDEX requests_by_key_time ON requests (key_id, occurred_at);
CREATE INDEX requests_by_time ON requests (occurred_at);

-- Idempotency guard: an event is folded at most once.
CREATE TABLE applied_events (
    event_id TEXT PRIMARY KEY
);

-- How far the projection has folded each ledger partition (next offset to apply).
CREATE TABLE projector_offsets (
    source      TEXT   NOT NULL,
    ledger_partition BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (source, ledger_partition)
);
