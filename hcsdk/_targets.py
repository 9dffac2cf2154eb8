"""Turning what a caller passes as ``targets`` into the spec the master resolves."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hcsdk.common.errors import TargetError

__all__ = ["TargetsLike", "target_spec"]

TargetsLike = Any  # str | Iterable[str] | pandas.DataFrame | pandas.Series


def target_spec(targets: TargetsLike) -> dict[str, Any]:
    """``"web-*"``, ``"label:role=web"``, a uuid or hostname -> ``{"expr": ...}``;
    a list of uuids or a DataFrame with a ``uuid`` column -> ``{"uuids": [...]}``."""
    if targets is None:
        raise TargetError("no targets given (a uuid, a list of uuids, 'web-*', 'label:k=v' or a DataFrame)")
    if isinstance(targets, str):
        if not targets.strip():
            raise TargetError("targets is an empty string")
        if targets.strip().startswith("label:"):
            _check_labels(targets.strip())
        return {"expr": targets.strip()}
    columns = getattr(targets, "columns", None)
    if columns is not None:
        if "uuid" not in columns:
            raise TargetError("a DataFrame given as targets needs a 'uuid' column")
        targets = targets["uuid"]
    if isinstance(targets, Iterable) and not isinstance(targets, (bytes, dict)):
        uuids = list(targets)
        bad = [u for u in uuids if not isinstance(u, str)]
        if bad:
            raise TargetError(f"targets must be uuid strings; got {type(bad[0]).__name__} {bad[0]!r}")
        if not uuids:
            raise TargetError("the target list is empty")
        return {"uuids": uuids}
    raise TargetError(f"cannot use a {type(targets).__name__} as targets")


def _check_labels(expr: str) -> None:
    """Refuse ``label:role=`` before it travels: an empty value is a slip, not a wildcard
    (``label:role`` without ``=`` selects every agent that has the label). The master checks
    the same."""
    for part in expr[len("label:"):].split(","):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() and not value.strip():
            raise TargetError(f"bad label selector {expr!r}: {part.strip()!r} has an empty value "
                              f"(write {key.strip()}=VALUE, or {key.strip()} alone for any agent with that label)")
