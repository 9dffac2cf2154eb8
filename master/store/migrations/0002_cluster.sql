-- Cluster state (issue 15): the masters registry, which master holds which agent's session (with
-- an epoch: +1 per claim, so a second handshake anywhere supersedes the first), and leases (the
-- singleton's). On SQLite one master holds everything; the tables are the same so the code is.
CREATE TABLE IF NOT EXISTS masters (
    id TEXT PRIMARY KEY, urls TEXT NOT NULL DEFAULT '[]', started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL, agents INTEGER NOT NULL DEFAULT 0);
-- a dropped session keeps its row with master_id NULL: epochs only ever grow
CREATE TABLE IF NOT EXISTS sessions (
    uuid TEXT PRIMARY KEY, master_id TEXT, epoch INTEGER NOT NULL DEFAULT 0, since REAL);
CREATE INDEX IF NOT EXISTS sessions_master ON sessions(master_id) WHERE master_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL);
-- the dispatch sweep (every few seconds on every master) looks for pending tasks: few rows
CREATE INDEX IF NOT EXISTS tasks_pending ON tasks(uuid) WHERE status = 'pending';
