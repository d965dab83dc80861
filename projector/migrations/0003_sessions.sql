-- Conversations kept for `x-nself-session-id`, each owned by the key that started it. The
-- conversation text lives only here: never in the ledger, which billing systems read.
CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- A session's messages in order (`seq` from 0): the requests' messages and the answers.
CREATE TABLE session_messages (
    session_id TEXT   NOT NULL,
    seq        BIGINT NOT NULL,
    role       TEXT   NOT NULL,
    content    TEXT   NOT NULL,
    created_at TEXT   NOT NULL,
    PRIMARY KEY (session_id, seq)
);
