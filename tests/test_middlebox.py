"""HTTP/1.1-only middleboxes (a real nginx) between hops: each such hop polls, and works."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from middlebox import NGINX, Middlebox
from requires import require

from fleet import Fleet

require(shutil.which("nginx") or Path(NGINX).exists(), "nginx is not installed (scripts/setup.sh installs it)")


@pytest.fixture
def boxes(tmp_path: Path) -> Iterator[list[Middlebox]]:
    made: list[Middlebox] = []
    yield made
    for box in made:
        box.close()


def _mode_and_via(fleet: Fleet, name: str) -> tuple[str, list[str]]:
    row = fleet.client.inventory().set_index("hostname").loc[name]
    return str(row["mode"]), list(row["via"])


def test_agent_to_master_through_an_http11_only_middlebox(fleet: Fleet, boxes: list[Middlebox],
                                                          tmp_path: Path) -> None:
    box = Middlebox(tmp_path / "nginx", fleet.url, fleet.root / "master")
    boxes.append(box)
    fleet.start_agent("walled-1", extra=["--master", box.url])
    fleet.wait_online("walled-1")
    assert _mode_and_via(fleet, "walled-1") == ("poll", [])
    df = fleet.client.run("for i in 1 2 3; do echo $i; sleep 0.2; done", targets="walled-1",
                          timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "1\n2\n3\n"
    assert "POST /v1/channel/poll" in box.requests() and "HTTP/1.1" in box.requests()


def test_proxy_to_master_through_a_middlebox_and_agent_to_proxy_through_another(
        fleet: Fleet, boxes: list[Middlebox], tmp_path: Path) -> None:
    upper = Middlebox(tmp_path / "nginx-up", fleet.url, fleet.root / "master")
    boxes.append(upper)
    edge = fleet.start_proxy("edge", upstreams=[upper.url])
    lower = Middlebox(tmp_path / "nginx-low", edge, fleet.root / "master")
    boxes.append(lower)
    fleet.start_agent("deep-1", extra=["--master", lower.url])
    fleet.wait_online("deep-1", "edge")
    assert _mode_and_via(fleet, "edge") == ("poll", [])
    assert _mode_and_via(fleet, "deep-1")[1] == ["edge"]
    df = fleet.client.run("echo through two middleboxes", targets="deep-1", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "through two middleboxes\n"
    for box in (upper, lower):
        assert "POST /v1/channel/poll" in box.requests()
