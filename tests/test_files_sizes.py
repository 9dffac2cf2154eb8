"""hcsdk.common.sizes (one reading of sizes for every command line) and hcsdk.common.files (the one
temp-file-fsync-rename): on real files in a temp directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hcsdk.common.files import atomic_open, atomic_write
from hcsdk.common.sizes import parse_size


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("123", 123), ("64k", 64 * 1024), ("10M", 10 * 1024**2), ("10MB", 10 * 1024**2),
    ("10MiB", 10 * 1024**2), ("10G", 10 * 1024**3), ("1.5GiB", 3 * 1024**3 // 2), (" 2 t ", 2 * 1024**4),
    ("1e6", 10**6), (4096, 4096),
])
def test_sizes_are_binary_whatever_the_spelling(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "x", "-1", "10X", "10 M B", "1.2.3", -5])
def test_what_is_not_a_size_says_so(text: str | int) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_atomic_write_replaces_the_file_whole_and_owner_only(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    atomic_write(target, '{"new": true}', sync_dir=True)
    assert target.read_text() == '{"new": true}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]  # no temp file left behind


def test_a_failed_streaming_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "build"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target, mode=0o755) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("the download broke")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["build"]
