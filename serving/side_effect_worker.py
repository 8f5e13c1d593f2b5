"""The side-effect worker: runs a pipeline's asynchronous side effects after the response is sent.

The response has gone out already, so a side effect whose ``apply`` fails with one of its
``retry_on`` errors (e.g. the event log does not acknowledge: kafka:// broker down) is retried
with the same payload up to ``serving.exposure_log_attempts`` times with exponential backoff
from ``serving.exposure_log_backoff_s``, then counted (``feedrank_side_effect_errors_total``,
for exposures also ``feedrank_exposures_unlogged_total`` and
``feedrank_event_log_errors_total{rpc="GetFeed"}``) and logged at ERROR with its request id; the
worker goes on with the next page. ``submit`` never blocks a response: with the queue full, the
page is counted and logged the same way. ``drain`` on shutdown loses nothing queued."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from features.eventlog import EventLogError
from serving.components import Candidates, FunnelContext, Query, SideEffect
from serving.metrics import Metrics
from serving.side_effects import ExposureLogSideEffect, ServedRecordSideEffect, ShadowScoreSideEffect

log = logging.getLogger("feedrank.serving.side_effects")


class SideEffectWorker:
    def __init__(self, ctx: FunnelContext, metrics: Metrics, maxsize: int = 100_000):
        self.ctx, self.metrics = ctx, metrics
        sv = ctx.cfg.serving
        self.attempts, self.backoff_s = max(1, sv.exposure_log_attempts), sv.exposure_log_backoff_s
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.thread = threading.Thread(target=self._loop, name="side-effects", daemon=True)
        self.thread.start()

    def submit(self, effect: SideEffect, query: Query, page: Candidates) -> None:
        try:
            self.q.put_nowait((effect, query, page))
        except queue.Full:
            self._lost(effect, query, page, f"side-effect queue full ({self.q.maxsize} pages behind)")

    def _lost(self, effect: SideEffect, query: Query, page: Candidates, reason: str, exc_info: bool = False) -> None:
        self.metrics.side_effect_errors.labels(effect.name).inc()
        if effect.unit == "exposures":
            self.metrics.exposures_unlogged.inc(len(page))
        log.error("%s: %d %s of request %s lost: %s", effect.name, len(page), effect.unit, query.request_id,
                  reason, exc_info=exc_info,
                  extra={"fields": {"request_id": query.request_id, "user_id": query.user_id, effect.unit: len(page)}})

    def _apply(self, effect: SideEffect, query: Query, page: Candidates) -> tuple[int, Any]:
        payload = effect.prepare(query, self.ctx, page)
        for attempt in range(1, self.attempts + 1):
            try:
                return effect.apply(self.ctx, payload), payload
            except effect.retry_on as e:
                if attempt >= self.attempts:
                    raise
                self.metrics.side_effect_retries.labels(effect.name).inc()
                log.warning("%s of request %s failed (attempt %d of %d), retrying: %s", effect.name, query.request_id,
                            attempt, self.attempts, e,
                            extra={"fields": {"request_id": query.request_id, "attempt": attempt}})
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                self.q.task_done()
                return
            effect, query, page = item
            try:
                n, payload = self._apply(effect, query, page)
                if isinstance(effect, ShadowScoreSideEffect):
                    self.metrics.shadow_pages.inc(n)
                if isinstance(effect, ServedRecordSideEffect):
                    self.metrics.served_records.inc(n)
                if effect.unit == "exposures":
                    self.metrics.exposures.inc(n)
                    if isinstance(effect, ExposureLogSideEffect) and (missing := effect.without_features(payload)):
                        self.metrics.exposures_without_features.inc(missing)
            except EventLogError as e:
                self.metrics.event_log_errors.labels("GetFeed").inc()
                self._lost(effect, query, page, f"event log unavailable after {self.attempts} attempts: {e}")
            except Exception as e:  # noqa: BLE001 - never kills the worker
                self._lost(effect, query, page, f"{type(e).__name__}: {e}", exc_info=True)
            finally:
                self.q.task_done()

    def drain(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while self.q.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        self.ctx.events.flush()

    def stop(self) -> None:
        self.drain()
        self.q.put(None)
        self.thread.join(timeout=5)
