"""Exponential backoff with jitter. Pure: randomness is injected.

``delay(attempt)`` for attempt 0, 1, 2... starts from
``base = min(maximum, initial * multiplier ** attempt)`` and applies the
jitter mode:

- ``none``: exactly ``base``.
- ``proportional``: uniform within ``base * (1 +- factor)`` (the reliability
  catalogue's +-10%; gRPC connection backoff uses +-20%).
- ``full``: uniform in ``[0, base]`` (AWS "full jitter").
- ``decorrelated``: uniform in ``[initial, previous * 3]``, capped at
  ``maximum`` (AWS "decorrelated jitter"); needs the previous delay.
"""

from __future__ import annotations

import enum
import math
import random

import attrs

__all__ = ["Backoff", "Jitter"]


class Jitter(enum.Enum):
    """How a backoff delay is randomised."""

    NONE = "none"
    PROPORTIONAL = "proportional"
    FULL = "full"
    DECORRELATED = "decorrelated"


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{attribute.name} must be a number, not {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be positive and finite, not {value!r}")


@attrs.frozen(kw_only=True)
class Backoff:
    """Delays between attempts: ``initial * multiplier ** n``, capped, jittered."""

    initial: float = attrs.field(validator=_positive)
    maximum: float = attrs.field(validator=_positive)
    multiplier: float = attrs.field(default=2.0, validator=_positive)
    jitter: Jitter = attrs.field(default=Jitter.PROPORTIONAL, converter=Jitter)
    factor: float = attrs.field(default=0.1)

    def __attrs_post_init__(self) -> None:
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, not {self.multiplier}")
        if self.maximum < self.initial:
            raise ValueError(f"maximum ({self.maximum}) must not be below initial ({self.initial})")
        if not 0 <= self.factor < 1:
            raise ValueError(f"jitter factor must be within [0, 1), not {self.factor}")

    def base(self, attempt: int) -> float:
        """The un-jittered delay before retry number ``attempt`` (from 0)."""
        if attempt < 0:
            raise ValueError("attempt must not be negative")
        # Compare in log space so large attempt numbers can't overflow.
        if attempt * math.log(self.multiplier) >= math.log(self.maximum / self.initial):
            return self.maximum
        return self.initial * self.multiplier**attempt

    def delay(self, attempt: int, rng: random.Random, previous: float | None = None) -> float:
        """The delay before retry number ``attempt``, jittered with ``rng``."""
        base = self.base(attempt)
        if self.jitter is Jitter.NONE:
            return base
        if self.jitter is Jitter.PROPORTIONAL:
            return base * (1 + rng.uniform(-self.factor, self.factor))
        if self.jitter is Jitter.FULL:
            return rng.uniform(0, base)
        upper = max(self.initial, (previous if previous is not None else self.initial) * 3)
        return min(self.maximum, rng.uniform(self.initial, upper))

    def bounds(self, attempt: int) -> tuple[float, float]:
        """The smallest and largest delay ``delay(attempt)`` can return."""
        base = self.base(attempt)
        if self.jitter is Jitter.NONE:
            return base, base
        if self.jitter is Jitter.PROPORTIONAL:
            return base * (1 - self.factor), base * (1 + self.factor)
        if self.jitter is Jitter.FULL:
            return 0.0, base
        return self.initial, self.maximum
