"""The gRPC FeedService: a thin tier over the funnel (`feedrank serve`).

Every RPC: authenticate (JWT) -> authorise (a user acts only as itself; DebugRanking
needs admin) -> rate-limit (per-user token bucket) -> validate (INVALID_ARGUMENT with
the field and the reason) -> do the work within the deadline. GetFeed rankings are kept
per request id for cursor pages, and per (user, feed) for refreshes within
``serving.result_cache_ttl_s``, which serve the cached ranking with the top positions
re-scored. Exposure logging runs on a side-effect worker off the request path (bounded
retries, then a metric and an ERROR line); the seen set is written before the response so a
refresh never repeats an item. A write appends its event first and answers OK only once the
log accepted it (on kafka://: the broker acknowledged it), else UNAVAILABLE with the state unchanged.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

from core.config import Config
from features.eventlog import EventLogError
from core.events import (Action, ContentType, Engagement, Feedback, Followed, InvalidEvent, PostPublished,
                             Unfollowed, coerce_event)
from core.schema import HEAD_NAMES, HEAVY_NAMES, N_TOPICS
from core.units import DAY_MS, HOUR_MS
from serving import funnel
from serving.components import CONTENT_TYPE_CODES, Candidates, Query, UserContext
from serving.edge import Authenticator, AuthError, CursorCodec, CursorError, Forbidden, Principal, RateLimiter
from serving.experiments import Experiments
from serving.filters import HiddenFilter, PreviouslySeenFilter
from serving.hydrators import HeavyFeatureHydrator, LightFeatureHydrator
from serving.metrics import Metrics
from serving.pipelines import PIPELINES
from serving.protos import pb, rpc
from serving.rankings import Ranking, RankingCache
from serving.scorers import FeedbackFatigueScorer, HeavyRankerScorer, OriginalBoostScorer, PolicyDemotionScorer
from serving.selectors import RerankSelector
from serving.side_effects import ExposureLogSideEffect, SeenSideEffect
from serving.state import ADS_KEY, RedisUnavailable, ServingState

log = logging.getLogger("feedrank.serving.server")
access = logging.getLogger("feedrank.serving.access")

FEEDS = {pb.FEED_TYPE_UNSPECIFIED: "home", pb.HOME: "home", pb.EXPLORE: "explore", pb.FOLLOWING: "following"}
FEED_ENUM = {"home": pb.HOME, "explore": pb.EXPLORE, "following": pb.FOLLOWING}
SIGNAL_ACTIONS = {pb.VIEW: Action.VIEW, pb.CLICK: Action.CLICK, pb.LIKE: Action.LIKE, pb.COMMENT: Action.COMMENT,
                  pb.SHARE: Action.SHARE, pb.DWELL: Action.DWELL}
FEEDBACK_KINDS = {pb.HIDE: "hide", pb.NOT_INTERESTED: "not_interested", pb.SEE_LESS: "see_less"}
TARGETS = {pb.FEEDBACK_TARGET_UNSPECIFIED: "post", pb.POST: "post", pb.AUTHOR: "author", pb.TOPIC: "topic"}
CTYPES = {code: c for c, code in CONTENT_TYPE_CODES.items()}  # proto code -> ContentType
CTYPE_INDEX = {ContentType.TEXT: 0, ContentType.IMAGE: 1, ContentType.VIDEO: 2}
MAX_LIMIT = 100
MAX_SIGNALS = 500
MAX_ID = 2**63 - 1
PAST_SKEW_MS = 7 * DAY_MS   # client event times may be this old (offline batches)...
FUTURE_SKEW_MS = 300_000         # ...or this far ahead of the server clock
RESCORE_TOP = 2                  # a cached refresh re-scores the top RESCORE_TOP x limit positions


class Invalid(ValueError):
    """Bad input: INVALID_ARGUMENT with this message."""


class Abort(Exception):
    """Any other non-OK status, with its message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class SideEffectWorker:
    """Runs exposure logging after responses are sent; ``drain`` on shutdown loses nothing queued.

    The response has gone out already, so a page whose exposures the event log does not acknowledge
    (kafka:// broker down) is retried a bounded number of times (:class:`ExposureLogSideEffect`), then
    counted (``feedrank_exposures_unlogged_total``, ``feedrank_event_log_errors_total{rpc="GetFeed"}``)
    and logged at ERROR with its request id; the worker goes on with the next page. ``submit`` never
    blocks a response: with the queue full, the page is counted and logged the same way."""

    def __init__(self, state: ServingState, metrics: Metrics):
        self.state, self.metrics = state, metrics
        self.q: queue.Queue = queue.Queue(maxsize=100_000)
        sv = state.cfg.serving
        self.effect = ExposureLogSideEffect(sv.exposure_log_attempts, sv.exposure_log_backoff_s, on_retry=self._retrying)
        self.thread = threading.Thread(target=self._loop, name="side-effects", daemon=True)
        self.thread.start()

    def submit(self, query: Query, page: Candidates) -> None:
        try:
            self.q.put_nowait((query, page))
        except queue.Full:
            self._lost(query, page, f"side-effect queue full ({self.q.maxsize} pages behind)")

    def _retrying(self, query: Query, attempt: int, error: Exception) -> None:
        self.metrics.side_effect_retries.labels(self.effect.name).inc()
        log.warning("exposure logging of request %s failed (attempt %d of %d), retrying: %s", query.request_id,
                    attempt, self.effect.attempts, error,
                    extra={"fields": {"request_id": query.request_id, "attempt": attempt}})

    def _lost(self, query: Query, page: Candidates, reason: str, exc_info: bool = False) -> None:
        self.metrics.side_effect_errors.labels(self.effect.name).inc()
        self.metrics.exposures_unlogged.inc(len(page))
        log.error("%d exposures of request %s not logged: %s", len(page), query.request_id, reason, exc_info=exc_info,
                  extra={"fields": {"request_id": query.request_id, "user_id": query.user_id, "exposures": len(page)}})

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                self.q.task_done()
                return
            query, page = item
            try:
                self.effect.run(query, self.state, page)
                self.metrics.exposures.inc(len(page))
            except EventLogError as e:
                self.metrics.event_log_errors.labels("GetFeed").inc()
                self._lost(query, page, f"event log unavailable after {self.effect.attempts} attempts: {e}")
            except Exception as e:  # noqa: BLE001 - never kills the worker
                self._lost(query, page, f"{type(e).__name__}: {e}", exc_info=True)
            finally:
                self.q.task_done()

    def drain(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while self.q.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        self.state.events.flush()

    def stop(self) -> None:
        self.drain()
        self.q.put(None)
        self.thread.join(timeout=5)


def _ts(value: int, now: int, what: str) -> int:
    if value == 0:
        return now
    if not now - PAST_SKEW_MS <= value <= now + FUTURE_SKEW_MS:
        raise Invalid(f"{what}: {value} is not an epoch-ms time within 7 days before / 5 minutes after now ({now})")
    return int(value)


class FeedService(rpc.FeedServiceServicer):
    def __init__(self, cfg: Config, state: ServingState, loader: Any, experiments: Experiments, metrics: Metrics,
                 pipelines: dict[str, Any] | None = None):
        self.cfg, self.state, self.loader, self.experiments, self.metrics = cfg, state, loader, experiments, metrics
        self.pipelines = pipelines or PIPELINES
        self.auth = Authenticator.from_config(cfg)  # refuses placeholder / short / shared keys
        self.limiter = RateLimiter(cfg.serving.rate_limit_rps, cfg.serving.rate_limit_burst)
        self.signal_limiter = RateLimiter(cfg.serving.signal_rate_limit_rps, cfg.serving.signal_rate_limit_burst)
        self.cursors = CursorCodec.from_config(cfg)  # serving.cursor_secret, not the JWT key
        self.rankings = RankingCache(cfg.serving.ranking_cache_mb * 2**20)  # cursor pages and refreshes
        self.effects = SideEffectWorker(state, metrics)
        self.seen_effect = SeenSideEffect()

    # ------------------------------------------------------------------ plumbing
    def _handle(self, name: str, request: Any, context: grpc.ServicerContext,
                fn: Callable[[Principal, Any, grpc.ServicerContext], Any], user_id: int | None,
                admin: bool = False) -> Any:
        t0 = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        request_id = uuid.uuid4().hex
        response: Any = None
        try:
            principal = self.auth.principal(context.invocation_metadata())
            if admin and not principal.admin:
                raise Forbidden(f"{name} requires an admin token")
            if user_id is not None and not principal.may_act_as(user_id):
                raise Forbidden(f"token of user {principal.user_id} cannot act as user {user_id}")
            if not self.limiter.allow(user_id if user_id is not None else principal.user_id):
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"rate limit exceeded ({self.cfg.serving.rate_limit_rps:g} requests/s, burst "
                            f"{self.cfg.serving.rate_limit_burst}); retry later")
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline already passed")
            response = fn(principal, request, context)
            return response
        except Abort as e:
            code, message = e.code, e.message
        except AuthError as e:
            code, message = grpc.StatusCode.UNAUTHENTICATED, str(e)
        except Forbidden as e:
            code, message = grpc.StatusCode.PERMISSION_DENIED, str(e)
        except (Invalid, CursorError, InvalidEvent) as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except RedisUnavailable as e:
            code, message = grpc.StatusCode.UNAVAILABLE, f"state store unavailable, nothing was written; retry: {e}"
        except EventLogError as e:  # file://: a write or fsync failed (e.g. a full disk); kafka://: no broker ack
            self.metrics.event_log_errors.labels(name).inc()
            log.warning("%s: event log unavailable: %s", name, e,
                        extra={"fields": {"request_id": request_id, "rpc": name, "user_id": user_id}})
            code, message = grpc.StatusCode.UNAVAILABLE, f"event log unavailable: {e}; nothing was accepted, retry"
        except Exception:  # noqa: BLE001 - never a crash: INTERNAL with the request id to find the log line
            log.exception("%s failed", name, extra={"fields": {"request_id": request_id, "rpc": name}})
            code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
        finally:
            ms = (time.perf_counter() - t0) * 1000
            self.metrics.rpcs.labels(name, code.name).inc()
            self.metrics.rpc_latency.labels(name).observe(ms / 1000)
            if access.isEnabledFor(logging.INFO):
                fields = {"rpc": name, "request_id": getattr(response, "request_id", "") or request_id,
                          "user_id": user_id, "code": code.name, "ms": round(ms, 2)}
                if message:
                    fields["error"] = message
                if name == "GetFeed" and response is not None:
                    fields.update(items=len(response.items), degraded=list(response.degraded_reasons),
                                  from_cache=response.from_cache, model_version=response.model_version)
                access.info(name, extra={"fields": fields})
        context.abort(code, message)

    def _require_redis(self) -> None:
        """Before a write's event is logged: Redis known down (circuit open) means UNAVAILABLE with nothing written."""
        if not self.state.redis.available:
            raise RedisUnavailable("redis circuit open")

    @staticmethod
    def _apply_logged(apply: Callable[[], Any]) -> Any:
        """Apply a write to the Redis state after its event was accepted by the log."""
        try:
            return apply()
        except RedisUnavailable as e:
            raise Abort(grpc.StatusCode.UNAVAILABLE,
                        f"state store unavailable: the event was logged but not applied; retry: {e}") from None

    @staticmethod
    def _check_id(value: int, what: str) -> int:
        if not 0 <= value <= MAX_ID:
            raise Invalid(f"{what}: {value} is out of range")
        return int(value)

    def _query(self, user_id: int, feed: str, limit: int, context: grpc.ServicerContext,
               request_id: str | None = None) -> Query:
        params, assigned = self.experiments.params(self.cfg, user_id)
        budget = self.cfg.serving.request_deadline_ms / 1000.0
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        return Query(request_id=request_id or uuid.uuid4().hex, user_id=user_id, feed_type=feed,
                     now_ms=self.state.clock(), limit=limit, params=params, experiments=assigned,
                     deadline=time.monotonic() + budget)

    def _remember(self, r: Ranking) -> None:
        self.rankings.put(r)
        self.metrics.ranking_cache_bytes.set(self.rankings.bytes)
        self.metrics.ranking_cache_evictions.set(self.rankings.evicted)

    # ------------------------------------------------------------------ GetFeed
    def GetFeed(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("GetFeed", request, context, self._get_feed, request.user_id)

    def _get_feed(self, principal: Principal, req: Any, context: grpc.ServicerContext) -> Any:
        user = self._check_id(req.user_id, "user_id")
        if req.feed_type not in FEEDS:
            raise Invalid(f"feed_type: unknown value {req.feed_type} (HOME, EXPLORE or FOLLOWING)")
        feed = FEEDS[req.feed_type]
        if req.limit > MAX_LIMIT:
            raise Invalid(f"limit: at most {MAX_LIMIT}, got {req.limit}")
        limit = req.limit or self.cfg.funnel.page_size
        from_cache = False
        if req.cursor:
            if not req.cursor.isascii() or len(req.cursor) > 1024:
                raise Invalid("cursor: not a cursor this service issued")
            cur = self.cursors.decode(req.cursor)
            if cur.get("u") != user or cur.get("f") != feed:
                raise Invalid("cursor: issued for another user or feed type")
            ranking = self.rankings.get(cur["r"])
            offset = int(cur["o"])
            if ranking is None:  # expired or ranked on another replica: rank again; the seen filter skips served items
                query = self._query(user, feed, limit, context)
                ranking = self._rank(query, pos_offset=offset)
                offset = 0
            query = self._query(user, feed, limit, context, ranking.request_id)
        else:
            query = self._query(user, feed, limit, context)
            cached = self.rankings.latest(user, feed)
            ttl_ms = self.cfg.serving.result_cache_ttl_s * 1000
            ranking = None
            if cached is not None and ttl_ms and query.now_ms - cached.created_ms <= ttl_ms and feed != "following":
                ranking = self._refresh(query, cached)
                if len(ranking.cands) >= limit:
                    from_cache = True
                    self.metrics.cache.labels("hit").inc()
                else:  # the cached ranking is used up: rank again
                    ranking = None
                    query = self._query(user, feed, limit, context)
            if ranking is None:
                if feed != "following":
                    self.metrics.cache.labels("miss").inc()
                ranking = self._rank(query)
            offset = 0
        page = ranking.cands.take(np.arange(offset, min(offset + limit, len(ranking.cands))))
        if len(page) and "x" not in page and "heads" in page:  # a cached ranking keeps no features: the
            self._rehydrate(query, page)                       # exposure snapshot holds them as served
        if len(page) and ranking.pos_offset:
            page["position"] = page["position"] + ranking.pos_offset
        query.model_version, query.experiments = ranking.model_version, ranking.experiments
        query.now_ms = self.state.clock()
        degraded = list(ranking.degraded)
        try:
            self.seen_effect.run(query, self.state, page)
        except RedisUnavailable:
            if "redis_unavailable" not in degraded:
                degraded.append("redis_unavailable")
        self.effects.submit(query, page)
        nxt = ""
        if offset + limit < len(ranking.cands):
            nxt = self.cursors.encode({"r": ranking.request_id, "o": offset + limit, "u": user, "f": feed})
        if not self.loader.store_ok and "model_store_unavailable" not in degraded:
            degraded.append("model_store_unavailable")
        for reason in degraded:
            self.metrics.degraded.labels(reason.split(":")[0]).inc()
        return pb.GetFeedResponse(items=self._items(page), next_cursor=nxt, model_version=ranking.model_version,
                                  experiments=ranking.experiments, degraded=bool(degraded), degraded_reasons=degraded,
                                  request_id=ranking.request_id, from_cache=from_cache)

    def _rank(self, query: Query, pos_offset: int = 0) -> Ranking:
        t0 = time.perf_counter()
        query.user = self.state.user_context(query.user_id, query.degrade, need_cache=query.feed_type != "explore")
        query.timings_ms["user"] = (time.perf_counter() - t0) * 1000
        cands = funnel.run(self.pipelines[query.feed_type], query, self.state)
        for stage, ms in query.timings_ms.items():
            self.metrics.stage_latency.labels(stage).observe(ms / 1000.0)
        for src, n in query.source_counts.items():
            if not src.startswith("removed:"):
                self.metrics.candidates.labels(src).inc(n)
        query.timings_ms["total"] = (time.perf_counter() - t0) * 1000
        log.debug("rank %s user=%s feed=%s %s", query.request_id, query.user_id, query.feed_type, query.timings_ms)
        r = Ranking(query.request_id, query.user_id, query.feed_type, cands, query.now_ms,
                    query.model_version or (self.state.models.heavy_version if query.feed_type != "following" else ""),
                    query.experiments, query.limit, list(query.degraded), pos_offset)
        self._remember(r)
        return r

    def _rehydrate(self, query: Query, page: Candidates) -> None:
        """The heavy features of a cached page's rows, read now (scores stay those it was ranked with)."""
        if query.user is None:
            query.user = self.state.user_context(query.user_id, query.degrade, need_cache=False)
        for stage in (LightFeatureHydrator(), HeavyFeatureHydrator()):
            stage.hydrate(query, self.state, page)

    def _refresh(self, query: Query, cached: Ranking) -> Ranking:
        """Serve the cached ranking minus what was seen or hidden since, with the top positions re-scored."""
        t0 = time.perf_counter()
        query.user = self.state.user_context(query.user_id, query.degrade, need_cache=False)
        cands = cached.cands
        for f in (PreviouslySeenFilter(), HiddenFilter()):
            if len(cands):
                cands = cands.take(np.flatnonzero(f.keep(query, self.state, cands)))
        top = min(len(cands), RESCORE_TOP * query.limit)
        if top and "heads" in cands:  # ranked by the heavy ranker (not chronological)
            head = cands.take(np.arange(top))
            for stage in (LightFeatureHydrator(), HeavyFeatureHydrator()):
                stage.hydrate(query, self.state, head)
            for scorer in (HeavyRankerScorer(), FeedbackFatigueScorer(), PolicyDemotionScorer(), OriginalBoostScorer()):
                scorer.score(query, self.state, head)
            rest = cands.take(np.arange(top, len(cands)))
            cands = Candidates.concat([head, rest])
        if len(cands) and "score" in cands:
            cands = RerankSelector().select(query, self.state, cands)
        query.timings_ms["refresh"] = (time.perf_counter() - t0) * 1000
        self.metrics.stage_latency.labels("refresh").observe(query.timings_ms["refresh"] / 1000.0)
        r = Ranking(query.request_id, query.user_id, query.feed_type, cands, cached.created_ms,
                    query.model_version or cached.model_version, query.experiments, query.limit, list(query.degraded))
        self._remember(r)
        return r

    def _items(self, page: Candidates) -> list[Any]:
        out = []
        heads = page["heads"] if "heads" in page else None
        reasons = page["reasons"] if "reasons" in page else None
        authors = self.state.catalog.author[page.ids]
        fresh_ms = self.cfg.rerank.fresh_hours * HOUR_MS
        now = self.state.clock()
        for i in range(len(page)):
            src = int(page.source[i])
            why = [{1: "followed_author", 2: "interest_match", 3: "sponsored", 4: "trending"}.get(src, "candidate")]
            if now - self.state.catalog.published_ms[page.ids[i]] <= fresh_ms:
                why.append("fresh")
            if reasons is not None:
                why += [r for r in reasons[i] if r not in why]
            hs = pb.HeadScores(**{h: float(heads[i, j]) for j, h in enumerate(HEAD_NAMES)}) if heads is not None else None
            out.append(pb.FeedItem(post_id=int(page.ids[i]), author_id=int(authors[i]),
                                   score=float(page["score"][i]) if "score" in page else 0.0, heads=hs, source=src,
                                   position=int(page["position"][i]), reasons=why))
        return out

    # ------------------------------------------------------------------ writes
    def SubmitSignals(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("SubmitSignals", request, context, self._submit_signals, request.user_id)

    def _submit_signals(self, principal: Principal, req: Any, context: grpc.ServicerContext) -> Any:
        user = self._check_id(req.user_id, "user_id")
        if len(req.signals) > MAX_SIGNALS:
            raise Invalid(f"signals: at most {MAX_SIGNALS} per call, got {len(req.signals)}")
        now = self.state.clock()
        cat = self.state.catalog
        events: list[Engagement] = []
        for i, s in enumerate(req.signals):
            if s.action not in SIGNAL_ACTIONS:
                raise Invalid(f"signals[{i}].action: unknown value {s.action}")
            if not cat.known(np.array([s.post_id]))[0]:
                raise Invalid(f"signals[{i}].post_id: unknown post {s.post_id}")
            action = SIGNAL_ACTIONS[s.action]
            if action == Action.DWELL and s.dwell_ms == 0:
                raise Invalid(f"signals[{i}].dwell_ms: required (> 0) for DWELL")
            if action != Action.DWELL and s.dwell_ms:
                raise Invalid(f"signals[{i}].dwell_ms: only allowed for DWELL")
            if len(s.request_id) > self.cfg.serving.max_request_id_chars:
                raise Invalid(f"signals[{i}].request_id: at most {self.cfg.serving.max_request_id_chars} characters")
            author = int(cat.author[s.post_id])
            try:
                events.append(Engagement(user_id=user, post_id=int(s.post_id), action=action,
                                         dwell_ms=int(s.dwell_ms) if action == Action.DWELL else None, author_id=author,
                                         position=int(s.position) or None, request_id=s.request_id or None,
                                         ts=_ts(s.ts_ms, now, f"signals[{i}].ts_ms")))
            except ValueError as e:
                raise Invalid(f"signals[{i}]: {e}") from None
        if not self.signal_limiter.allow(user, cost=max(len(events), 1)):
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"signal rate limit exceeded ({self.cfg.serving.signal_rate_limit_rps:g} signals/s, burst "
                        f"{self.cfg.serving.signal_rate_limit_burst}); retry later")
        dropped: dict[str, int] = {}
        try:  # only what was served counts (a service's admin token may report other surfaces), and each
            # action once per post: injected clicks change no CTR
            why = (self.state.check_signals(user, [(e.action, e.post_id) for e in events], now,
                                            require_served=not principal.admin) if events else [])
        except RedisUnavailable:
            why = [None] * len(events)
            self.metrics.signals.labels("unvalidated").inc(len(events))
            log.warning("signals of user %s accepted unvalidated (redis unavailable)", user)
        else:
            for reason in why:
                if reason is not None:
                    dropped[reason] = dropped.get(reason, 0) + 1
            for reason, n in dropped.items():
                self.metrics.signals.labels(reason).inc(n)
        kept = [e for e, reason in zip(events, why) if reason is None]
        try:
            self.state.events.append_many(kept)  # the log is the record: accepted once written here
        except EventLogError:
            try:  # nothing was accepted: the client's retry must count, not be dropped as "repeated"
                self.state.release_signals(user, [(e.action, e.post_id) for e in kept])
            except RedisUnavailable:
                log.warning("signals of user %s not released after a failed append (redis unavailable): a retry "
                            "within %s s is dropped as repeated", user, self.cfg.serving.signal_window_s)
            raise
        self.metrics.signals.labels("accepted").inc(len(kept))
        clicked_authors = [int(e.author_id) for e in kept if e.action == Action.CLICK]
        try:
            self.state.record_affinity(user, clicked_authors)
        except RedisUnavailable:
            log.warning("affinity not updated for user %s (redis unavailable)", user)
        return pb.SubmitSignalsResponse(accepted=len(kept), dropped=dropped)

    def SubmitFeedback(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("SubmitFeedback", request, context, self._submit_feedback, request.user_id)

    def _submit_feedback(self, principal: Principal, req: Any, context: grpc.ServicerContext) -> Any:
        user = self._check_id(req.user_id, "user_id")
        if req.kind not in FEEDBACK_KINDS:
            raise Invalid("kind: HIDE, NOT_INTERESTED or SEE_LESS required")
        if req.target not in TARGETS:
            raise Invalid(f"target: unknown value {req.target}")
        kind, target = FEEDBACK_KINDS[req.kind], TARGETS[req.target]
        cat = self.state.catalog
        post = author = topic = None
        has_post = target == "post" or req.post_id != 0
        if has_post:
            if not cat.known(np.array([req.post_id]))[0]:
                raise Invalid(f"post_id: unknown post {req.post_id}")
            post = int(req.post_id)
            author, topic = int(cat.author[post]), int(cat.topic[post])
        if target == "author":
            author = self._check_id(req.author_id, "author_id") if req.author_id or post is None else author
            if author >= self.state.user_id_bound() + self.cfg.serving.id_headroom:
                raise Invalid(f"author_id: unknown user {author}")
        if target == "topic":
            if not 0 <= req.topic < N_TOPICS:
                raise Invalid(f"topic: must be in [0, {N_TOPICS}), got {req.topic}")
            topic = int(req.topic)
        now = self.state.clock()
        ts = _ts(req.ts_ms, now, "ts_ms")
        if post is not None:  # the log is the record: appended (acknowledged on kafka://) before the state changes,
            # so an UNAVAILABLE answer leaves no hidden post or fatigue behind; a Redis failure after it says so
            event = Engagement(user_id=user, post_id=post, action=kind, author_id=author, ts=ts)
            self._require_redis()
            self.state.events.append(event)
            self._apply_logged(lambda: self.state.record_feedback(user, kind, target, post, author, topic, ts))
        else:  # author / topic feedback: logged as well, so it reaches the user's features and outlives Redis
            event = Feedback(user_id=user, action=kind, target=target, ts=ts,
                             author_id=author if target == "author" else None,
                             topic=topic if target == "topic" else None)
            self._require_redis()
            self.state.events.append(event)
            self._apply_logged(lambda: self.state.record_feedback(user, kind, target, post, author, topic, ts))
        self.rankings.forget_latest(user, list(FEED_ENUM))  # a hidden post must not come back from a refresh
        return pb.SubmitFeedbackResponse()

    def PublishPost(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("PublishPost", request, context, self._publish, request.author_id)

    def _publish(self, principal: Principal, req: Any, context: grpc.ServicerContext) -> Any:
        author = self._check_id(req.author_id, "author_id")
        if not 0 <= req.topic < N_TOPICS:
            raise Invalid(f"topic: must be in [0, {N_TOPICS}), got {req.topic}")
        if req.content_type not in CTYPES:
            raise Invalid("content_type: TEXT, IMAGE or VIDEO required")
        if len(req.text) > self.cfg.serving.max_text_chars:
            raise Invalid(f"text: at most {self.cfg.serving.max_text_chars} characters, got {len(req.text)}")
        cat = self.state.catalog
        if req.is_repost and (req.original_post_id == 0 or not cat.known(np.array([req.original_post_id]))[0]):
            raise Invalid(f"original_post_id: a repost needs a known post, got {req.original_post_id}")
        if not req.is_repost and req.original_post_id:
            raise Invalid("original_post_id: only allowed for a repost")
        if req.post_id >= cat.count + self.cfg.serving.id_headroom:
            raise Invalid(f"post_id: {req.post_id} is beyond the ids this service issues (< {cat.count} known posts "
                          f"+ {self.cfg.serving.id_headroom}); leave it 0 and the server assigns one")
        if req.post_id and cat.known(np.array([req.post_id]))[0]:
            raise Abort(grpc.StatusCode.ALREADY_EXISTS, f"post {req.post_id} already exists")
        now = self.state.clock()
        post_id = self._check_id(req.post_id, "post_id") if req.post_id else self.state.next_post_id()
        ctype = CTYPES[req.content_type]
        event = coerce_event(PostPublished(
            post_id=post_id, author_id=author, topic=int(req.topic), content_type=ctype, is_original=not req.is_repost,
            original_post_id=int(req.original_post_id) if req.is_repost else None, policy_flagged=req.policy_flagged,
            text=req.text, ts=_ts(req.ts_ms, now, "ts_ms")))
        # the log is the record (the feature job embeds the post and extends the index): appended, acknowledged
        # on kafka://, before any replica learns of the post, so an UNAVAILABLE answer announces nothing
        self._require_redis()
        self.state.events.append(event)
        fanned, lazy = self._apply_logged(lambda: self.state.publish(
            post_id, author, int(req.topic), CTYPE_INDEX[ctype], not req.is_repost, req.policy_flagged, event.ts))
        return pb.PublishPostResponse(post_id=post_id, fanned_out=fanned, lazy_fanout=lazy)

    def Follow(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("Follow", request, context, lambda p, r, c: self._follow(r, True), request.user_id)

    def Unfollow(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("Unfollow", request, context, lambda p, r, c: self._follow(r, False), request.user_id)

    def _follow(self, req: Any, follow: bool) -> Any:
        user, author = self._check_id(req.user_id, "user_id"), self._check_id(req.author_id, "author_id")
        if user == author:
            raise Invalid("author_id: a user cannot follow themself")
        if author >= self.state.user_id_bound() + self.cfg.serving.id_headroom:
            raise Invalid(f"author_id: unknown user {author}")
        ts = _ts(req.ts_ms, self.state.clock(), "ts_ms")
        if self.state.graph.follows(user, author) == follow:
            return pb.FollowResponse(changed=False)  # nothing changes: nothing logged
        # the event first (acknowledged on kafka://), then the graph and the change stream: an UNAVAILABLE answer
        # leaves the follow state as it was. Two racing calls may both log it; applying a follow twice is a no-op.
        self._require_redis()
        self.state.events.append((Followed if follow else Unfollowed)(user_id=user, author_id=author, ts=ts))
        changed = self._apply_logged(lambda: self.state.follow(user, author, follow))
        if changed:
            self.rankings.forget_latest(user, list(FEED_ENUM))
        return pb.FollowResponse(changed=changed)

    # ------------------------------------------------------------------ DebugRanking
    def DebugRanking(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("DebugRanking", request, context, self._debug, None, admin=True)

    def _debug(self, principal: Principal, req: Any, context: grpc.ServicerContext) -> Any:
        user, post = self._check_id(req.user_id, "user_id"), self._check_id(req.post_id, "post_id")
        if not self.state.catalog.known(np.array([post]))[0]:
            raise Invalid(f"post_id: unknown post {post}")
        if req.feed_type not in FEEDS:
            raise Invalid(f"feed_type: unknown value {req.feed_type} (HOME, EXPLORE or FOLLOWING)")
        feed = FEEDS[req.feed_type]
        query = self._query(user, feed, self.cfg.funnel.page_size, context)
        query.debug_post = post
        query.user = self.state.user_context(user, query.degrade, need_cache=True)
        ranked = funnel.run(self.pipelines[feed], query, self.state)
        i = ranked.index_of(post)
        served = i is not None and i < query.limit
        # the full feature vector and head scores of this post for this user, whatever the funnel decided
        one = Candidates(np.array([post]), np.array([ranked.source[i] if i is not None else 2]),
                         ann=np.zeros(1, dtype=np.float32),
                         bid=np.array([self.state.ads.get(post, 0.0)], dtype=np.float32))  # an ad scores bid x pCTR
        LightFeatureHydrator().hydrate(query, self.state, one)
        HeavyFeatureHydrator().hydrate(query, self.state, one)
        HeavyRankerScorer().score(query, self.state, one)
        stages = [pb.StageDecision(stage=t["stage"], decision=t["decision"], score=t["score"], rank=t["rank"],
                                   of=t["of"], detail=t["detail"]) for t in query.trace]
        return pb.DebugRankingResponse(
            post_id=post, served=served, position=int(ranked["position"][i]) if i is not None else 0,
            features={n: float(v) for n, v in zip(HEAVY_NAMES, one["x"][0])},
            heads=pb.HeadScores(**{h: float(one["heads"][0, j]) for j, h in enumerate(HEAD_NAMES)}),
            stages=stages, model_version=query.model_version, experiments=query.experiments)


# ---------------------------------------------------------------------------- server


@dataclass(frozen=True)
class _Undecodable:
    """What a request's bytes that are not its message parse to (instead of gRPC's logged traceback and INTERNAL)."""

    message: str
    error: str


def add_feed_service(service: FeedService, server: grpc.Server, metrics: Metrics) -> None:
    """Register the FeedService like the generated ``add_FeedServiceServicer_to_server``, with a
    deserializer that never raises: bytes that are not the request message are answered
    INVALID_ARGUMENT before any other work, counted in ``feedrank_rpcs_total``, and logged
    without a traceback."""
    from google.protobuf.message import DecodeError

    desc = pb.DESCRIPTOR.services_by_name["FeedService"]

    def parser(cls: Any) -> Callable[[bytes], Any]:
        def parse(data: bytes) -> Any:
            try:
                return cls.FromString(data)
            except (DecodeError, RuntimeError, ValueError) as e:
                return _Undecodable(cls.DESCRIPTOR.name, str(e)[:200])
        return parse

    def behaviour(name: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        method = getattr(service, name)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                metrics.rpcs.labels(name, grpc.StatusCode.INVALID_ARGUMENT.name).inc()
                access.info(name, extra={"fields": {"rpc": name, "code": "INVALID_ARGUMENT", "error": request.error}})
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {request.message} message")
            return method(request, context)
        return call

    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            behaviour(m.name), request_deserializer=parser(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString)
        for m in desc.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
    server.add_registered_method_handlers(desc.full_name, handlers)


def seed_ads(state: ServingState, n: int, seed: int = 7) -> int:
    """A small sponsored inventory when none exists: recent original, unflagged posts with log-normal bids."""
    if n <= 0 or state.catalog.n == 0:
        return 0
    r = state.redis.client
    if r.hlen(ADS_KEY):
        return 0
    cat = state.catalog
    ok = np.flatnonzero((cat.author[: cat.n] >= 0) & cat.original[: cat.n] & ~cat.flagged[: cat.n])
    recent = ok[np.argsort(-cat.published_ms[ok], kind="stable")[: max(n * 20, n)]]
    rng = np.random.default_rng(seed)
    pick = rng.choice(recent, size=min(n, recent.size), replace=False)
    bids = np.round(rng.lognormal(0.0, 0.5, size=pick.size), 3)
    r.hset(ADS_KEY, mapping={str(int(p)): float(b) for p, b in zip(pick, bids)})
    return int(pick.size)


class Server:
    """A running FeedService: gRPC + health + reflection (+ metrics endpoint)."""

    def __init__(self, cfg: Config, bootstrap_dir: str | Path | None = None, clock: Callable[[], int] | None = None,
                 port: int | None = None, metrics_port: int | None = None, workers: int = 8,
                 reuse_port: bool = False, pipelines: dict[str, Any] | None = None):
        import faiss
        import torch
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from serving.models import ModelLoader

        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        self.cfg = cfg
        self.metrics = Metrics()
        self.state = ServingState(cfg, clock=clock, bootstrap_dir=bootstrap_dir)
        self.loader = ModelLoader(cfg, self.state)
        self.loader.load()
        self.state.loader = self.loader
        self.loader.poll_delta()
        self.metrics.set_models(self.loader.models.versions())
        seed_ads(self.state, cfg.candidates.ad_inventory)
        try:
            self.state.refresh()
        except RedisUnavailable:
            pass
        self.state.start(refresh_s=cfg.serving.feature_refresh_ms / 1000.0)
        self.loader.start()
        experiments = Experiments.load(cfg.path(cfg.serving.experiments_file)).check(cfg)
        self.service = FeedService(cfg, self.state, self.loader, experiments, self.metrics, pipelines)
        self._warm_up()
        from concurrent.futures import ThreadPoolExecutor

        # Beyond max_concurrent_rpcs in flight, gRPC answers RESOURCE_EXHAUSTED at once: an overloaded
        # worker sheds load instead of queueing requests until every one of them misses its deadline.
        self.server = grpc.server(ThreadPoolExecutor(max_workers=workers),
                                  options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
                                  maximum_concurrent_rpcs=cfg.serving.max_concurrent_rpcs)
        add_feed_service(self.service, self.server, self.metrics)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["FeedService"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server)
        self.port = self.server.add_insecure_port(f"{cfg.serving.host}:{port if port is not None else cfg.serving.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot bind {cfg.serving.host}:{port or cfg.serving.port}")
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(pb.DESCRIPTOR.services_by_name["FeedService"].full_name, health_pb2.HealthCheckResponse.SERVING)
        mport = metrics_port if metrics_port is not None else cfg.serving.metrics_port
        self.metrics_port = mport
        if mport:
            self.metrics.serve(mport, cfg.serving.host)
        self._watch = threading.Thread(target=self._watch_models, daemon=True, name="model-metrics")
        self._stop = threading.Event()
        self._watch.start()
        gc.collect()
        gc.freeze()  # start-up objects never move to older generations' scans again

    def _warm_up(self) -> None:
        """One full HOME ranking before SERVING: first FAISS search, first TorchScript call (profiling
        executor) and numpy paths are several times slower than later ones."""
        from serving.experiments import Params

        for _ in range(3):
            q = Query(request_id="warm-up", user_id=-1, feed_type="home", now_ms=self.state.clock(), limit=20,
                      params=Params(tuple(self.cfg.heads.weights().values()), self.cfg.rerank), experiments={},
                      deadline=time.monotonic() + 5.0)
            q.user = UserContext(user_id=-1, cached_candidates=np.zeros(0, dtype=np.int64))
            q.user.embedding = self.loader.models.user_embedding(q.user)
            funnel.run(PIPELINES["home"], q, self.state)

    def _watch_models(self) -> None:
        while not self._stop.wait(1.0):
            self.metrics.set_models(self.loader.models.versions())

    @property
    def address(self) -> str:
        return f"{self.cfg.serving.host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        from grpc_health.v1 import health_pb2

        self.health.enter_graceful_shutdown()
        self._stop.set()
        self.server.stop(grace).wait()
        self.service.effects.stop()
        self.loader.stop()
        self.state.stop()
        del health_pb2

    def wait(self) -> None:
        self.server.wait_for_termination()
