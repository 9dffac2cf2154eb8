-- Which process runs each master id (review of issue 15): a random token per master process. Two
-- processes with one id (a copied data dir, a restored backup of DATA_DIR) are told apart by it:
-- the second refuses to start while the first heartbeats, and a stale one's heartbeat fails.
ALTER TABLE masters ADD COLUMN instance TEXT NOT NULL DEFAULT '';
