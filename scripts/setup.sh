#!/usr/bin/env bash
# Set up a fresh machine for hcsdk: the system packages the tests need, a virtualenv in .venv,
# and the project installed into it (editable, with the test extras). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the test suite needs: nginx (an HTTP/1.1-only middlebox between hops),
# openssh-server (the SSH downlink is tested against a real sshd), iproute2 and iptables
# (test hosts are network namespaces, some reachable only inbound) and
# Chromium for the JupyterLab browser test (Playwright
# drives /usr/bin/chromium; it never downloads a browser of its own), binutils (PyInstaller reads
# shared libraries with objdump for the one-file agent build). Installed only when
# missing and when we can.
APT_PACKAGES=(chromium nginx openssh-server iproute2 iptables binutils)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "setup: please install: ${missing[*]}" >&2
    fi
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: hcsdk needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c 'import hcsdk, master, agent, granian' || { echo "setup: install failed" >&2; exit 1; }
echo "setup: ready (.venv, hcsdk $(.venv/bin/python -c 'import hcsdk; print(hcsdk.__version__)'))"
