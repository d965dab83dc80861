-- How long each served request took, for the console's recent-requests view (rows folded
-- before this column existed keep NULL until the projection is rebuilt from the ledger).
ALTER TABLE requests ADD COLUMN latency_ms BIGINT;
