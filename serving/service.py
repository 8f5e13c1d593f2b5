"""The gRPC FeedService: RPC plumbing over the feed ranker and the serving state.

Every RPC: authenticate (JWT) -> authorise (a user acts only as itself; DebugRanking needs
admin) -> rate-limit (per-user token bucket) -> validate (:mod:`serving.validation`:
INVALID_ARGUMENT with the field and the reason) -> do the work within the deadline. Reads go to
:class:`serving.feed.FeedRanker`. A write appends its event first and answers OK only once the log
accepted it (on kafka://: the broker acknowledged it), else UNAVAILABLE with the state unchanged;
then it is applied to the Redis state.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

import grpc
import numpy as np
from opentelemetry import context as otel_context, trace

from core.config import Config
from core.events import Engagement, Feedback, Followed, InvalidEvent, Unfollowed, is_positive
from features.eventlog import EventLogError
from serving import marshal, validation as v
from serving.ab_tests import Experiments
from serving.deadlines import Admission
from serving.edge import Authenticator, AuthError, CursorError, Forbidden, KeysUnavailable, Principal, SharedRateLimiter
from serving.feed import FeedRanker, Pipelines
from serving.funnel import SourceUnavailable
from serving.metrics import Metrics
from serving.protos import pb, rpc
from serving.served import NotServed
from serving.state import RedisUnavailable, ServingState
from serving.tracing import tracer
from serving.validation import Abort, Invalid

log = logging.getLogger("feedrank.serving.service")
access = logging.getLogger("feedrank.serving.access")


class FeedService(rpc.FeedServiceServicer):
    def __init__(self, cfg: Config, state: ServingState, loader: Any, experiments: Experiments, metrics: Metrics,
                 pipelines: Pipelines | None = None):
        self.cfg, self.state, self.loader, self.metrics = cfg, state, loader, metrics
        self.auth = Authenticator.from_config(cfg)  # refuses placeholder / short / shared keys
        s = cfg.serving  # per-user limits shared by every worker and replica (Redis)
        self.limiter: Any = SharedRateLimiter(state.redis, s.rate_limit_rps, s.rate_limit_burst, "feed")
        self.signal_limiter: Any = SharedRateLimiter(state.redis, s.signal_rate_limit_rps, s.signal_rate_limit_burst,
                                                     "signals")
        self.feeds = FeedRanker(cfg, state, experiments, metrics, pipelines or Pipelines.declared())
        self.admission = Admission(cfg.serving.max_queued_ms)

    @property
    def experiments(self) -> Experiments:
        return self.feeds.experiments

    @experiments.setter
    def experiments(self, value: Experiments) -> None:  # swapped by tests and the lab; the ranker assigns
        self.feeds.experiments = value

    # ------------------------------------------------------------------ plumbing
    def _handle(self, name: str, request: Any, context: grpc.ServicerContext,
                fn: Callable[[Principal, Any, grpc.ServicerContext], Any], user_id: int | None,
                admin: bool = False) -> Any:
        t0 = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        request_id = uuid.uuid4().hex
        response: Any = None
        span = tracer.start_span(f"feedrank.{name}", attributes={"rpc.method": name, "feedrank.user_id": user_id or 0})
        attached = otel_context.attach(trace.set_span_in_context(span))
        try:
            principal = self.auth.principal(context.invocation_metadata())
            if admin and not principal.admin:
                raise Forbidden(f"{name} requires an admin token")
            if user_id is not None and not principal.may_act_as(user_id):
                raise Forbidden(f"token of user {principal.user_id} cannot act as user {user_id}")
            if not self.limiter.allow(user_id if user_id is not None else principal.user_id):
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"rate limit exceeded ({self.limiter.describe()} per user); retry later")
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
        except KeysUnavailable as e:
            code, message = grpc.StatusCode.UNAVAILABLE, f"{e}; retry"
        except SourceUnavailable as e:
            code, message = grpc.StatusCode.UNAVAILABLE, f"{e}; retry"
        except EventLogError as e:  # file://: a write or fsync failed (e.g. a full disk); kafka://: no broker ack
            self.metrics.event_log_errors.labels(name).inc()
            log.warning("%s: event log unavailable: %s", name, e,
                        extra={"fields": {"request_id": request_id, "rpc": name, "user_id": user_id}})
            code, message = grpc.StatusCode.UNAVAILABLE, f"event log unavailable: {e}; nothing was accepted, retry"
        except Exception:  # noqa: BLE001 - never a crash: INTERNAL with the request id to find the log line
            log.exception("%s failed", name, extra={"fields": {"request_id": request_id, "rpc": name}})
            code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
        finally:
            otel_context.detach(attached)
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if response is not None and name == "GetFeed":
                span.set_attributes({"feedrank.request_id": response.request_id, "feedrank.items": len(response.items),
                                     "feedrank.degraded": list(response.degraded_reasons)})
            if code != grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {message}"[:200]))
            span.end()
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

    def _budget_s(self, context: grpc.ServicerContext) -> float:
        budget = self.cfg.serving.request_deadline_ms / 1000.0
        remaining = context.time_remaining()
        return min(budget, remaining) if remaining is not None else budget

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

    # ------------------------------------------------------------------ reads
    def GetFeed(self, request: Any, context: grpc.ServicerContext) -> Any:
        sharing = self.admission.enter()
        if sharing is None:
            self.metrics.rpcs.labels("GetFeed", grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
            self.metrics.shed.inc()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"overloaded: ~{self.admission.queued_ms:.0f} ms of requests queued in this worker "
                          f"(serving.max_queued_ms {self.admission.max_queued_ms:g}); retry with backoff")
        t0 = time.perf_counter()
        try:
            return self._handle("GetFeed", request, context, self._get_feed, request.user_id)
        finally:
            self.admission.leave((time.perf_counter() - t0) * 1000, sharing)

    def _get_feed(self, principal: Principal, req: Any, context: grpc.ServicerContext) -> Any:
        user = v.check_id(req.user_id, "user_id")
        feed = v.feed_type(req.feed_type)
        limit = v.page_limit(req.limit, self.cfg)
        cursor = v.cursor_text(req.cursor) if req.cursor else ""
        got = self.feeds.get_feed(user, feed, limit, cursor, self._budget_s(context))
        degraded = got.degraded
        if not self.loader.store_ok and "model_store_unavailable" not in degraded:
            degraded.append("model_store_unavailable")
        for reason in degraded:
            self.metrics.degraded.labels(reason.split(":")[0]).inc()
        r = got.ranking
        return pb.GetFeedResponse(items=marshal.feed_items(got.page, self.state), next_cursor=got.next_cursor,
                                  model_version=r.model_version, experiments=r.experiments, degraded=bool(degraded),
                                  degraded_reasons=degraded, request_id=r.request_id, from_cache=got.from_cache)

    def DebugRanking(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("DebugRanking", request, context, self._debug, None, admin=True)

    def _debug(self, principal: Principal, req: Any, context: grpc.ServicerContext) -> Any:
        user, post = v.check_id(req.user_id, "user_id"), v.check_id(req.post_id, "post_id")
        v.known_post(self.state.catalog, post)
        if req.request_id and req.cursor:
            raise Invalid("request_id, cursor: give one of them (or neither, for a fresh ranking)")
        if req.request_id or req.cursor:
            request_id = req.request_id or self.feeds.cursor_request(req.cursor, user)
            if len(request_id) > 128:
                raise Invalid("request_id: at most 128 characters")
            try:
                ex = self.feeds.explain_served(user, post, request_id)
            except NotServed as e:
                raise Abort(grpc.StatusCode.NOT_FOUND, str(e)) from None
            return marshal.served_debug_response(ex, self.state)
        feed = v.feed_type(req.feed_type)
        query = self.feeds.query(user, feed, self.cfg.funnel.page_size, self._budget_s(context))
        ranked, one = self.feeds.debug(query, post)
        return marshal.debug_response(query, post, ranked, one)

    # ------------------------------------------------------------------ writes
    def SubmitSignals(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("SubmitSignals", request, context, self._submit_signals, request.user_id)

    def _submit_signals(self, principal: Principal, req: Any, context: grpc.ServicerContext) -> Any:
        user = v.check_id(req.user_id, "user_id")
        now = self.state.clock()
        events: list[Engagement] = v.signals(req, user, self.state.catalog, self.cfg, now)
        if not self.signal_limiter.allow(user, cost=max(len(events), 1)):
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"signal rate limit exceeded ({self.signal_limiter.describe()} per user); retry later")
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
        if kept:
            self.feeds.signalled(user)
        try:
            self.state.record_affinity(user, [int(e.author_id) for e in kept
                                              if is_positive(e.action, e.dwell_ms, self.cfg.heads.long_dwell_ms)])
        except RedisUnavailable:
            log.warning("affinity not updated for user %s (redis unavailable)", user)
        return pb.SubmitSignalsResponse(accepted=len(kept), dropped=dropped)

    def SubmitFeedback(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("SubmitFeedback", request, context, self._submit_feedback, request.user_id)

    def _submit_feedback(self, principal: Principal, req: Any, context: grpc.ServicerContext) -> Any:
        user = v.check_id(req.user_id, "user_id")
        f = v.feedback(req, user, self.state.catalog, self.state.user_id_bound(), self.cfg, self.state.clock())
        if f.post is not None:  # the log is the record: appended (acknowledged on kafka://) before the state changes,
            # so an UNAVAILABLE answer leaves no hidden post or fatigue behind; a Redis failure after it says so
            event: Any = Engagement(user_id=user, post_id=f.post, action=f.kind, author_id=f.author, ts=f.ts)
        else:  # author / topic feedback: logged as well, so it reaches the user's features and outlives Redis
            event = Feedback(user_id=user, action=f.kind, target=f.target, ts=f.ts,
                             author_id=f.author if f.target == "author" else None,
                             topic=f.topic if f.target == "topic" else None)
        self._require_redis()
        self.state.events.append(event)
        self._apply_logged(lambda: self.state.record_feedback(user, f.kind, f.target, f.post, f.author, f.topic, f.ts))
        self.feeds.forget_latest(user)  # a hidden post must not come back from a refresh
        self.feeds.signalled(user)  # ...nor from the next cursor page
        return pb.SubmitFeedbackResponse()

    def PublishPost(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("PublishPost", request, context, self._publish, request.author_id)

    def _publish(self, principal: Principal, req: Any, context: grpc.ServicerContext) -> Any:
        author = v.check_id(req.author_id, "author_id")
        cat = self.state.catalog
        event = v.new_post(req, author, cat, self.cfg, self.state.clock())
        if event.post_id and cat.known(np.array([event.post_id]))[0]:
            raise Abort(grpc.StatusCode.ALREADY_EXISTS, f"post {event.post_id} already exists")
        if not event.post_id:
            event = event.model_copy(update={"post_id": self.state.next_post_id()})
        # the log is the record (the feature job embeds the post and extends the index): appended, acknowledged
        # on kafka://, before any replica learns of the post, so an UNAVAILABLE answer announces nothing
        self._require_redis()
        self.state.events.append(event)
        fanned, lazy = self._apply_logged(lambda: self.state.publish(
            event.post_id, author, event.topic, v.CTYPE_INDEX[event.content_type], event.is_original,
            event.policy_flagged, event.ts))
        return pb.PublishPostResponse(post_id=event.post_id, fanned_out=fanned, lazy_fanout=lazy)

    def Follow(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("Follow", request, context, lambda p, r, c: self._follow(r, True), request.user_id)

    def Unfollow(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle("Unfollow", request, context, lambda p, r, c: self._follow(r, False), request.user_id)

    def _follow(self, req: Any, follow: bool) -> Any:
        user, author = v.check_id(req.user_id, "user_id"), v.check_id(req.author_id, "author_id")
        if user == author:
            raise Invalid("author_id: a user cannot follow themself")
        if author >= self.state.user_id_bound() + self.cfg.serving.id_headroom:
            raise Invalid(f"author_id: unknown user {author}")
        ts = v.event_ts(req.ts_ms, self.state.clock(), "ts_ms")
        if self.state.graph.follows(user, author) == follow:
            return pb.FollowResponse(changed=False)  # nothing changes: nothing logged
        # the event first (acknowledged on kafka://), then the graph and the change stream: an UNAVAILABLE answer
        # leaves the follow state as it was. Two racing calls may both log it; applying a follow twice is a no-op.
        self._require_redis()
        self.state.events.append((Followed if follow else Unfollowed)(user_id=user, author_id=author, ts=ts))
        changed = self._apply_logged(lambda: self.state.follow(user, author, follow))
        if changed:
            self.feeds.forget_latest(user)
        return pb.FollowResponse(changed=changed)
