-- Blob bytes in the store (issue 15, part E): with several masters on one PostgreSQL every
-- master must serve every artifact chunk and agent build, so the bytes live here, not in one
-- master's DATA_DIR/blobs (which becomes a read-through cache).
--
-- A blob is a row in blobs (committed only together with all its chunks, so a row seen is a
-- blob complete) and chunk_size-byte pieces in blob_chunks (the last one shorter). Pieces of
-- 1 MiB: a bytea is read and sent whole, on the server and in the client, so the piece is what
-- one download holds in memory at a time on the master and on the PostgreSQL backend; beyond
-- ~256 KiB the per-row cost (a round trip, a heap tuple and an index entry) is under 1 % of the
-- bytes moved. TOAST stores each piece out of line in ~2 KB toast rows either way.
CREATE TABLE IF NOT EXISTS blobs (
    sha256 text PRIMARY KEY,
    size bigint NOT NULL,
    chunk_size integer NOT NULL,
    created_at double precision NOT NULL
);

CREATE TABLE IF NOT EXISTS blob_chunks (
    sha256 text NOT NULL REFERENCES blobs(sha256) ON DELETE CASCADE,
    n integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (sha256, n)
);

-- EXTERNAL: out of line, never compressed. What is stored is mostly compressed already (release
-- archives, agent builds), so pglz would spend CPU on every write for nothing; and an
-- uncompressed value lets substring() fetch only the toast rows of a range.
ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
