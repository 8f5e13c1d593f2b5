"""What each funnel stage costs here, so a request never starts a stage it has no time left for.

Each process learns every stage's duration as it runs (an exponentially weighted mean and
variance; the estimate is mean + 3 standard deviations, a high quantile), and
:func:`serving.funnel.run_stages` compares a stage's estimate, plus the estimates of the stages
after it that must run anyway, with the request's remaining deadline. A stage that declares a
cheaper stand-in (``deadline_fallback``: the heavy ranker's is the light ranker's score, the light
ranker's is the ANN similarity and recency) is replaced by it, and the response says
``deadline:<stage>``; a stage without one always runs. Until a stage has run ``WARM_RUNS`` times its
estimate is not trusted and it always runs.
"""

from __future__ import annotations

import math
import threading

WARM_RUNS = 20
ALPHA = 0.05  # weight of the newest run: about the last 20 runs count


class StageCosts:
    """Per stage name: the running estimate of its duration (ms). Thread-safe; one per process."""

    def __init__(self) -> None:
        self._stats: dict[str, tuple[int, float, float]] = {}  # name -> (runs, mean, variance)
        self._lock = threading.Lock()

    def observe(self, name: str, ms: float) -> None:
        with self._lock:
            n, mean, var = self._stats.get(name, (0, ms, 0.0))
            d = ms - mean
            mean += ALPHA * d
            var = (1 - ALPHA) * (var + ALPHA * d * d)
            self._stats[name] = (n + 1, mean, var)

    def expected_ms(self, name: str) -> float:
        """A high estimate of the stage's next duration (0 while it is not warm)."""
        n, mean, var = self._stats.get(name, (0, 0.0, 0.0))
        return mean + 3.0 * math.sqrt(var) if n >= WARM_RUNS else 0.0

    def set(self, name: str, ms: float) -> None:
        """Take ``ms`` as the stage's estimate (tests; a process that measured it elsewhere)."""
        with self._lock:
            self._stats[name] = (WARM_RUNS, float(ms), 0.0)

    def snapshot(self) -> dict[str, float]:
        return {name: round(self.expected_ms(name), 3) for name in sorted(self._stats)}


COSTS = StageCosts()


class Admission:
    """Load shedding by queued work, not by a fixed count: a worker refuses a request (RESOURCE_EXHAUSTED,
    answered at once) when the requests it is already running would take longer than ``max_queued_ms`` to
    finish: their number x the recent time one request takes alone (its wall time divided by the requests
    it shared the worker with). One Python worker runs about one request at a time, so beyond the
    sustainable rate every accepted request would otherwise wait behind all the others and the p99 of
    the accepted ones would grow without bound; with this it stays near ``max_queued_ms`` + one service
    time, and the excess is shed. Nothing is refused before ``WARM_RUNS`` requests have finished."""

    def __init__(self, max_queued_ms: float):
        self.max_queued_ms = float(max_queued_ms)
        self.in_flight = 0
        self.alone_ms = 0.0
        self.done = 0
        self.shed = 0
        self._lock = threading.Lock()

    def enter(self) -> int | None:
        """The number of requests in flight with this one (pass it to :meth:`leave`) when admitted; None when
        refused (:attr:`queued_ms` says why)."""
        with self._lock:
            if self.max_queued_ms and self.done >= WARM_RUNS and self.in_flight and self.queued_ms > self.max_queued_ms:
                self.shed += 1
                return None
            self.in_flight += 1
            return self.in_flight

    @property
    def queued_ms(self) -> float:
        return self.in_flight * self.alone_ms

    def leave(self, ms: float, sharing: int) -> None:
        alone = ms / max(sharing, 1)
        with self._lock:
            self.in_flight -= 1
            self.done += 1
            self.alone_ms = alone if self.alone_ms == 0.0 else self.alone_ms + ALPHA * (alone - self.alone_ms)
