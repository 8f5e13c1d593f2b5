"""A FeedService client with the simulated clients' :class:`~core.feed_api.FeedApi` interface.

The simulator is a trusted token issuer here: it mints each user's HS256 token with the
configured secret (a real app would get tokens from its login service).
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from core.events import ContentType, Engagement, PostPublished
from serving.components import CONTENT_TYPE_CODES, SOURCE_NAMES
from serving.edge import make_token
from serving.protos import pb, rpc
from core.feed_api import FeedItem, FeedPage

FEED_TYPES = {"home": pb.HOME, "explore": pb.EXPLORE, "following": pb.FOLLOWING}
ACTIONS = {"view": pb.VIEW, "click": pb.CLICK, "like": pb.LIKE, "comment": pb.COMMENT, "share": pb.SHARE,
           "dwell": pb.DWELL}
FEEDBACK = {"hide": pb.HIDE, "not_interested": pb.NOT_INTERESTED, "see_less": pb.SEE_LESS}


class GrpcFeedApi:
    def __init__(self, address: str, jwt_secret: str, timeout_s: float = 5.0, admin: bool = False):
        self.channel = grpc.insecure_channel(address)
        self.stub = rpc.FeedServiceStub(self.channel)
        self.secret, self.timeout, self.admin = jwt_secret, timeout_s, admin
        self._tokens: dict[int, tuple[float, list[tuple[str, str]]]] = {}
        self.degraded = 0
        self.latencies_ms: list[float] = []

    def close(self) -> None:
        self.channel.close()

    def _md(self, user: int) -> list[tuple[str, str]]:
        exp, md = self._tokens.get(user, (0.0, []))
        if exp < time.time() + 60:
            md = [("authorization", "Bearer " + make_token(self.secret, user, admin=self.admin, ttl_s=3600))]
            self._tokens[user] = (time.time() + 3600, md)
        return md

    def get_feed(self, user_id: int, feed_type: str = "home", cursor: str = "", limit: int = 20,
                 now_ms: int | None = None) -> FeedPage:
        t0 = time.perf_counter()
        r = self.stub.GetFeed(pb.GetFeedRequest(user_id=user_id, feed_type=FEED_TYPES[feed_type], cursor=cursor,
                                                limit=limit), metadata=self._md(user_id), timeout=self.timeout)
        self.latencies_ms.append((time.perf_counter() - t0) * 1000)
        self.degraded += int(r.degraded)
        items = [FeedItem(it.post_id, it.author_id, it.position, SOURCE_NAMES.get(it.source, "out_of_network"), it.score)
                 for it in r.items]
        return FeedPage(r.request_id, items, r.next_cursor, r.model_version, r.degraded)

    def submit_signals(self, user_id: int, signals: list[Engagement]) -> None:
        if not signals:
            return
        sig = [pb.Signal(post_id=s.post_id, action=ACTIONS[s.action], dwell_ms=s.dwell_ms or 0, position=s.position or 0,
                         request_id=s.request_id or "", ts_ms=s.ts) for s in signals]
        self.stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=user_id, signals=sig), metadata=self._md(user_id),
                                timeout=self.timeout)

    def submit_feedback(self, user_id: int, post_id: int, kind: str, now_ms: int | None = None) -> None:
        self.stub.SubmitFeedback(pb.SubmitFeedbackRequest(user_id=user_id, kind=FEEDBACK[kind], target=pb.POST,
                                                          post_id=post_id, ts_ms=now_ms or 0),
                                 metadata=self._md(user_id), timeout=self.timeout)

    def publish_post(self, post: PostPublished) -> int:
        r = self.stub.PublishPost(pb.PublishPostRequest(
            author_id=post.author_id, topic=post.topic, content_type=CONTENT_TYPE_CODES[ContentType(post.content_type)],
            text=post.text,
            is_repost=not post.is_original, original_post_id=post.original_post_id or 0,
            policy_flagged=post.policy_flagged, post_id=post.post_id, ts_ms=post.ts),
            metadata=self._md(post.author_id), timeout=self.timeout)
        return int(r.post_id)

    def follow(self, user_id: int, author_id: int, now_ms: int | None = None) -> None:
        self.stub.Follow(pb.FollowRequest(user_id=user_id, author_id=author_id, ts_ms=now_ms or 0),
                         metadata=self._md(user_id), timeout=self.timeout)

    def stats(self) -> dict[str, Any]:
        import numpy as np

        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {"get_feed_calls": len(self.latencies_ms), "degraded_responses": self.degraded,
                "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}
