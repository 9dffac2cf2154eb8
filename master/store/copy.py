"""Copy a SQLite store into a PostgreSQL store: what `zy master migrate-store` does.

Everything happens in ONE PostgreSQL transaction: the target's tables are locked, checked empty,
filled with ``COPY ... FROM STDIN`` and its sequences moved past the copied ids; an error
anywhere (a damaged source, a row PostgreSQL refuses, a blob whose bytes do not match its name)
rolls all of it back. The source is opened read-only and checked (``PRAGMA quick_check``)
before anything is written, so a damaged file leaves PostgreSQL untouched.

The copy is driven by the two schemas, not by a list of columns kept here: every table of the
SQLite file is copied into the PostgreSQL table of the same name, column by column, converting
only where the types differ (hex text -> bytea, 0/1 -> boolean; JSON text goes into jsonb or
text as it is). A SQLite table or column with no place in PostgreSQL is an error (the copy would
lose it); a PostgreSQL column the source lacks takes its default. Runtime state (sessions,
masters, leases: which master holds what right now) is not copied.

Ids keep their values (``events.id`` is the SDK's ``?after=N`` cursor), and each sequence is set
past the highest id SQLite ever handed out (``sqlite_sequence``, which outlives rows deleted by
retention), so a new id never repeats an old one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .migrate import migrations

__all__ = ["BLOBS_KEY", "SEALED_META", "CopyError", "Progress", "RUNTIME_TABLES", "copy_store", "describe_url"]

#: (table, rows copied so far, rows in all): called every BATCH rows and at each table's end
Progress = Callable[[str, int, int], None]

#: which master holds which agent, the registry, leases: true only of the masters running now
RUNTIME_TABLES = frozenset({"sessions", "masters", "leases"})
#: the store's own bookkeeping: the target keeps its own schema_version
_SKIPPED = RUNTIME_TABLES | {"schema_version"}
#: the key of copy_store's answer counting the blob files copied into the store
BLOBS_KEY = "blobs (files)"
BATCH = 10_000
#: meta keys the copy leaves out: the cluster's sealed secrets (master/keyring.py's check value,
#: master/bootstrap.py's sealed.*). A SQLite store has none; the first master started on the new
#: store seals its data dir's CA, keys and token there itself.
SEALED_META = ("keyring_check", "sealed.")
_META_WHERE = " WHERE k != 'keyring_check' AND substr(k, 1, 7) != 'sealed.'"
_TEXT_TYPES = frozenset({"text", "varchar", "bpchar"})
_BLOB_READ = 1024 * 1024


class CopyError(RuntimeError):
    """The copy cannot be done; the message says what was wrong. Nothing was written."""


@dataclass(frozen=True)
class _Column:
    name: str
    pg_type: str  # udt_name: bool, bytea, jsonb, text, int8, float8, timestamptz...


def copy_store(sqlite_path: Path, pg_url: str, progress: Progress | None = None,
               blobs_dir: Path | None = None) -> dict[str, int]:
    """Copy the SQLite store at ``sqlite_path`` (and the blob files in ``blobs_dir``, default
    the data dir's blobs/, when the PostgreSQL store keeps blob bytes) into the PostgreSQL store
    at ``pg_url``, whose schema is brought up to date first. Returns rows copied per table (and
    ``BLOBS_KEY``: files copied, when the store keeps blobs). Raises CopyError."""
    src = _open_source(sqlite_path)
    try:
        tables = _source_tables(src, sqlite_path)
        keeps_blobs = _prepare_target(pg_url)
        blobs = blobs_dir if blobs_dir is not None else sqlite_path.parent / "blobs"
        try:
            with psycopg.connect(pg_url, connect_timeout=15) as conn, conn.transaction():
                counts = _copy_all(src, conn, tables, progress)
                if keeps_blobs:
                    counts[BLOBS_KEY] = _copy_blobs(conn, blobs, progress)
        except psycopg.Error as exc:
            raise CopyError(f"PostgreSQL refused the copy, nothing was kept ({describe_url(pg_url)}): "
                            f"{type(exc).__name__}: {str(exc).strip()}") from exc
        return counts
    finally:
        src.close()


def describe_url(url: str) -> str:
    """``url`` without its password, for messages (postgres.py's ``redact``: one redactor)."""
    from .postgres import redact

    return redact(url)


# -- the source -----------------------------------------------------------------------------

def _open_source(path: Path) -> sqlite3.Connection:
    """The SQLite file, read-only, checked whole before anything is written anywhere."""
    if not path.is_file():
        raise CopyError(f"{path}: no such file; --from must be a master's data dir (it holds {path.name})")
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise CopyError(f"{path}: cannot open it: {exc}") from exc
    try:
        problems = [str(r[0]) for r in src.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as exc:
        src.close()
        raise CopyError(f"{path} is not a readable SQLite database ({exc}); nothing was copied. "
                        "Restore the data dir from a backup") from exc
    if problems != ["ok"]:
        src.close()
        raise CopyError(f"{path} is damaged ({'; '.join(problems)}); nothing was copied. "
                        "Restore the data dir from a backup")
    return src


def _source_tables(src: sqlite3.Connection, path: Path) -> dict[str, list[str]]:
    """table -> its columns, for the tables to copy; checks this is a master's store."""
    names = [str(r[0]) for r in src.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    if not {"meta", "agents", "runs"} <= set(names):
        raise CopyError(f"{path} is not a master's store (no agents/runs/meta tables; it has {names or 'none'})")
    if "schema_version" in names:
        newest = max((int(r[0]) for r in src.execute("SELECT version FROM schema_version")), default=0)
        known = len(migrations())
        if newest > known:
            raise CopyError(f"{path} has schema version {newest}; this zy knows up to {known}: run the newer zy")
    return {t: [str(r[1]) for r in src.execute(f'PRAGMA table_info("{t}")')] for t in names if t not in _SKIPPED}


def _sqlite_sequences(src: sqlite3.Connection) -> dict[str, int]:
    """The highest AUTOINCREMENT id each table ever handed out (kept after its rows are deleted)."""
    try:
        return {str(name): int(seq) for name, seq in src.execute("SELECT name, seq FROM sqlite_sequence")}
    except sqlite3.OperationalError:  # no AUTOINCREMENT table
        return {}


# -- the target -----------------------------------------------------------------------------

def _prepare_target(url: str) -> bool:
    """Open the store once so its migrations run; returns whether it keeps blob bytes."""
    from .blob_bytes import BlobBytes
    from .postgres import open_postgres

    try:
        store = open_postgres(url)
    except (psycopg.Error, RuntimeError) as exc:  # the store says RuntimeError for a connection refused
        raise CopyError(f"cannot reach or open the PostgreSQL store ({str(exc).strip()})") from exc
    try:
        return isinstance(store, BlobBytes)
    finally:
        store.close()


def _target_columns(conn: psycopg.Connection[Any]) -> dict[str, list[_Column]]:
    rows = conn.execute("SELECT table_name, column_name, udt_name FROM information_schema.columns "
                        "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position").fetchall()
    out: dict[str, list[_Column]] = {}
    for table, column, pg_type in rows:
        out.setdefault(str(table), []).append(_Column(str(column), str(pg_type)))
    return out


def _copy_order(conn: psycopg.Connection[Any], tables: list[str]) -> list[str]:
    """``tables`` with those a foreign key points to first."""
    rows = conn.execute("SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint "
                        "WHERE contype = 'f' AND connamespace = current_schema()::regnamespace").fetchall()
    graph: dict[str, set[str]] = {t: set() for t in sorted(tables)}
    for child, parent in rows:
        if str(child) in graph and str(parent) in graph and child != parent:
            graph[str(child)].add(str(parent))
    try:
        return list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise CopyError(f"the PostgreSQL store's foreign keys form a cycle: {exc.args[1]}") from exc


def _plan(tables: dict[str, list[str]], target: dict[str, list[_Column]]) -> dict[str, list[_Column]]:
    """table -> the target columns to fill, in the source's column order."""
    plan: dict[str, list[_Column]] = {}
    for table, columns in tables.items():
        if table not in target:
            raise CopyError(f"the SQLite store's table {table!r} has no place in the PostgreSQL store "
                            "(is the target's zy older than the source's?)")
        by_name = {c.name: c for c in target[table]}
        missing = [c for c in columns if c not in by_name]
        if missing:
            raise CopyError(f"the SQLite store's columns {table}.{missing} have no place in the PostgreSQL store")
        plan[table] = [by_name[c] for c in columns]
    return plan


def _lock_empty(conn: psycopg.Connection[Any], tables: list[str]) -> None:
    """Lock the tables to fill until the commit (a master started on the store meanwhile waits)
    and refuse a store that holds anything: the copy would mix two control planes."""
    conn.execute("SET LOCAL lock_timeout = '10s'")
    conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.SQL(", ").join(map(sql.Identifier, tables))))
    held = {}
    for table in tables:  # counted up to a point: a big table need not be scanned to be refused
        row = conn.execute(sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT 1001) x").format(
            sql.Identifier(table))).fetchone()
        if row and row[0]:
            held[table] = int(row[0])
    if held:
        listed = ", ".join(f"{t}: {'over 1000' if n > 1000 else n} row{'s' if n > 1 else ''}" for t, n in held.items())
        raise CopyError(f"the PostgreSQL store is not empty ({listed}); migrate-store copies into an empty "
                        "store only (a new database: CREATE DATABASE ...); nothing was written")


