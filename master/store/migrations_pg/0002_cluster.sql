-- Cluster state (issue 15): the masters registry, which master holds which agent's session (with
-- an epoch: +1 per claim, so a second handshake on any master supersedes the first), and leases
-- (the singleton's). The same tables as the SQLite store's 0002.
CREATE TABLE IF NOT EXISTS masters (
    id text PRIMARY KEY, urls text NOT NULL DEFAULT '[]', started_at double precision NOT NULL,
    heartbeat_at double precision NOT NULL, agents integer NOT NULL DEFAULT 0);
-- a dropped session keeps its row with master_id NULL: epochs only ever grow
CREATE TABLE IF NOT EXISTS sessions (
    uuid text PRIMARY KEY, master_id text, epoch bigint NOT NULL DEFAULT 0, since double precision);
CREATE INDEX IF NOT EXISTS sessions_master ON sessions(master_id) WHERE master_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (name text PRIMARY KEY, holder text NOT NULL, expires_at double precision NOT NULL);
-- the dispatch sweep (every few seconds on every master) looks for pending tasks: few rows
CREATE INDEX IF NOT EXISTS tasks_pending ON tasks(uuid) WHERE status = 'pending';
