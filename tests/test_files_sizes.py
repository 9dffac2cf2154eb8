"""hcsdk.common.sizes (one reading of sizes and rates for every command line, the unit base its
parameter) and hcsdk.common.files (the one temp-file-fsync-rename): on real files in a temp
directory."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from hcsdk.common.files import atomic_open, atomic_write
from hcsdk.common.sizes import parse_rate, parse_size


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("123", 123), ("64k", 64 * 1024), ("10M", 10 * 1024**2), ("10MB", 10 * 1024**2),
    ("10MiB", 10 * 1024**2), ("10G", 10 * 1024**3), ("1.5GiB", 3 * 1024**3 // 2), (" 2 t ", 2 * 1024**4),
    ("1e6", 10**6), (4096, 4096),
])
def test_sizes_are_binary_whatever_the_spelling(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "x", "-1", "10X", "10 M B", "1.2.3", -5, "nan", "inf", "1e400", "1e308T"])
def test_what_is_not_a_size_says_so(text: str | int) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def _rate_before(text: str) -> float:
    """agent/cli.py's own --peer-rate reading before issue 14, the meaning parse_rate keeps."""
    units = {"K": 1e3, "M": 1e6, "G": 1e9}
    return float(text[:-1]) * units[text[-1].upper()] if text[-1:].upper() in units else float(text)


@pytest.mark.parametrize("text", ["0", "1", "512", "0.5", "1.5", ".5", "1e6", "1E3", "20k", "20K", "20m", "20M",
                                  "1.5M", "2G", "20 M", " 20M", "1e3K"])
def test_rates_are_decimal_as_peer_rate_always_read_them(text: str) -> None:
    assert parse_rate(text) == _rate_before(text)


# the old reading refused these too: no bytes suffix, no T (and "20MiB" read decimal would mislead)
@pytest.mark.parametrize("text", ["", "M", "x", "20X", "20MB", "20MiB", "20B", "1T", "20 M B", "1.2.3"])
def test_what_is_not_a_rate_says_so(text: str) -> None:
    with pytest.raises(ValueError):
        _rate_before(text)
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


# float() took these, which are not rates (a negative one quietly meant no cap): refused now
@pytest.mark.parametrize("text", ["-1", "-20M", "nan", "inf", "1e400"])
def test_negative_or_endless_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


def test_zy_agent_peer_rate_is_bytes_a_second_in_decimal_units() -> None:
    from agent.cli import register  # the real flag, as `zy agent` declares it

    parser = argparse.ArgumentParser(prog="zy")
    register(parser.add_subparsers())
    assert parser.parse_args(["agent", "--peer-rate", "20M"]).peer_rate == 20_000_000
    assert parser.parse_args(["agent"]).peer_rate == 0.0
    with pytest.raises(SystemExit):
        parser.parse_args(["agent", "--peer-rate", "20MiB"])


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


def test_the_async_streaming_write_renames_once_whole_and_removes_on_failure(tmp_path: Path) -> None:
    import anyio

    from hcsdk.common.files import atomic_open_async

    target = tmp_path / "zy-agent"

    async def main() -> None:
        async with atomic_open_async(target, mode=0o755) as fh:
            for _ in range(3):
                await fh.write(b"x" * 1000)
            assert not target.exists()  # not before the block ends
        assert target.read_bytes() == b"x" * 3000 and stat.S_IMODE(target.stat().st_mode) & 0o100
        with pytest.raises(ValueError):
            async with atomic_open_async(target) as fh:
                await fh.write(b"not what was signed")
                raise ValueError("the hash does not match")
        with anyio.move_on_after(0.05):  # cancelled in the middle of the download
            async with atomic_open_async(target) as fh:
                await fh.write(b"half")
                await anyio.sleep(30)

    anyio.run(main)
    assert target.read_bytes() == b"x" * 3000
    assert os.listdir(tmp_path) == ["zy-agent"]
