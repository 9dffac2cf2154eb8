"""Join tokens: what an agent needs for its first, unforgeable contact with a master.

Like kubeadm's token plus discovery hash in one string: the master's URL(s), the SHA-256
fingerprint of the master's CA, the master's public key for end-to-end message keys, and the
token's id and secret.

    zyj1.<base64url(JSON {"u": [urls], "ca": "sha256:...", "k": e2e public key, "id": ..., "s": ...,
                          "p": "sha256:..." of the proxy CA, "t": "proxy" and "n": [hosts] on a proxy token})>

A token is a secret: it is read from a file (``--join-file``) or the environment
(``ZY_JOIN_TOKEN``) rather than the command line, which every local user can read in
``/proc/PID/cmdline``, and it is never passed on to a re-executed or updated agent.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from hcsdk.common.errors import JoinTokenError

__all__ = [
    "JOIN_ENV", "JoinToken", "pop_env_token", "read_join", "reexec_without_join", "running_as", "strip_join_args",
]

#: the environment variable a join token may come in (removed once read, so children never see it)
JOIN_ENV = "ZY_JOIN_TOKEN"

_PREFIX = "zyj1."


@dataclass(frozen=True, kw_only=True)
class JoinToken:
    urls: tuple[str, ...]
    ca_fingerprint: str
    e2e_public: str
    token_id: str
    secret: str
    #: the proxy CA's fingerprint: agents trust proxies' certificates through it ("" on old tokens)
    proxy_ca_fingerprint: str = ""
    #: "agent" or "proxy": what the master lets this token enroll
    kind: str = "agent"
    #: on a proxy token, the only hosts the master will put in that proxy's certificate
    proxy_names: tuple[str, ...] = ()

    def encode(self) -> str:
        body: dict[str, object] = {"u": list(self.urls), "ca": self.ca_fingerprint, "k": self.e2e_public,
                                   "id": self.token_id, "s": self.secret}
        if self.proxy_ca_fingerprint:
            body["p"] = self.proxy_ca_fingerprint
        if self.kind != "agent":
            body.update(t=self.kind, n=list(self.proxy_names))
        raw = json.dumps(body, separators=(",", ":")).encode()
        return _PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @property
    def credential(self) -> str:
        """What the agent presents to the enroll endpoint."""
        return f"{self.token_id}.{self.secret}"

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        text = text.strip()
        if not text.startswith(_PREFIX):
            raise JoinTokenError("not a join token (it should start with 'zyj1.'; create one with `zy token create`)")
        b64 = text[len(_PREFIX):]
        try:
            body = json.loads(base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)))
            urls = tuple(str(u) for u in body["u"])
            token = cls(urls=urls, ca_fingerprint=str(body["ca"]), e2e_public=str(body["k"]), token_id=str(body["id"]),
                        secret=str(body["s"]), proxy_ca_fingerprint=str(body.get("p", "")),
                        kind=str(body.get("t", "agent")), proxy_names=tuple(str(n) for n in body.get("n", [])))
        except (binascii.Error, ValueError, KeyError, TypeError, AttributeError):
            raise JoinTokenError("join token is damaged (was it copied whole?)") from None
        if not urls or not token.ca_fingerprint.startswith("sha256:"):
            raise JoinTokenError("join token names no master URL or no CA fingerprint")
        return token


def pop_env_token(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Take ``ZY_JOIN_TOKEN`` out of the environment (call it first thing), so no child (a task's
    command, the plugin worker, a re-executed or updated agent) inherits it."""
    return environ.pop(JOIN_ENV, None) or None


def read_join(program: str, arg: str | None, path: Path | None, from_env: str | None) -> str | None:
    """The join token from ``--join-file PATH``, ``ZY_JOIN_TOKEN`` (``from_env``, see
    ``pop_env_token``) or ``--join TOKEN``, in that order, or None. ``--join`` works but warns
    that the token is visible to every user of the host."""
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise JoinTokenError(f"cannot read the join token file {path}: {exc.strerror or exc}") from None
    if from_env:
        return from_env.strip()
    if arg:
        print(f"{program}: warning: --join puts the join token in the process arguments, which other users "
              f"of this host can read (ps, /proc/PID/cmdline); use --join-file PATH or {JOIN_ENV} instead",
              file=sys.stderr, flush=True)
    return arg


def _join_option(arg: str) -> bool:
    """Whether ``arg`` is ``--join``/``--join-file`` as argparse reads it (with ``=VALUE``, or an
    unambiguous abbreviation such as ``--join-f``)."""
    name = arg.split("=", 1)[0]
    return name == "--join" or (len(name) > len("--join") and "--join-file".startswith(name))


def strip_join_args(argv: list[str]) -> list[str]:
    """``argv`` without ``--join TOKEN``, ``--join-file PATH`` (or their ``=`` forms): what an
    enrolled agent passes on when it re-executes itself or starts a new build."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif _join_option(arg):
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def running_as(command: str) -> bool:
    """Whether this process is the ``zy COMMAND`` command line itself (not a test calling the CLI
    in process), so replacing it with a copy of that command line runs the same service."""
    return (bool(sys.executable) and sys.argv[1:2] == [command]
            and sys.orig_argv[len(sys.orig_argv) - len(sys.argv) + 1:] == sys.argv[1:])


def reexec_without_join() -> NoReturn:
    """Replace this process (same pid) with its own command line minus ``--join``/``--join-file``.
    Once enrolled a client never needs the token again, and /proc/PID/cmdline and environ keep
    what a process started with for its whole life; ZY_JOIN_TOKEN is out of os.environ already
    (:func:`pop_env_token`), so the new image holds neither."""
    sys.stdout.flush()
    sys.stderr.flush()
    if getattr(sys, "frozen", False):  # a one-file build is its own interpreter
        os.execv(sys.executable, [sys.executable, *strip_join_args(sys.argv[1:])])
    os.execv(sys.executable, [sys.executable, *strip_join_args(sys.orig_argv[1:])])
