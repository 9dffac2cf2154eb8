"""A throwaway PostgreSQL for tests: one server per test session, one fresh database per test.

PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` user
(the Debian package creates it) from a data dir that user owns; otherwise as whoever runs the
tests. It listens on a free loopback port only, trusts local connections (a throwaway cluster
holds nothing), and skips fsync: tests kill and restart it, they never cut the power.

``ZY_TEST_PG_BIN`` names the folder of ``initdb``/``pg_ctl`` when they are not in the usual
Debian place (``/usr/lib/postgresql/<version>/bin``) or on PATH.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PgServer", "pg_bin", "require_pg_bin"]


def pg_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    if env := os.environ.get("ZY_TEST_PG_BIN"):
        return Path(env)
    for version in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (version / "initdb").exists():
            return version
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def require_pg_bin() -> Path:
    """pg_bin(), or the calling test skips saying how to install PostgreSQL; under CI it fails
    instead (scripts/setup.sh installs it there, so a missing one is a broken setup)."""
    import pytest
    from requires import in_ci

    found = pg_bin()
    if found is None:
        if in_ci():
            pytest.fail("PostgreSQL is not installed (scripts/setup.sh installs it in CI)", pytrace=False)
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """``start()``, then ``new_database()`` per test (a URL); ``restart()``/``kill()`` for the
    tests of a PostgreSQL that goes away under load; ``stop()`` at the end."""

    def __init__(self) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; scripts/setup.sh does)")
        self.bin = bin_dir
        # its own folder in /tmp: pytest's tmp dirs are 0700 root, which the postgres user cannot enter
        self.root = Path(tempfile.mkdtemp(prefix="zy-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done

    def start(self) -> PgServer:
        if not self.data.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            if self._as_postgres:
                shutil.chown(self.root, "postgres", "postgres")
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-instructions")
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                "-c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "start")
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not come up: {(self.root / 'log').read_text()[-2000:]}")
            time.sleep(0.1)

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database's URL."""
        import psycopg

        name = f"{prefix}_{secrets.token_hex(4)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def restart(self, fast: bool = True) -> None:
        """Stop (fast: connections are cut, as a crash or failover cuts them) and start again."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast" if fast else "smart", "-w", "stop")
        self.start()

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def remove(self) -> None:
        """Stop and delete the whole cluster."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])
