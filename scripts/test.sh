#!/usr/bin/env bash
# The test command: lint, type-check, then the test suite (real processes on loopback) under
# coverage, master/proxy/agent subprocesses included ([tool.coverage.*] in pyproject.toml says how).
# With no arguments (what CI runs) the total must reach the floor, [tool.coverage.report] fail_under;
# with arguments (some tests only) the report is printed and the floor is not applied.
# ZY_COVERAGE=0 runs plain pytest (no measurement, a little faster). pytest is given no folder: with
# no test paths among the arguments it runs [tool.pytest.ini_options] testpaths, the whole tests/.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check .
# mypy --strict on the shipped packages, the plain level on the rest ([tool.mypy] and its override)
mypy hcsdk master agent proxy kernel_ext tests bench notebooks/build.py
if [ "${ZY_COVERAGE:-1}" = 0 ]; then
    exec python -m pytest -q "$@"
fi
command -v coverage >/dev/null || {
    echo "test.sh: coverage is not installed: bash scripts/setup.sh installs the test extra" >&2; exit 1; }
mkdir -p out/coverage
coverage erase
status=0
coverage run -m pytest -q "$@" || status=$?
coverage combine --quiet || true  # nothing to combine when pytest never started
floor=()
[ $# -eq 0 ] || floor=(--fail-under=0)
# the pytest status wins; a suite that passed still fails under the floor (coverage exits 2)
report=0
coverage report "${floor[@]}" || report=$?
[ "$status" != 0 ] || status=$report
exit "$status"
