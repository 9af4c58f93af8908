"""When to try a request again, and how long to wait first.

429 (too many requests) and 503 (overloaded, or models still loading) are retried after
the server's ``Retry-After`` when it sends one, otherwise after an exponential backoff
with jitter; connection and read failures are retried the same way for idempotent calls
(every call this client makes computes and changes nothing on the server).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import time

RETRY_STATUSES = frozenset({429, 503})


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` further tries after the first; waits ``backoff * 2**attempt`` seconds
    (with full jitter, at most ``max_backoff``) unless the server says how long."""

    retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 30.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0)."""
        told = retry_after_seconds(retry_after)
        if told is not None:
            return min(told, self.max_backoff)
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))