# -- the copy -------------------------------------------------------------------------------

def _copy_all(src: sqlite3.Connection, conn: psycopg.Connection[Any], tables: dict[str, list[str]],
              progress: Progress | None) -> dict[str, int]:
    plan = _plan(tables, _target_columns(conn))
    order = _copy_order(conn, list(plan))
    _lock_empty(conn, order)
    counts = {}
    for table in order:
        counts[table] = _copy_table(src, conn, table, plan[table], progress)
    _move_sequences(conn, order, _sqlite_sequences(src))
    return counts


def _copy_table(src: sqlite3.Connection, conn: psycopg.Connection[Any], table: str, columns: list[_Column],
                progress: Progress | None) -> int:
    where = _META_WHERE if table == "meta" else ""
    total = int(src.execute(f'SELECT count(*) FROM "{table}"{where}').fetchone()[0])
    names = ", ".join(f'"{c.name}"' for c in columns)
    convert = _converter(table, columns, _with_nul(src, table, columns))
    done = 0
    if progress and total:
        progress(table, 0, total)
    rows = src.execute(f'SELECT {names} FROM "{table}"{where}')
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c.name) for c in columns))
    with conn.cursor() as cur, cur.copy(copy_sql) as copy:
        while batch := rows.fetchmany(BATCH):
            for row in batch:
                copy.write_row(convert(row) if convert else row)
            done += len(batch)
            if progress and done < total:
                progress(table, done, total)
    if progress:
        progress(table, done, total)
    return done


