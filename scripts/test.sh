#!/usr/bin/env bash
# The test command: lint, type-check, then the test suite (real processes on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check .
mypy hcsdk master agent kernel_ext tests bench notebooks/build.py
python -m pytest tests -q "$@"
