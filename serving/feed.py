"""GetFeed and DebugRanking's work, over the declared pipelines: rank a feed, serve cursor pages and
refreshes from the ranking cache, run the page's side effects.

A ranking is kept per request id for cursor pages (``serving.ranking_ttl_s``) and per (user, feed
type) for refreshes within ``serving.result_cache_ttl_s``, in Redis, so any replica continues it
(:class:`serving.rankings.SharedRankings`): a refresh runs the feed's REFRESH pipeline over the
cached ranking (minus what was seen or hidden since, the top positions re-scored). A cursor page
of a ranking the user has sent a signal or feedback about since it was scored (on any replica:
:meth:`FeedRanker.signalled`) runs the same pipeline over what is not shown yet, so a like on
page 1 re-orders page 2 with the updated features. The seen set is written before the response, so a refresh never repeats an item; exposure logging runs after it on the
side-effect worker.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
import numpy as np

from core.config import Config
from serving import funnel, served
from serving.ab_tests import Experiments
from serving.components import Candidates, Query
from serving.edge import CursorCodec
from serving.funnel import Pipeline
from serving.metrics import Metrics
from serving.rankings import Ranking, RankingCache, SharedRankings
from serving.served import ServedExplanation
from serving.side_effect_worker import SideEffectWorker
from serving.state import ServingState
from serving.validation import FEED_ENUM, Invalid

log = logging.getLogger("feedrank.serving.feed")


@dataclass
class Pipelines:
    """The pipelines a FeedService runs (:mod:`serving.pipelines` by default; the lab swaps HOME for variants)."""

    feeds: dict[str, Pipeline]
    refresh: dict[str, Pipeline]
    debug: Pipeline
    page: list

    @classmethod
    def declared(cls, feeds: dict[str, Pipeline] | None = None) -> "Pipelines":
        from serving import pipelines as p

        return cls(feeds or p.PIPELINES, p.REFRESH, p.DEBUG, p.PAGE)

    def describe(self) -> list[str]:
        """Every pipeline, component by component, in the order each runs."""
        lines: list[str] = []
        for pipe in [*self.feeds.values(), *self.refresh.values()]:
            lines += pipe.describe() + [""]
        lines += ["DEBUG (DebugRanking): the feed type's pipeline above traced for one post, without its side "
                  "effects, then:"]
        lines += self.debug.describe()[1:] + [""]
        lines += ["PAGE (a cursor page of a cached ranking): its rows re-hydrated for the exposure snapshot, then "
                  "the feed's side effects:"]
        lines += [f"  {s.describe()}" for s in self.page]
        return lines


@dataclass
class FeedPage:
    page: Candidates
    ranking: Ranking
    query: Query
    next_cursor: str
    degraded: list[str]
    from_cache: bool


class FeedRanker:
    def __init__(self, cfg: Config, state: ServingState, experiments: Experiments, metrics: Metrics,
                 pipelines: Pipelines):
        self.cfg, self.state, self.experiments, self.metrics, self.pipelines = cfg, state, experiments, metrics, pipelines
        self.cursors = CursorCodec.from_config(cfg)  # serving.cursor_secret, not the JWT key
        self.rankings = SharedRankings(state.redis, RankingCache(cfg.serving.ranking_cache_mb * 2**20),
                                       ttl_s=cfg.serving.ranking_ttl_s, latest_ttl_s=cfg.serving.result_cache_ttl_s)
        self.effects = SideEffectWorker(state, metrics)
        self._evicted = 0  # the ranking cache's evictions already counted

    def query(self, user_id: int, feed: str, limit: int, budget_s: float, request_id: str | None = None) -> Query:
        params, assigned = self.experiments.params(self.cfg, user_id)
        return Query(request_id=request_id or uuid.uuid4().hex, user_id=user_id, feed_type=feed,
                     now_ms=self.state.clock(), limit=limit, params=params, experiments=assigned,
                     deadline=time.monotonic() + budget_s)

    def _count_runs(self, label: str, query: Query, start: int = 0) -> int:
        """``feedrank_component_runs_total{pipeline=label}`` += each component run since ``start``; returns the end."""
        for comp in query.executed[start:]:
            self.metrics.component_runs.labels(label, comp.split(" ", 1)[1]).inc()
        return len(query.executed)

    def _remember(self, r: Ranking, query: Query) -> None:
        self.rankings.put(r, degrade=query.degrade)
        self.metrics.ranking_cache_bytes.set(self.rankings.local.bytes)
        evicted = self.rankings.local.evicted
        if evicted > self._evicted:
            self.metrics.ranking_cache_evictions.inc(evicted - self._evicted)
            self._evicted = evicted

    # ------------------------------------------------------------------ GetFeed
    def get_feed(self, user: int, feed: str, limit: int, cursor: str, budget_s: float) -> FeedPage:
        from_cache = False
        fallbacks: list[str] = []  # the shared ranking store was unavailable: this replica's copies served
        if cursor:
            cur = self.cursors.decode(cursor)
            if cur.get("u") != user or cur.get("f") != feed:
                raise Invalid("cursor: issued for another user or feed type")
            ranking, last_signal = self.rankings.page(cur["r"], user, fallbacks.append)
            offset = int(cur["o"])
            if ranking is None:  # expired (serving.ranking_ttl_s): rank again; the seen filter skips served items
                query = self.query(user, feed, limit, budget_s)
                ranking = self.rank(query, pos_offset=offset)
                offset = 0
            query = self.query(user, feed, limit, budget_s, ranking.request_id)
            if offset and feed in self.pipelines.refresh and last_signal >= ranking.scored_ms:
                # the user acted since this order was computed: re-score what is not shown yet
                ranking = self.refresh(query, ranking, pos_offset=ranking.pos_offset + offset)
                offset, from_cache = 0, True
                self.metrics.cache.labels("rescored_after_signal").inc()
        else:
            query = self.query(user, feed, limit, budget_s)
            cached = self.rankings.latest(user, feed, fallbacks.append)
            ttl_ms = self.cfg.serving.result_cache_ttl_s * 1000
            ranking = None
            if cached is not None and ttl_ms and query.now_ms - cached.created_ms <= ttl_ms and feed in self.pipelines.refresh:
                ranking = self.refresh(query, cached)
                if len(ranking.cands) >= limit:
                    from_cache = True
                    self.metrics.cache.labels("hit").inc()
                else:  # the cached ranking is used up: rank again
                    ranking = None
                    query = self.query(user, feed, limit, budget_s)
            if ranking is None:
                if feed in self.pipelines.refresh:
                    self.metrics.cache.labels("miss").inc()
                ranking = self.rank(query)
            offset = 0
        for reason in fallbacks:
            query.degrade(reason)
        page = ranking.cands.take(np.arange(offset, min(offset + limit, len(ranking.cands))))
        start = len(query.executed)
        if len(page) and "x" not in page and "heads" in page:  # a cached ranking keeps no features: the
            if query.user is None:                             # exposure snapshot holds them as served
                query.user = self.state.user_context(query.user_id, query.degrade, need_cache=False)
            funnel.run_stages(self.pipelines.page, query, self.state, page)
            start = self._count_runs("PAGE", query, start)
        if len(page) and ranking.pos_offset:
            page["position"] = page["position"] + ranking.pos_offset
        query.model_version, query.experiments = ranking.model_version, ranking.experiments
        query.now_ms = self.state.clock()
        pipeline = self.pipelines.refresh[feed] if from_cache else self.pipelines.feeds[feed]
        funnel.run_side_effects(pipeline, query, self.state, page, self.effects.submit)
        self._count_runs(pipeline.name, query, start)
        degraded = list(ranking.degraded) + [r for r in query.degraded if r not in ranking.degraded]
        nxt = ""
        if offset + limit < len(ranking.cands):
            nxt = self.cursors.encode({"r": ranking.request_id, "o": offset + limit, "u": user, "f": feed})
        return FeedPage(page, ranking, query, nxt, degraded, from_cache)

    def rank(self, query: Query, pos_offset: int = 0) -> Ranking:
        t0 = time.perf_counter()
        pipeline = self.pipelines.feeds[query.feed_type]
        cands = funnel.run(pipeline, query, self.state)
        self._count_runs(pipeline.name, query)
        for stage, ms in query.timings_ms.items():
            self.metrics.stage_latency.labels(stage).observe(ms / 1000.0)
        for src, n in query.source_counts.items():
            if not src.startswith("removed:"):
                self.metrics.candidates.labels(src).inc(n)
        query.timings_ms["total"] = (time.perf_counter() - t0) * 1000
        log.debug("rank %s user=%s feed=%s %s", query.request_id, query.user_id, query.feed_type, query.timings_ms)
        r = Ranking(query.request_id, query.user_id, query.feed_type, cands, query.now_ms,
                    query.model_version or (self.state.models.heavy_version if query.feed_type != "following" else ""),
                    query.experiments, query.limit, list(query.degraded), pos_offset, query.now_ms)
        self._remember(r, query)
        return r

    def refresh(self, query: Query, cached: Ranking, pos_offset: int = 0) -> Ranking:
        """The feed's REFRESH pipeline over the cached ranking; the result is cached as the latest (and, for a
        cursor page, under its request id: ``pos_offset`` is where its positions continue)."""
        t0 = time.perf_counter()
        pipeline = self.pipelines.refresh[query.feed_type]
        query.cached = cached.cands
        cands = funnel.run(pipeline, query, self.state)
        query.cached = None
        self._count_runs(pipeline.name, query)
        query.timings_ms["refresh"] = (time.perf_counter() - t0) * 1000
        self.metrics.stage_latency.labels("refresh").observe(query.timings_ms["refresh"] / 1000.0)
        r = Ranking(query.request_id, query.user_id, query.feed_type, cands, cached.created_ms,
                    query.model_version or cached.model_version, query.experiments, query.limit, list(query.degraded),
                    pos_offset, query.now_ms)
        self._remember(r, query)
        return r

    def signalled(self, user: int) -> None:
        """The user sent a signal or feedback: their next cursor page, on any replica, re-scores what it has not shown."""
        self.rankings.signalled(user, self.state.clock())

    def forget_latest(self, user: int) -> None:
        """No refresh serves this user's cached rankings again (a hide, a follow)."""
        self.rankings.forget_latest(user, list(FEED_ENUM))

    # ------------------------------------------------------------------ DebugRanking
    def debug(self, query: Query, post: int) -> tuple[Candidates, Candidates]:
        """The feed's pipeline traced for ``post`` (no side effects: nothing is served), and the DEBUG pipeline's
        row for it: its full feature vector and head scores whatever the funnel decided."""
        query.debug_post = post
        pipeline = self.pipelines.feeds[query.feed_type]
        ranked = funnel.run(pipeline, query, self.state)
        start = self._count_runs(f"{self.pipelines.debug.name}:{pipeline.name}", query)
        i = ranked.index_of(post)
        if i is not None:
            query.debug_source = int(ranked.source[i])
        trace, query.trace = query.trace, []
        counts, pipe_name = list(query.funnel), query.pipeline
        one = funnel.run(self.pipelines.debug, query, self.state)
        self._count_runs(self.pipelines.debug.name, query, start)
        query.trace, query.funnel, query.pipeline = trace, counts, pipe_name
        return ranked, one

    def explain_served(self, user: int, post: int, request_id: str) -> ServedExplanation:
        """``post`` as request ``request_id`` served it to ``user``: its page's record, the features it was served
        with (lake, else snapshot) and the served model's head scores re-computed on them (a check that they
        are the rows it was scored on). :class:`serving.served.NotServed` when there is no such record."""
        from serving.model_loader import score_heavy

        pages = self.state.redis.run(lambda r: self.state.served.pages(r, request_id))
        page, item, counts = served.find(pages, request_id, user, post)
        notes: list[str] = []
        row, source = served.served_row(self.cfg, self.state.snapshots, self.state.redis, page, post, notes)
        out = ServedExplanation(request_id, page, item, counts, row, source, notes=notes)
        if row is None:
            if not notes:
                out.notes.append("features unavailable: the lake has not archived this page and its Redis snapshot "
                                 "expired (serving.snapshot_ttl_s)")
        elif page["model_version"]:
            try:
                out.rescored = score_heavy(self.state.loader.heavy_for(page["model_version"]), row[None, :])[0]
            except Exception as e:  # noqa: BLE001 - the explanation stands without the re-score; it says why
                out.notes.append(f"not re-scored: model {page['model_version']} did not load ({e})")
        return out

    def cursor_request(self, cursor: str, user: int) -> str:
        """The request id a cursor continues (DebugRanking by cursor); Invalid for another user's cursor."""
        cur = self.cursors.decode(cursor)
        if cur.get("u") != user:
            raise Invalid("cursor: issued for another user")
        return str(cur["r"])


def describe_declared() -> list[str]:
    """`feedrank serve --describe`: the declared pipelines, without a running server."""
    return Pipelines.declared().describe()
