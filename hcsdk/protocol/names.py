"""The rules for text from elsewhere that ends up naming a file: the one name-sanitising helper
that master, proxy cache and agent share (DESIGN.md, "Security lessons": Salt's breaches came
from file paths built from remote input).

A digest names a file or a directory only once it is 64 lowercase hex digits (a SHA-256); a
release directory on an agent is the digest's first 16 of them. A released file's name is a
plain file name that never collides with what the agent writes beside it: names with ``.zy-``
in them (``.zy-manifest.json``, ``.zy-verified.json``, ``.NAME.zy-part``, ``NAME.zy-prev``...)
are the agent's own and refused everywhere, first at upload.
"""

from __future__ import annotations

import re
import secrets

__all__ = ["CLIENT_RUN_ID", "PLUGIN_NAME", "RESERVED_MARK", "RUN_ID", "UnsafeName", "check_file_name", "check_sha256",
           "digest_dir", "is_digest_dir", "is_plugin_name", "is_run_id", "is_sha256", "new_run_id"]

# \A...\Z, not ^...$: "$" also matches before a trailing newline, and these check remote input
# (callers elsewhere may still .match() them; the functions below use fullmatch)
SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
DIGEST_DIR = re.compile(r"\A[0-9a-f]{16}\Z")
#: a plugin's name, which becomes a directory and a module name on the agent: an identifier of at
#: most 40 lowercase letters, digits and _ (the SDK checks it before upload, the agent on install)
PLUGIN_NAME = re.compile(r"\A[a-z][a-z0-9_]{0,39}\Z")
#: a run's id: ``r`` and 12 hex digits when the master makes it, 16 to 32 when a client does (the
#: SDK names its runs, so that a run request resent to another master is not a second run)
RUN_ID = re.compile(r"\Ar[0-9a-f]{12,32}\Z")
#: what a client may name a run (the API's check): never the length of the master's own ids, so a
#: client's id cannot take one a release step is about to use
CLIENT_RUN_ID = r"^r[0-9a-f]{16,32}$"
#: what marks the agent's own files (metadata, part files, kept previous versions)
RESERVED_MARK = ".zy-"
#: longest released file name: the agent adds a dot and ``.zy-part`` while it comes, and a
#: file name has 255 bytes at most on the usual filesystems
MAX_NAME_BYTES = 255 - len(".") - len(".zy-part")


class UnsafeName(ValueError):
    """Text that must not name a file."""


def new_run_id(hex_digits: int = 12) -> str:
    """A fresh run id (the SDK asks for 16 digits: ids it makes must not meet the master's)."""
    return "r" + secrets.token_hex(hex_digits // 2)


def is_run_id(text: object) -> bool:
    return isinstance(text, str) and RUN_ID.fullmatch(text) is not None


def is_sha256(text: object) -> bool:
    return isinstance(text, str) and SHA256.fullmatch(text) is not None


def check_sha256(text: object, what: str = "digest") -> str:
    """``text`` if it is a SHA-256 in lowercase hex; :class:`UnsafeName` naming ``what`` otherwise."""
    if not is_sha256(text):
        raise UnsafeName(f"{what} {str(text)[:80]!r} is not a SHA-256 (64 lowercase hex digits)")
    assert isinstance(text, str)
    return text


def digest_dir(digest: object) -> str:
    """The directory name a release's digest is kept under (its first 16 hex digits)."""
    return check_sha256(digest)[:16]


def is_plugin_name(name: object) -> bool:
    return isinstance(name, str) and PLUGIN_NAME.fullmatch(name) is not None


def is_digest_dir(name: str) -> bool:
    """Whether a directory name is one :func:`digest_dir` makes (anything else is not ours)."""
    return DIGEST_DIR.fullmatch(name) is not None


def check_file_name(name: object, what: str = "file name") -> str:
    """``name`` if it is a plain file name that is not one of the agent's own; :class:`UnsafeName`
    saying which rule it breaks otherwise."""
    if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
        raise UnsafeName(f"{what} {name!r} must be a plain file name")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafeName(f"{what} {name!r} must not contain control characters")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise UnsafeName(f"{what} {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    if RESERVED_MARK in name:
        raise UnsafeName(f"{what} {name!r} is reserved: names containing {RESERVED_MARK!r} are the agent's own "
                         "files (.zy-manifest.json, .zy-verified.json, *.zy-part); rename the file")
    return name
