"""Sizes as people write them, one reading for every command line (``zy proxy --cache-size``,
``zy agent --peer-rate``...).

The units are binary, as most tools mean them for cache sizes and transfer caps: K, M, G, T are
1024, 1024², 1024³, 1024⁴. ``10M``, ``10MB`` and ``10MiB`` all mean 10 × 1024² bytes (the proxy
always read its ``--cache-size`` this way, so ``10G`` keeps its meaning); case does not matter;
a plain number is bytes. Fractions (``1.5G``) and exponents (``1e6``) are allowed, the result is
rounded down to whole bytes; negative sizes are not sizes.
"""

from __future__ import annotations

import re

__all__ = ["UNITS", "parse_size"]

#: what each unit letter multiplies by
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """The bytes in ``text`` (binary units, see the module); ValueError when it is not a size."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text!r} is not a size: sizes are not negative")
        return int(text)
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size: give bytes or a number with K, M, G or T (e.g. 10G; binary units)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])
