"""How long and how often the registry client tries: one policy, one place.

Contract (:class:`RequestPolicy`):

* A *request* is one logical exchange with a registry or a host it sends us
  to: a manifest, a config, a TOC or blob range, a listing page, a ping, a
  token -- with its retries, its redirects and its whole body. It completes
  within ``deadline`` seconds or raises :class:`core.errors.RequestTimeoutError`
  (:meth:`RequestPolicy.bounded`). Per-read timeouts alone cannot bound it: a
  server that sends one byte every few seconds resets them forever.
  ``deadline`` comes from the caller (``--timeout`` on the command line), else
  ``request-timeout`` in ``registries.toml``, else :data:`DEFAULT_DEADLINE`.
* ``timeout`` bounds each connect and each wait for more data (idle).
* Transient failures (connection errors, 429, 5xx) are retried up to
  ``max_attempts`` times with exponential backoff and jitter, or after the
  ``Retry-After`` the registry asked for (at most ``max_retry_after``); no
  retry starts when its wait would end past ``max_retry_time`` or the
  deadline.
* A host that just left a request unanswered after all its attempts is
  *down* for ``down_hold`` seconds: a request to it in that time gets one
  attempt, no backoff. A reader that asks again at once (the kernel reads
  the page a failed read-ahead left behind a second time) fails at once
  instead of spending a second retry budget, and a registry that came back
  is still seen at the first attempt (one connect; any answer ends the hold).
* A blob range whose answer was wrong (short, another offset; a 401/403/404
  a stale redirect or token can cause) is asked again after a refresh of
  the redirect and tokens, within the same ``max_attempts``, backoff and
  deadline (:class:`core.registry.store.RegistryBlobSource`). These are the
  only two places that retry, both by this policy: the layers above
  (:mod:`core.fetch`, the reader, FUSE) pass the typed error through; the
  FUSE read ends in EIO with one log line.
* Uploads (requests carrying a body to store) are bounded by the idle timeout
  only: pushing a big layer over a slow link may take longer than any fixed
  deadline, and it cannot be trickled by the server (we send, it waits).

Why 60 s: every request a read makes is small -- a manifest or config
(kilobytes), a TOC (a few MB), a blob range of at most 8 MiB -- so 60 s
allows about 140 KiB/s for the largest one, and it is what the retry budget
(``max_retry_time``) already allowed for retries; a mount (whose daemon
waits for the same requests) bounds each read separately, above this.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import anyio

from ..errors import RequestTimeoutError

DEFAULT_DEADLINE = 60.0
DEFAULT_IDLE_TIMEOUT = 30.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RequestPolicy:
    """Deadline, idle timeout and retries of every request (module docs)."""

    deadline: float = DEFAULT_DEADLINE
    timeout: float = DEFAULT_IDLE_TIMEOUT
    max_attempts: int = 4
    max_retry_time: float = 60.0
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_retry_after: float = 30.0
    down_hold: float = 2.0

    def __post_init__(self):
        if not self.deadline > 0:
            raise ValueError(f"a request deadline must be positive, not {self.deadline!r}")

    @contextlib.contextmanager
    def bounded(self, what: str) -> Iterator[None]:
        """Run the body within the deadline, else raise
        :class:`RequestTimeoutError` naming ``what`` (``registry HOST: GET PATH``).
        Nested bounds are harmless: the outer one starts first and ends first."""
        with anyio.move_on_after(self.deadline) as scope:
            yield
        if scope.cancelled_caught:
            raise RequestTimeoutError(
                f"{what}: no complete answer within {self.deadline:g} s (a longer limit: "
                "--timeout SECONDS, or request-timeout in registries.toml)")

    def retry_delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt ``attempt + 1``."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        delay = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        return delay * (0.5 + random.random())  # jitter

    def may_retry(self, attempt: int, started: float, delay: float) -> bool:
        """May attempt ``attempt + 1`` start after waiting ``delay`` seconds
        (``started``: ``time.monotonic()`` of the first attempt)?"""
        if attempt >= self.max_attempts:
            return False
        spent = time.monotonic() - started + delay
        return spent <= self.max_retry_time and spent < self.deadline


__all__ = ["RequestPolicy", "DEFAULT_DEADLINE", "DEFAULT_IDLE_TIMEOUT", "RETRY_STATUSES"]
