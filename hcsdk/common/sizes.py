"""Sizes and rates as people write them: one reading for every command line, with the unit base
as its parameter (``zy proxy --cache-size`` is a size, ``zy agent --peer-rate`` a rate).

One grammar: a number (digits, an optional fraction and exponent: ``20``, ``1.5``, ``.5``,
``1e6``), then an optional unit letter; case does not matter, spaces around are allowed. What the
letters mean is the scale's, and each keeps what its flag always meant:

* a size (:data:`SIZE`, :func:`parse_size`) is binary: K, M, G, T are 1024, 1024², 1024³, 1024⁴,
  and may be followed by ``B`` or ``iB`` (``10M``, ``10MB`` and ``10MiB`` are all 10 × 1024²
  bytes, as the proxy always read ``--cache-size``); the result is whole bytes, rounded down;
* a rate (:data:`RATE`, :func:`parse_rate`) is decimal: K, M, G are 10³, 10⁶, 10⁹ bytes a second
  (``20M`` is 20,000,000 B/s, as ``--peer-rate`` always meant); no ``B``/``iB`` and no T, which
  it never took (``20MiB`` read as decimal would mislead); fractions of a byte stay.

Negative numbers, NaN and infinities are neither.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["RATE", "SIZE", "Scale", "parse_quantity", "parse_rate", "parse_size"]


@dataclass(frozen=True, kw_only=True)
class Scale:
    """What the unit letters mean for one kind of quantity."""

    what: str  # "size", "rate": named in the refusal
    base: int  # K is base, M base², ...
    letters: str  # the unit letters taken, smallest first (a prefix of "kmgt")
    byte_suffix: bool  # whether "B"/"iB" may follow the letter
    hint: str  # how to write one, for the refusal

    def factor(self, letter: str) -> int:
        return self.base ** ("_" + self.letters).index(letter) if letter else 1


SIZE = Scale(what="size", base=1024, letters="kmgt", byte_suffix=True,
             hint="give bytes or a number with K, M, G or T (e.g. 10G; binary units)")
RATE = Scale(what="rate", base=1000, letters="kmg", byte_suffix=False,
             hint="give bytes a second or a number with K, M or G (e.g. 20M; decimal units)")

_QUANTITY = re.compile(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)


def parse_quantity(text: str | int | float, scale: Scale) -> float:
    """The quantity in ``text`` read on ``scale``; ValueError saying how to write one otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        number, letter, suffix = float(text), "", None
    else:
        match = _QUANTITY.fullmatch(str(text))
        if match is None:
            raise ValueError(f"{text!r} is not a {scale.what}: {scale.hint}")
        number, letter, suffix = float(match.group(1)), match.group(2).lower(), match.group(3)
    if letter and letter not in scale.letters or suffix and not scale.byte_suffix:
        raise ValueError(f"{text!r} is not a {scale.what}: {scale.hint}")
    if not 0 <= number < math.inf:  # also refuses NaN
        raise ValueError(f"{text!r} is not a {scale.what}: {scale.what}s are finite and not negative")
    value = number * scale.factor(letter)
    if value == math.inf:  # 1e308T
        raise ValueError(f"{text!r} is not a {scale.what}: too large")
    return value


def parse_size(text: str | int | float) -> int:
    """The bytes in ``text`` (binary units, see the module); ValueError when it is not a size."""
    return int(parse_quantity(text, SIZE))


def parse_rate(text: str | int | float) -> float:
    """The bytes a second in ``text`` (decimal units, see the module); ValueError when it is not a rate."""
    return parse_quantity(text, RATE)
