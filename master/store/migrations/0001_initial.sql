-- The schema as the master had it before schema versions (issue 14): the store's own tables, and
-- those master/releases.py and master/artifacts_api.py created. IF NOT EXISTS throughout, so it
-- can also be applied to a data dir made by that code, creating only what it lacks.
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS join_tokens (
    id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, description TEXT NOT NULL DEFAULT '',
    uses INTEGER NOT NULL DEFAULT 0, kind TEXT NOT NULL DEFAULT 'agent', proxy_names TEXT NOT NULL DEFAULT '[]',
    max_uses INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS agents (
    uuid TEXT PRIMARY KEY, credential_hash TEXT NOT NULL, token_id TEXT NOT NULL,
    hostname TEXT NOT NULL DEFAULT '', facts TEXT NOT NULL DEFAULT '{}', labels TEXT NOT NULL DEFAULT '{}',
    enrolled_at REAL NOT NULL, last_seen REAL, revoked INTEGER NOT NULL DEFAULT 0,
    connects INTEGER NOT NULL DEFAULT 0, e2e_key TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT 'agent');
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, cmd TEXT NOT NULL, args TEXT NOT NULL, timeout REAL NOT NULL,
    created_at REAL NOT NULL, total INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    taskid TEXT PRIMARY KEY, run_id TEXT NOT NULL, uuid TEXT NOT NULL, status TEXT NOT NULL,
    exit_code INTEGER, started_at REAL, finished_at REAL, error TEXT, final_source TEXT,
    deadline REAL NOT NULL, cancel_requested INTEGER NOT NULL DEFAULT 0, truncated TEXT);
CREATE INDEX IF NOT EXISTS tasks_run ON tasks(run_id);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks(uuid, status);
CREATE INDEX IF NOT EXISTS tasks_open_deadline ON tasks(deadline)
    WHERE status NOT IN ('ok','failed','timeout','offline','cancelled','error');
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, taskid TEXT NOT NULL,
    uuid TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    UNIQUE(taskid, seq));
CREATE INDEX IF NOT EXISTS events_run ON events(run_id, id);
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY, cmd TEXT NOT NULL, args TEXT NOT NULL, every REAL NOT NULL, timeout REAL NOT NULL,
    targets TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT, series TEXT NOT NULL, uuid TEXT NOT NULL, taskid TEXT NOT NULL,
    seq INTEGER NOT NULL, time REAL NOT NULL, status TEXT NOT NULL, fields TEXT NOT NULL, error TEXT,
    UNIQUE(uuid, taskid, seq));
CREATE INDEX IF NOT EXISTS samples_series ON samples(series, time);
-- enrollment warns about a hostname already taken: keep that lookup off a full scan
CREATE INDEX IF NOT EXISTS agents_hostname ON agents(hostname);
-- artifacts (was master/artifacts_api.py)
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    manifest TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS artifacts_name ON artifacts(name, created_at);
-- releases (was master/releases.py)
CREATE TABLE IF NOT EXISTS releases (
    id TEXT PRIMARY KEY, artifact_id TEXT NOT NULL, name TEXT NOT NULL, manifest TEXT NOT NULL,
    dest TEXT NOT NULL, options TEXT NOT NULL, shards TEXT NOT NULL, state TEXT NOT NULL,
    shard INTEGER NOT NULL DEFAULT 0, step TEXT NOT NULL DEFAULT '', step_run TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS release_targets (
    release_id TEXT NOT NULL, uuid TEXT NOT NULL, hostname TEXT NOT NULL, shard INTEGER NOT NULL,
    phase TEXT NOT NULL, status TEXT NOT NULL, error TEXT, bytes INTEGER, bytes_upstream INTEGER,
    bytes_peers INTEGER, reused INTEGER, fetch_s REAL, started_at REAL, finished_at REAL,
    placed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (release_id, uuid));
