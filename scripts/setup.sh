#!/usr/bin/env bash
# Set up a fresh machine for hcsdk: the system packages the tests need, a virtualenv in .venv,
# and the project installed into it (editable, with the test extras). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Debian packages the test suite needs: nginx (an HTTP/1.1-only middlebox between hops),
# openssh-server (the SSH downlink is tested against a real sshd), iproute2 and iptables
# (test hosts are network namespaces, some reachable only inbound) and
# Chromium for the JupyterLab browser test (Playwright
# drives /usr/bin/chromium; it never downloads a browser of its own), binutils (PyInstaller reads
# shared libraries with objdump for the one-file agent build), PostgreSQL (the store of several masters:
# tests start throwaway clusters of their own as the postgres user, tests/pg.py). Installed only when
# missing and when we can. ZY_SETUP_APT_PACKAGES replaces the list (tests use it).
read -r -a APT_PACKAGES <<<"${ZY_SETUP_APT_PACKAGES:-chromium nginx openssh-server iproute2 iptables binutils postgresql}"
# another apt (unattended-upgrades on a fresh VM, a second setup) may hold dpkg's locks: wait
# this long for it, then stop with a plain message rather than apt's raw lock errors
APT_WAIT=${APT_WAIT:-300}
APT_LOCKS=(/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock)

apt_lock_holder() {
    # dpkg and apt take fcntl locks: probe each with one (released at once); print the first held
    "$PYTHON" - "${APT_LOCKS[@]}" <<'EOF'
import fcntl, os, sys
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        continue
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(path)
        break
    finally:
        os.close(fd)
EOF
}

wait_for_apt() {
    local held deadline=$((SECONDS + APT_WAIT)) said=""
    while held=$(apt_lock_holder) && [ -n "$held" ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "setup: FAILED: another apt or dpkg still holds $held after ${APT_WAIT}s, so ${missing[*]}" \
                "could not be installed. Let it finish (see: ps -ef | grep -E 'apt|dpkg'), then run" \
                "bash scripts/setup.sh again (APT_WAIT=SECONDS waits longer)." >&2
            return 1
        fi
        [ -n "$said" ] || echo "setup: another apt or dpkg is running (it holds $held); waiting up to ${APT_WAIT}s" >&2
        said=1
        sleep 2
    done
}

apt_get() {
    # quiet when it works; on failure, apt's own error lines (E: ...) under one plain sentence
    local out
    if out=$(DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout="$APT_WAIT" "$@" 2>&1); then
        return 0
    fi
    echo "setup: FAILED: apt-get $1 did not work, so ${missing[*]} could not be installed:" >&2
    printf '%s\n' "$out" | grep -E '^(E|W):' | sed 's/^/    /' >&2 || printf '%s\n' "$out" | tail -n 5 >&2
    return 1
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing ${missing[*]} (apt-get)"
        wait_for_apt && apt_get update && apt_get install -y "${missing[@]}" || exit 1
    else
        echo "setup: please install: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
    fi
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: hcsdk needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_quiet() {
    # pip -q still prints a notice per ignored constraint; keep everything else (errors above all)
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true
}
pip_quiet --upgrade pip
# setuptools notes every editable install ("Editable installation ... folders with the same name
# may take precedence"): information, not a problem, and ten lines of it. pip re-raises the
# backend's warnings as its own, so a warnings filter on pip's process drops just that one.
PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation" pip_quiet -e '.[test]'
.venv/bin/python -c 'import hcsdk, master, agent, granian' || { echo "setup: install failed" >&2; exit 1; }

# `zy` lives in .venv/bin. As root, link it into /usr/local/bin so the README's commands work in
# any shell (never over another checkout's working zy); otherwise say how to put it on the PATH.
ZY="$PWD/.venv/bin/zy"
LINK=${ZY_SETUP_LINK:-/usr/local/bin/zy}
if [ "$(readlink -f "$(command -v zy || true)")" = "$(readlink -f "$ZY")" ]; then
    where="zy is on your PATH"
elif [ "$(id -u)" = 0 ] && [ -d "$(dirname "$LINK")" ] && [ ! -e "$LINK" ] && ln -sfn "$ZY" "$LINK"; then
    where="zy linked into $(dirname "$LINK")"
else
    where="to put zy on your PATH: . .venv/bin/activate"
fi
echo "setup: ready (.venv, hcsdk $(.venv/bin/python -c 'import hcsdk; print(hcsdk.__version__)'); $where)"
