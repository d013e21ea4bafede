"""Pure resilience policies: no trio, time enters as ``now``, randomness injected."""

from .backoff import Backoff, Jitter

__all__ = ["Backoff", "Jitter"]
