-- Web console sessions signed out before they expired, so that every gateway sharing the read
-- models refuses them (a session cookie is otherwise valid on any gateway until it expires).
-- Like conversation sessions, written by the gateways directly, not folded from the ledger.
CREATE TABLE console_sign_outs (
    session_id TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
