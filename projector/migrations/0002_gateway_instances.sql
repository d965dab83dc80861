-- Gateways that serve from these read models, each announcing itself every few seconds, so
-- that each can enforce its share of a key's rate limit (distributed mode). RFC 3339 UTC text.
CREATE TABLE gateway_instances (
    instance TEXT PRIMARY KEY,
    seen_at  TEXT NOT NULL
);
