-- The store's schema in PostgreSQL: SQLite's 0001 (master/store/migrations/0001_initial.sql) in
-- PostgreSQL's types, the same columns in the same order (rows become the API's JSON in column
-- order). JSON is kept as text, as it came: events' data is passed through to the SDK as is, and
-- jsonb would refuse a \u0000 that an agent may send. Keys are bytea, flags boolean, times
-- double precision (seconds since the epoch, as everywhere in the master). Text compares and sorts
-- as SQLite's does, byte by byte (COLLATE "C", whatever the database's locale): listings come out
-- in the same order on both stores, and the indexes skip the locale's costlier comparisons.
CREATE TABLE meta (k text COLLATE "C" PRIMARY KEY, v text COLLATE "C" NOT NULL);
CREATE TABLE join_tokens (
    id text COLLATE "C" PRIMARY KEY, secret_hash text COLLATE "C" NOT NULL, created_at double precision NOT NULL,
    expires_at double precision NOT NULL, revoked boolean NOT NULL DEFAULT false, description text COLLATE "C" NOT NULL DEFAULT '',
    uses integer NOT NULL DEFAULT 0, kind text COLLATE "C" NOT NULL DEFAULT 'agent', proxy_names text COLLATE "C" NOT NULL DEFAULT '[]',
    max_uses integer NOT NULL DEFAULT 0);
-- kind may be NULL: an agent enrolled before kinds existed, copied from an old SQLite data dir
CREATE TABLE agents (
    uuid text COLLATE "C" PRIMARY KEY, credential_hash text COLLATE "C" NOT NULL, token_id text COLLATE "C" NOT NULL,
    hostname text COLLATE "C" NOT NULL DEFAULT '', facts text COLLATE "C" NOT NULL DEFAULT '{}', labels text COLLATE "C" NOT NULL DEFAULT '{}',
    enrolled_at double precision NOT NULL, last_seen double precision, revoked boolean NOT NULL DEFAULT false,
    connects integer NOT NULL DEFAULT 0, e2e_key bytea NOT NULL DEFAULT '', kind text COLLATE "C" DEFAULT 'agent');
CREATE INDEX agents_hostname ON agents(hostname);
CREATE TABLE runs (
    id text COLLATE "C" PRIMARY KEY, cmd text COLLATE "C" NOT NULL, args text COLLATE "C" NOT NULL, timeout double precision NOT NULL,
    created_at double precision NOT NULL, total integer NOT NULL);
CREATE TABLE tasks (
    taskid text COLLATE "C" PRIMARY KEY, run_id text COLLATE "C" NOT NULL, uuid text COLLATE "C" NOT NULL, status text COLLATE "C" NOT NULL,
    exit_code bigint, started_at double precision, finished_at double precision, error text COLLATE "C", final_source text COLLATE "C",
    deadline double precision NOT NULL, cancel_requested boolean NOT NULL DEFAULT false, truncated text COLLATE "C");
CREATE INDEX tasks_run ON tasks(run_id);
CREATE INDEX tasks_open ON tasks(uuid, status);
CREATE INDEX tasks_open_deadline ON tasks(deadline)
    WHERE status NOT IN ('ok','failed','timeout','offline','cancelled','error');
-- ids in commit order within a run: every writer of a run's events locks its runs row first
CREATE TABLE events (
    id bigserial PRIMARY KEY, run_id text COLLATE "C" NOT NULL, taskid text COLLATE "C" NOT NULL,
    uuid text COLLATE "C" NOT NULL, seq integer NOT NULL, kind text COLLATE "C" NOT NULL, data text COLLATE "C" NOT NULL,
    UNIQUE(taskid, seq));
CREATE INDEX events_run ON events(run_id, id);
CREATE TABLE schedules (
    name text COLLATE "C" PRIMARY KEY, cmd text COLLATE "C" NOT NULL, args text COLLATE "C" NOT NULL, every double precision NOT NULL,
    timeout double precision NOT NULL, targets text COLLATE "C" NOT NULL, created_at double precision NOT NULL);
CREATE TABLE samples (
    id bigserial PRIMARY KEY, series text COLLATE "C" NOT NULL, uuid text COLLATE "C" NOT NULL, taskid text COLLATE "C" NOT NULL,
    seq integer NOT NULL, time double precision NOT NULL, status text COLLATE "C" NOT NULL, fields text COLLATE "C" NOT NULL, error text COLLATE "C",
    UNIQUE(uuid, taskid, seq));
CREATE INDEX samples_series ON samples(series, time);
CREATE TABLE artifacts (
    id text COLLATE "C" PRIMARY KEY, name text COLLATE "C" NOT NULL, size bigint NOT NULL, sha256 text COLLATE "C" NOT NULL,
    manifest text COLLATE "C" NOT NULL, created_at double precision NOT NULL);
CREATE INDEX artifacts_name ON artifacts(name, created_at);
CREATE TABLE releases (
    id text COLLATE "C" PRIMARY KEY, artifact_id text COLLATE "C" NOT NULL, name text COLLATE "C" NOT NULL, manifest text COLLATE "C" NOT NULL,
    dest text COLLATE "C" NOT NULL, options text COLLATE "C" NOT NULL, shards text COLLATE "C" NOT NULL, state text COLLATE "C" NOT NULL,
    shard integer NOT NULL DEFAULT 0, step text COLLATE "C" NOT NULL DEFAULT '', step_run text COLLATE "C" NOT NULL DEFAULT '',
    message text COLLATE "C" NOT NULL DEFAULT '', created_at double precision NOT NULL, updated_at double precision NOT NULL);
CREATE TABLE release_targets (
    release_id text COLLATE "C" NOT NULL, uuid text COLLATE "C" NOT NULL, hostname text COLLATE "C" NOT NULL, shard integer NOT NULL,
    phase text COLLATE "C" NOT NULL, status text COLLATE "C" NOT NULL, error text COLLATE "C", bytes bigint, bytes_upstream bigint,
    bytes_peers bigint, reused bigint, fetch_s double precision, started_at double precision,
    finished_at double precision, placed boolean NOT NULL DEFAULT false, PRIMARY KEY (release_id, uuid));
