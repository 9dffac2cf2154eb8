"""Resolving a run's target spec to agent UUIDs.

A spec is ``{"uuids": [...]}`` (from a list or a DataFrame; an entry may also be an exact
hostname) or
``{"expr": "..."}``: a glob on hostname or uuid (``web-*``), a label selector
(``label:role=web,idc=hk``), or one exact uuid or hostname.
"""

from __future__ import annotations

import fnmatch
from typing import Any


class TargetError(ValueError):
    pass


MAX_TARGETS = 50_000


def resolve(spec: Any, agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(spec, dict) or not (("uuids" in spec) ^ ("expr" in spec)):
        raise TargetError("targets must be {'uuids': [...]} or {'expr': '...'}")
    if "uuids" in spec:
        return _by_uuids(spec["uuids"], agents)
    expr = spec["expr"]
    if not isinstance(expr, str) or not expr.strip():
        raise TargetError("target expression must be a non-empty string")
    expr = expr.strip()
    if expr.startswith("label:"):
        return _by_labels(expr, agents)
    if any(ch in expr for ch in "*?["):
        found = [a for a in agents if fnmatch.fnmatchcase(a["hostname"], expr) or fnmatch.fnmatchcase(a["uuid"], expr)]
        if not found:
            raise TargetError(f"target {expr!r} matched no agent (glob on hostname or uuid)")
        return found
    found = [a for a in agents if a["uuid"] == expr or a["hostname"] == expr]
    if not found:
        raise TargetError(f"unknown target {expr!r} (no agent with that uuid or hostname)")
    return found


def _by_uuids(uuids: Any, agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(uuids, list) or not all(isinstance(u, str) for u in uuids):
        raise TargetError("'uuids' must be a list of strings")
    if not uuids:
        raise TargetError("the target list is empty")
    if len(uuids) > MAX_TARGETS:
        raise TargetError(f"the target list has {len(uuids)} entries; at most {MAX_TARGETS} are allowed in one run")
    index = {a["uuid"]: a for a in agents}
    by_host: dict[str, list[dict[str, Any]]] = {}
    for a in agents:
        by_host.setdefault(a["hostname"], []).append(a)
    found: dict[str, dict[str, Any]] = {}
    unknown = []
    for name in uuids:
        matches = [index[name]] if name in index else by_host.get(name, [])
        if not matches:
            unknown.append(name)
        found.update((a["uuid"], a) for a in matches)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        names = ", ".join(repr(u) for u in unknown[:3])
        raise TargetError(f"unknown target {names}{more} (no agent with that uuid or hostname)")
    return list(found.values())


def _by_labels(expr: str, agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    wanted: list[tuple[str, str | None]] = []
    for part in expr[len("label:"):].split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not key.strip():
            raise TargetError(f"bad label selector {expr!r}: empty key in {part!r}")
        if sep and not value.strip():
            # 'role=' reads as "role is empty", which no label can be; 'role' alone means "has the key"
            raise TargetError(f"bad label selector {expr!r}: {part!r} has an empty value "
                              f"(write {key.strip()}=VALUE, or {key.strip()} alone for any agent with that label)")
        wanted.append((key.strip(), value.strip() if sep else None))
    if not wanted:
        raise TargetError(f"bad label selector {expr!r}: give key=value pairs, e.g. label:role=web")

    def match(agent: dict[str, Any]) -> bool:
        labels = agent.get("labels") or {}
        return all(k in labels and (v is None or labels[k] == v) for k, v in wanted)

    found = [a for a in agents if match(a)]
    if not found:
        raise TargetError(f"label selector {expr!r} matched no agent")
    return found


def selects(spec: Any, agent: dict[str, Any]) -> bool:
    """Whether a target spec picks ``agent`` (a uuid, hostname and labels row)."""
    if isinstance(spec, dict) and isinstance(spec.get("uuids"), list):
        return agent["uuid"] in spec["uuids"] or agent["hostname"] in spec["uuids"]
    try:
        return bool(resolve(spec, [agent]))
    except TargetError:
        return False