def _with_nul(src: sqlite3.Connection, table: str, columns: list[_Column]) -> set[str]:
    """The text columns where some value holds a NUL character (SQLite keeps them, PostgreSQL
    refuses them): one scan of the table in SQLite, so the common case converts nothing."""
    texts = [c.name for c in columns if c.pg_type in _TEXT_TYPES]
    if not texts:
        return set()
    # instr over the bytes: SQLite's text functions may stop at a NUL
    probes = ", ".join(f"max(instr(CAST(\"{c}\" AS BLOB), X'00'))" for c in texts)
    found = src.execute(f'SELECT {probes} FROM "{table}"').fetchone()
    return {c for c, at in zip(texts, found, strict=True) if at}


def _converter(table: str, columns: list[_Column],
               with_nul: set[str]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]] | None:
    """A row's conversion to the target's types, None when every value goes as it is (numbers
    and text: COPY's text form parses them into the column's type, JSON text into jsonb too)."""
    steps = [(i, _nul_free if c.name in with_nul else _value_converter(table, c)) for i, c in enumerate(columns)]
    needed = [(i, f) for i, f in steps if f is not None]
    if not needed:
        return None

    def convert(row: tuple[Any, ...]) -> tuple[Any, ...]:
        out = list(row)
        for i, f in needed:
            if out[i] is not None:
                out[i] = f(out[i])
        return tuple(out)

    return convert


def _value_converter(table: str, column: _Column) -> Callable[[Any], Any] | None:
    if column.pg_type == "bool":
        return bool
    if column.pg_type == "bytea":
        def unhex(value: Any) -> bytes:
            if isinstance(value, bytes):
                return value
            try:
                return bytes.fromhex(str(value))
            except ValueError:
                raise CopyError(f"{table}.{column.name}: {str(value)[:40]!r} is not hex, which the SQLite "
                                "store keeps keys as") from None
        return unhex
    if column.pg_type == "timestamptz":
        return lambda value: datetime.fromtimestamp(float(value), UTC)
    return None


def _nul_free(value: Any) -> Any:
    """What the PostgreSQL store does with a NUL an agent sends (postgres_base.clean): U+FFFD."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _move_sequences(conn: psycopg.Connection[Any], tables: list[str], sqlite_seq: dict[str, int]) -> None:
    """Every sequence behind a copied table's column past the highest id used, in PostgreSQL or
    ever in SQLite: new ids never repeat an old one (an SDK cursor ?after=N stays right)."""
    rows = conn.execute("SELECT table_name, column_name, pg_get_serial_sequence(quote_ident(table_name), column_name) "
                        "FROM information_schema.columns WHERE table_schema = current_schema() "
                        "AND table_name = ANY(%s)", (tables,)).fetchall()
    for table, column, seq in rows:
        if seq is None:
            continue
        row = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(column), sql.Identifier(table)))\
            .fetchone()
        top = max(int(row[0]) if row and row[0] is not None else 0, sqlite_seq.get(str(table), 0))
        if top > 0:
            conn.execute("SELECT setval(%s, %s, true)", (seq, top))


# -- blobs ----------------------------------------------------------------------------------

def _copy_blobs(conn: psycopg.Connection[Any], folder: Path, progress: Progress | None) -> int:
    """The blob files (named by their SHA-256) into the store, through its own put_blob, in
    this transaction; put_blob checks each file's bytes against its name."""
    from hcsdk.protocol.names import is_sha256

    from .postgres_blobs import PostgresBlobsSQL

    class _IntoThisTransaction(PostgresBlobsSQL):
        @contextmanager
        def _connection(self) -> Iterator[psycopg.Connection[Any]]:
            yield conn  # put_blob's own transaction becomes a savepoint of the copy's

    files = sorted(p for p in folder.iterdir() if p.is_file() and is_sha256(p.name)) if folder.is_dir() else []
    into = _IntoThisTransaction()
    for n, path in enumerate(files, 1):
        try:
            into.put_blob(path.name, _read_chunks(path))
        except ValueError as exc:  # BlobDigestError: a damaged file
            raise CopyError(f"blob file {path}: {exc}") from exc
        if progress:
            progress("blobs", n, len(files))
    return len(files)


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(_BLOB_READ):
            yield chunk
