"""Side effects of serving a page, declared per pipeline in :mod:`serving.pipelines` and run by
:func:`serving.funnel.run_side_effects`: the seen set before the response, exposure logging after
it on the :class:`serving.side_effect_worker.SideEffectWorker`."""

from __future__ import annotations

from typing import Any

from core.events import BaseEvent, Exposure, FeaturesServed, FeedType, ShadowScored, Source
from core.schema import HEAVY_SCHEMA_HASH
from features.eventlog import EventLogError
from serving.components import SOURCE_NAMES, Candidates, FunnelContext, Query, SideEffect



def page_snapshot_id(query: Query, page: Candidates) -> str | None:
    """The id of a served page's feature rows (the Redis snapshot, the lake's features_served row), carried
    by its exposures and its served record; None for a page served without rows."""
    return f"{query.request_id}:{int(page['position'][0])}" if len(page) and "x" in page else None


class ExposureLogSideEffect(SideEffect):
    """Every served item -> an Exposure event (position, source, model version, experiments), and the exact
    feature rows the heavy ranker scored -> one FeaturesServed event, appended together (the served-data lake
    keeps both; training never recomputes features). The rows also go to a Redis snapshot for the online
    learner; the exposures carry its id. A page served without rows (a degraded ranking) is counted in
    ``feedrank_exposures_without_features_total``.

    The events are built once (``prepare``) and an :class:`EventLogError` append is retried by the worker
    with the same events (same event ids, so a consumer drops a copy that did land), at most
    ``serving.exposure_log_attempts`` times (each attempt waits up to ``events.kafka_delivery_timeout_ms``
    on kafka://)."""

    reads = ("position",)
    asynchronous = True
    retry_on = (EventLogError,)
    unit = "exposures"

    def prepare(self, query: Query, ctx: FunnelContext, page: Candidates) -> list[BaseEvent]:
        if not len(page):
            return []
        snapshot_id = page_snapshot_id(query, page)
        events: list[BaseEvent] = []
        if snapshot_id is not None:
            events.append(FeaturesServed(request_id=query.request_id, snapshot_id=snapshot_id, user_id=query.user_id,
                                         post_ids=page.ids.tolist(), feature_schema=HEAVY_SCHEMA_HASH,
                                         n_features=int(page["x"].shape[1]), rows=FeaturesServed.encode_rows(page["x"]),
                                         ts=query.now_ms))
            try:
                ctx.redis.run(lambda r: ctx.snapshots.put(snapshot_id, page.ids, page["x"]))
            except Exception:  # noqa: BLE001 - the rows are in the event log; the online learner skips this page
                pass
        authors = ctx.catalog.author[page.ids]
        return events + [
            Exposure(request_id=query.request_id, user_id=query.user_id, post_id=int(p), author_id=int(a),
                     position=int(pos), feed_type=FeedType(query.feed_type), source=Source(SOURCE_NAMES[int(s)]),
                     model_version=query.model_version, experiments=query.experiments, snapshot_id=snapshot_id,
                     ts=query.now_ms)
            for p, a, pos, s in zip(page.ids.tolist(), authors.tolist(), page["position"].tolist(), page.source.tolist())]

    def apply(self, ctx: FunnelContext, payload: list[BaseEvent]) -> int:
        if payload:
            ctx.events.append_many(payload)
        return sum(1 for e in payload if isinstance(e, Exposure))

    @staticmethod
    def without_features(payload: list[BaseEvent]) -> int:
        """Exposures of the payload whose feature rows are not logged."""
        return sum(1 for e in payload if isinstance(e, Exposure) and e.snapshot_id is None)


class SeenSideEffect(SideEffect):
    """Served posts join the user's seen set before the response, so no later page or refresh repeats them."""

    def apply(self, ctx: FunnelContext, payload: Any) -> int:
        query, page = payload
        if len(page):
            ctx.record_seen(query.user_id, page.ids.tolist(), query.now_ms)
        return len(page)


class ShadowScoreSideEffect(SideEffect):
    """When a shadow candidate is set (``feedrank models shadow start``), the page's served rows are scored by
    it after the response, beside the serving model's P(head), and both are logged as a ShadowScored event
    (models.shadow evaluates them against the engagements that follow). Nothing served changes."""

    reads = ("x", "heads", "position")
    asynchronous = True
    retry_on = (EventLogError,)
    unit = "pages"

    def prepare(self, query: Query, ctx: FunnelContext, page: Candidates) -> list[BaseEvent]:
        from serving.model_loader import score_heavy

        version = ctx.loader.shadow_version
        if version is None or not len(page) or "x" not in page or version == query.model_version or not query.model_version:
            return []
        cand = score_heavy(ctx.loader.heavy_for(version), page["x"])
        return [ShadowScored(request_id=query.request_id, user_id=query.user_id, post_ids=page.ids.tolist(),
                             positions=page["position"].astype(int).tolist(), current_version=query.model_version,
                             candidate_version=version, current=FeaturesServed.encode_rows(page["heads"]),
                             candidate=FeaturesServed.encode_rows(cand), ts=query.now_ms)]

    def apply(self, ctx: FunnelContext, payload: list[BaseEvent]) -> int:
        if payload:
            ctx.events.append_many(payload)
        return len(payload)


class ServedRecordSideEffect(SideEffect):
    """The page's served record (:mod:`serving.served`: every item's scores, ranks, re-rank reasons and the
    funnel's counts) into Redis under its request id, after the response, so DebugRanking can explain a post
    as it was served for ``serving.served_record_ttl_s``. A failed write is counted in
    ``feedrank_side_effect_errors_total{effect="ServedRecordSideEffect"}``, a written one in
    ``feedrank_served_records_total``; nothing served changes."""

    reads = ("position",)
    asynchronous = True
    unit = "served records"

    def prepare(self, query: Query, ctx: FunnelContext, page: Candidates) -> dict[str, Any] | None:
        from serving.served import page_record

        return page_record(query, page, page_snapshot_id(query, page)) if len(page) else None

    def apply(self, ctx: FunnelContext, payload: dict[str, Any] | None) -> int:
        if payload is None:
            return 0
        ctx.redis.run(lambda r: ctx.served.put(r, payload))
        return 1
