"""How deep a frame's objects and lists may nest, and the cheap check of it (stdlib only, no
orjson: vocab, which the plugin worker loads, needs it too). Whatever a peer sends is refused
past :data:`MAX_DEPTH` by the decoder, and nothing deeper is signed or encoded, so no frame that
passes fails later in the MAC's canonical JSON (the stdlib encoder, ~1000 levels of stack) or in
orjson (255 levels), and random input raises only ProtocolError."""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_DEPTH", "nests_deeper"]

#: how deep objects and lists may nest in a frame, the envelope being level 1 (its payload 2, a
#: task's args 3). Legitimate frames use 3-5 levels (a plugin's dict
#: argument or result a few more); 64 leaves the margin.
MAX_DEPTH = 64


def nests_deeper(obj: Any, limit: int = MAX_DEPTH, text: bytes | str | None = None) -> bool:
    """Whether dicts and lists nest in ``obj`` more than ``limit`` levels (``obj`` itself, when a
    container, being level 1). ``text``, the JSON ``obj`` was read from (or written to), makes it
    cheap on the hot path: a path of n levels needs n opening brackets in the text (those in
    strings only add to the count), so a text with at most ``limit`` of them is not walked. A
    small text is counted (cheaper than any walk); a big one is walked first with a budget (an
    output chunk is 9 values, however long its string) and counted only when that runs out."""
    if not isinstance(obj, (dict, list)):
        return False
    if text is None:
        return bool(_walk(obj, limit, None))
    if len(text) <= _COUNT_BELOW:
        return _opens(text) > limit and bool(_walk(obj, limit, None))
    verdict = _walk(obj, limit, _WALK_BUDGET)
    if verdict is None:
        verdict = _opens(text) > limit and bool(_walk(obj, limit, None))
    return verdict


_COUNT_BELOW = 4096  # bytes of text
_WALK_BUDGET = 256  # values looked at


def _opens(text: bytes | str) -> int:
    if isinstance(text, bytes):
        return text.count(b"{") + text.count(b"[")
    return text.count("{") + text.count("[")


def _walk(obj: dict[str, Any] | list[Any], limit: int, budget: int | None) -> bool | None:
    """Iterative (it must not run out of stack on what it is there to refuse); None when
    ``budget`` values were looked at before an answer."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    seen = 0
    while stack:
        node, level = stack.pop()
        if level > limit:
            return True
        values = node.values() if isinstance(node, dict) else node
        seen += len(values)
        if budget is not None and seen > budget:
            return None
        for value in values:
            if isinstance(value, (dict, list)):
                stack.append((value, level + 1))
    return False
