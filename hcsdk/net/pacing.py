"""Pacing a reconnect storm: the server tells each refused client when to come back, and the
client obeys within bounds.

Server side, :class:`AdmissionPacer` measures how fast handshakes are admitted (an EWMA of
completions) and hands each refused client its own future slot, ``1/rate`` after the previous
one, starting after the queue ahead has drained. N refused clients are so spread over about
N/rate seconds instead of all returning in the same second, and none sleeps longer than it must
(a client's own exponential backoff grows to 30 s while the server has room).

Client side, :func:`busy_hint` reads a refusal's ``retry_after`` (JSON field, or the HTTP
``Retry-After`` header) and :func:`paced_delay` clamps and jitters it: a buggy or hostile server
cannot park a client for longer than its own backoff cap, nor spin it with zero or negative
values. Pure code, no I/O; the clock and the random source are injectable for tests.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["AdmissionPacer", "SHORT_RETRY", "busy_hint", "paced_delay"]

#: what a refusal that is not about the queue (one handshake per uuid at a time, one address's
#: share before authentication) asks for: the obstacle ends within about a handshake's time
SHORT_RETRY = 1.0


class AdmissionPacer:
    """Slots for refused handshakes, spaced by the measured admission rate.

    ``completed()`` is called each time a handshake leaves its admission slot; ``retry_after
    (waiting)`` is called for each refusal, with the number of handshakes queued ahead.

    The rate is an EWMA (time constant ``tau``) of completions counted in ``interval`` buckets.
    A storm's first refusals come before any handshake has completed, so until there is a
    measurement the pacer assumes the highest rate it has measured before, or ``initial_rate``
    on a fresh start (this machine admits 150-300 handshakes/s: guessing high costs a cheap
    refusal more, guessing low leaves the server idle while clients sleep). The first bucket
    with completions seeds the EWMA directly (no ramp from zero); ``idle`` seconds without a
    completion end the measurement. A measured rate below ``floor_rate`` (a stalled server)
    counts as the floor, so nothing divides by zero."""

    def __init__(self, initial_rate: float = 200.0, floor_rate: float = 5.0, tau: float = 5.0,
                 interval: float = 0.5, idle: float = 10.0, min_delay: float = 0.5, max_delay: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if min(initial_rate, floor_rate, tau, interval, idle) <= 0 or not 0 < min_delay <= max_delay:
            raise ValueError("AdmissionPacer needs positive rates and times and 0 < min_delay <= max_delay")
        self.initial_rate = initial_rate
        self.floor_rate = floor_rate
        self.interval = interval
        self.idle = idle
        self.min_delay = min_delay
        self.max_delay = max_delay
        self._alpha = 1 - math.exp(-interval / tau)
        self._clock = clock
        self._ewma: float | None = None  # None: nothing measured lately
        self._peak = 0.0
        self._count = 0
        self._bucket_at = clock()
        self._last_done = -math.inf
        self._slot = -math.inf  # the last slot handed out (clock time)

    def completed(self, count: int = 1) -> None:
        """``count`` handshakes left their admission slots now."""
        now = self._clock()
        self._roll(now)
        if self._ewma is None and self._count == 0:
            self._bucket_at = now  # a measurement starts with its first completion
        self._count += count
        self._last_done = now

    def rate(self) -> float:
        """Admissions per second to plan with."""
        self._roll(self._clock())
        if self._ewma is None:
            return max(self.floor_rate, self._peak or self.initial_rate)
        return max(self.floor_rate, self._ewma)

    def retry_after(self, waiting: int) -> float:
        """Seconds the next refused client should wait: a slot of its own after the ``waiting``
        handshakes queued ahead are done, advancing the next slot by one admission's time. The
        slot never runs more than ``max_delay`` ahead: a flood of refusals (anyone can be
        refused, the busy check comes before the credential's) can at worst make clients wait
        the cap, never pile up slots hours ahead."""
        rate = self.rate()
        now = self._clock()
        start = max(self._slot, now + max(0, waiting) / rate)
        self._slot = min(start + 1 / rate, now + self.max_delay)
        return min(self.max_delay, max(self.min_delay, self._slot - now))

    def _roll(self, now: float) -> None:
        """Close the buckets that have ended by ``now`` into the EWMA."""
        buckets = int((now - self._bucket_at) // self.interval)
        if buckets <= 0:
            return
        sample = self._count / self.interval
        if self._ewma is None:
            self._ewma = sample if self._count else None
        else:
            self._ewma += self._alpha * (sample - self._ewma)
        if self._ewma is not None:
            self._ewma *= (1 - self._alpha) ** (buckets - 1)  # the empty buckets since
            self._peak = max(self._peak, self._ewma)
        self._count = 0
        self._bucket_at += buckets * self.interval
        if now - self._last_done > self.idle:
            self._ewma = None


def busy_hint(status: int, body: Any, headers: Mapping[str, str]) -> float | None:
    """The wait a busy refusal asked for, or None when it is not one or names none usable.

    A busy refusal is a 503, 429 or 409 whose JSON says ``kind: "busy"``. The JSON field
    ``retry_after`` (float seconds) wins; the ``Retry-After`` header (integer seconds) is read
    when the field is missing or unusable. NaN, infinities, booleans and strings are unusable;
    any finite number is returned as it is (the caller clamps)."""
    if status not in (409, 429, 503) or not isinstance(body, dict) or body.get("kind") != "busy":
        return None
    field = _finite(body.get("retry_after"))
    if field is not None:
        return field
    raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if raw is not None and raw.strip().isdigit():  # the HTTP-date form is not something we send
        return float(raw.strip())
    return None


def paced_delay(asked: float, floor: float, cap: float, rng: random.Random | None = None) -> float:
    """How long to sleep for a server that asked for ``asked`` seconds: clamped to [floor, cap]
    and jittered by ±20 % (so clients given neighbouring slots do not merge), never beyond cap."""
    rng = rng or random.Random()
    wanted = min(cap, max(floor, asked))
    low, high = 0.8 * wanted, min(cap, 1.2 * wanted)
    return rng.uniform(low, max(low, high))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
