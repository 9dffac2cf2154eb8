"""``{name}`` in a cell body, replaced from the user namespace before the script is sent.

Like IPython's ``!`` for braces, but shell-friendly: ``$`` is never touched, ``${VAR}`` passes
through to the shell untouched, and ``{{`` / ``}}`` stand for literal braces.
"""

from __future__ import annotations

from typing import Any


class InterpolationError(ValueError):
    pass


def interpolate(text: str, namespace: dict[str, Any]) -> str:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if text.startswith("{{", i) or text.startswith("}}", i):
            out.append(ch)
            i += 2
        elif text.startswith("${", i):
            end = text.find("}", i)
            end = n - 1 if end == -1 else end
            out.append(text[i : end + 1])
            i = end + 1
        elif ch == "{":
            end = text.find("}", i)
            if end == -1:
                raise InterpolationError("unclosed '{' in the cell (write '{{' for a literal brace)")
            out.append(_evaluate(text[i + 1 : end], namespace))
            i = end + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _evaluate(expr: str, namespace: dict[str, Any]) -> str:
    try:
        return str(eval(expr, namespace))  # the user's own expression, in the user's own kernel
    except Exception as exc:
        raise InterpolationError(
            f"cannot expand {{{expr}}}: {type(exc).__name__}: {exc} (write {{{{{expr}}}}} to keep the braces)"
        ) from None
