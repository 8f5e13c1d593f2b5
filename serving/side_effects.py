"""Side effects of serving a page: run off the request path by the server's side-effect
worker, in order, after the response is built."""

from __future__ import annotations

import time
from typing import Any, Callable

from features.eventlog import EventLogError
from core.events import Exposure, FeedType, Source
from serving.components import SOURCE_NAMES, Candidates, Query, SideEffect


class ExposureLogSideEffect(SideEffect):
    """Every served item -> an Exposure event (position, source, model version, experiments) carrying the id
    of a snapshot of the exact feature rows the heavy ranker scored, stored for the online learner.

    The events are built once and an :class:`EventLogError` append is retried with the same events
    (same event ids, so a consumer drops a copy that did land), at most ``attempts`` times in all;
    ``on_retry(query, attempt, error)`` hears of each retry. Any other error is not retried. The
    server's worker takes ``serving.exposure_log_attempts`` / ``exposure_log_backoff_s`` (each attempt
    waits up to ``events.kafka_delivery_timeout_ms`` on kafka://)."""

    def __init__(self, attempts: int = 1, backoff_s: float = 0.0,
                 on_retry: Callable[[Query, int, Exception], None] | None = None):
        self.attempts, self.backoff_s, self.on_retry = max(1, attempts), backoff_s, on_retry

    def run(self, query: Query, state: Any, page: Candidates) -> None:
        if not len(page):
            return
        snapshot_id = None
        if "x" in page:
            snapshot_id = f"{query.request_id}:{int(page['position'][0])}"
            try:
                state.redis.run(lambda r: state.snapshots.put(snapshot_id, page.ids, page["x"]))
            except Exception:  # noqa: BLE001 - exposures are logged even when snapshots cannot be stored
                snapshot_id = None
        authors = state.catalog.author[page.ids]
        events = [
            Exposure(request_id=query.request_id, user_id=query.user_id, post_id=int(p), author_id=int(a),
                     position=int(pos), feed_type=FeedType(query.feed_type), source=Source(SOURCE_NAMES[int(s)]),
                     model_version=query.model_version, experiments=query.experiments, snapshot_id=snapshot_id,
                     ts=query.now_ms)
            for p, a, pos, s in zip(page.ids.tolist(), authors.tolist(), page["position"].tolist(), page.source.tolist())]
        for attempt in range(1, self.attempts + 1):
            try:
                state.events.append_many(events)
                return
            except EventLogError as e:
                if attempt >= self.attempts:
                    raise
                if self.on_retry is not None:
                    self.on_retry(query, attempt, e)
                time.sleep(self.backoff_s * 2 ** (attempt - 1))


class SeenSideEffect(SideEffect):
    """Served posts join the user's seen set, so no later page or refresh repeats them."""

    def run(self, query: Query, state: Any, page: Candidates) -> None:
        if len(page):
            state.record_seen(query.user_id, page.ids.tolist(), query.now_ms)

