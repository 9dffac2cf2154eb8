"""Facilities a test module needs (nginx, sshd, network namespaces, Chromium).

Run by hand on a machine without one, the module is skipped and says what is missing and
how to get it. In CI (``CI`` set, as ``.ci/run`` and most CI services do) the setup script
installs them all, so a missing facility is a broken setup: the module fails instead of
skipping, and a green run never hides tests that did not run."""

from __future__ import annotations

import os
import sys

import pytest


def in_ci() -> bool:
    """True under CI: ``CI`` set to anything but an empty string, ``0`` or ``false``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(condition: object, why: str) -> None:
    """Skip the calling module unless ``condition`` holds, saying ``why``; under CI, fail.

    Call it at module level, before the module's tests and fixtures are defined."""
    if condition:
        return
    # the module's name leads: pytest reports a module-level skip at this file's line
    module = sys._getframe(1).f_globals.get("__name__", "?")
    if in_ci():
        pytest.fail(f"{module}: {why} (CI is set, so a missing facility fails the run instead of "
                    "skipping: scripts/setup.sh installs it in CI)", pytrace=False)
    pytest.skip(f"{module}: {why}", allow_module_level=True)
