"""V0: the EdgeRank-style feed (affinity x content weight x time decay) over the follow graph.

It is the baseline every learned variant is compared against, and the in-process
:class:`~core.feed_api.FeedApi` the simulated clients use before the gRPC service exists.
Everything it serves and receives is written to the event log as real events, so the
streaming jobs downstream see the same data they will see from the gRPC tier.
The simulated :class:`~sim.world.World` stands in for the post store and the social graph.
"""

from __future__ import annotations

import uuid
from collections import Counter, OrderedDict, defaultdict, deque

import numpy as np

from features.eventlog import EventLog
from core.events import Engagement, Exposure, FeedType, Followed, PostPublished, Source
from core.feed_api import FeedItem, FeedPage
from core.units import HOUR_MS
from sim.world import World

CONTENT_WEIGHT = np.array([1.0, 1.2, 1.4])  # text, image, video
MODEL_VERSION = "v0-edgerank"


class ChronologicalFeed:
    """EdgeRank over posts of followed authors from the last ``window_h`` hours."""

    def __init__(self, world: World, log: EventLog, window_h: float = 48.0, decay_h: float = 12.0,
                 seen_memory: int = 2000, max_requests: int = 10_000):
        self.world, self.log = world, log
        self.window_ms, self.decay_ms = int(window_h * HOUR_MS), decay_h * HOUR_MS
        self.by_author: dict[int, list[int]] = defaultdict(list)
        order = np.lexsort((world.post_ts, world.post_author))
        for a, pids in _groups(world.post_author[order], order):
            self.by_author[a] = pids
        self.affinity: dict[int, Counter] = defaultdict(Counter)
        self.seen: dict[int, deque] = defaultdict(lambda: deque(maxlen=seen_memory))
        self.hidden: dict[int, set[int]] = defaultdict(set)
        self._rankings: OrderedDict[str, list[FeedItem]] = OrderedDict()
        self._max_requests = max_requests

    # ------------------------------------------------------------------ reads
    def rank(self, user_id: int, now_ms: int) -> list[tuple[int, float]]:
        w = self.world
        cands = []
        for a in w.following(user_id).tolist():
            pids = self.by_author.get(a, [])
            # posts are in time order: walk back from the newest while inside the window
            for pid in reversed(pids):
                ts = int(w.post_ts[pid])
                if ts > now_ms:
                    continue
                if now_ms - ts > self.window_ms:
                    break
                cands.append(pid)
        if not cands:
            return []
        p = np.array(cands, dtype=np.int64)
        excluded = set(self.seen[user_id]) | self.hidden[user_id]
        p = p[[x not in excluded for x in p.tolist()]] if excluded else p
        if p.size == 0:
            return []
        aff = np.array([1.0 + self.affinity[user_id][int(a)] for a in w.post_author[p]])
        decay = np.exp(-(now_ms - w.post_ts[p]) / self.decay_ms)
        score = aff * CONTENT_WEIGHT[w.post_ctype[p]] * decay
        order = np.argsort(-score, kind="stable")
        return [(int(p[i]), float(score[i])) for i in order]

    def get_feed(self, user_id: int, feed_type: str = "home", cursor: str = "", limit: int = 20,
                 now_ms: int | None = None) -> FeedPage:
        now = int(now_ms if now_ms is not None else self.world.end_ms)
        if cursor:
            request_id, _, off = cursor.partition(":")
            items = self._rankings.get(request_id)
            if items is None or not off.isdigit():
                raise ValueError(f"unknown or expired cursor {cursor!r}")
            offset = int(off)
        else:
            request_id, offset = uuid.uuid4().hex, 0
            ranked = self.rank(user_id, now)
            items = [FeedItem(pid, int(self.world.post_author[pid]), i + 1, Source.IN_NETWORK.value, s)
                     for i, (pid, s) in enumerate(ranked)]
            self._rankings[request_id] = items
            while len(self._rankings) > self._max_requests:
                self._rankings.popitem(last=False)
        page = items[offset: offset + limit]
        self.seen[user_id].extend(it.post_id for it in page)
        self.log.append_many(
            Exposure(request_id=request_id, user_id=user_id, post_id=it.post_id, author_id=it.author_id,
                     position=it.position, feed_type=FeedType(feed_type), source=Source(it.source),
                     model_version=MODEL_VERSION, ts=now)
            for it in page
        )
        nxt = f"{request_id}:{offset + limit}" if offset + limit < len(items) else ""
        return FeedPage(request_id, page, nxt, MODEL_VERSION)

    # ------------------------------------------------------------------ writes
    def submit_signals(self, user_id: int, signals: list[Engagement]) -> None:
        for s in signals:
            if s.user_id != user_id:
                raise ValueError(f"signal for user {s.user_id} submitted as user {user_id}")
        self.log.append_many(signals)
        for s in signals:
            if s.action in ("click", "like", "comment", "share") and s.author_id is not None:
                self.affinity[user_id][s.author_id] += 1

    def submit_feedback(self, user_id: int, post_id: int, kind: str, now_ms: int | None = None) -> None:
        now = int(now_ms if now_ms is not None else self.world.end_ms)
        self.log.append(Engagement(user_id=user_id, post_id=post_id, action=kind,
                                   author_id=int(self.world.post_author[post_id]), ts=now))
        self.hidden[user_id].add(post_id)

    def publish_post(self, post: PostPublished) -> int:
        self.log.append(post)
        self.by_author[post.author_id].append(post.post_id)
        return post.post_id

    def follow(self, user_id: int, author_id: int, now_ms: int | None = None) -> None:
        now = int(now_ms if now_ms is not None else self.world.end_ms)
        self.log.append(Followed(user_id=user_id, author_id=author_id, ts=now))


def _groups(keys: np.ndarray, values: np.ndarray) -> list[tuple[int, list[int]]]:
    """Split ``values`` into runs of equal ``keys`` (keys sorted)."""
    if keys.size == 0:
        return []
    cut = np.flatnonzero(np.diff(keys)) + 1
    starts = np.concatenate([[0], cut])
    return [(int(keys[s]), v.tolist()) for s, v in zip(starts, np.split(values, cut))]
