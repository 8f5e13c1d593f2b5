"""Simulated clients: people who open the app, scroll, engage, give feedback and follow;
creators who publish. They talk to any :class:`FeedApi` — the in-process V0 feed today,
the gRPC FeedService once it exists — and behave exactly as the ground truth says.

Scrolling: a user sees items in order and stops after each with probability
``1 - continue_prob`` (loading the next page when a page runs out). Each item in the
viewport is reported as a ``view`` signal; it is *examined* with the true
position-dependent probability, and examined items are acted on per :mod:`sim.truth`.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from core.config import Clients
from core.events import Action, ContentType, Engagement, PostPublished
from core.feed_api import FeedApi, FeedItem
from sim import truth
from sim.world import World

CTYPE_VALUES = [c.value for c in ContentType]
log = logging.getLogger(__name__)


class Clock(Protocol):
    def now_ms(self) -> int: ...
    def sleep_until(self, t_ms: int) -> None: ...


class SimClock:
    """Simulated time: jumps instantly (offline runs, tests)."""

    def __init__(self, start_ms: int):
        self._t = start_ms

    def now_ms(self) -> int:
        return self._t

    def sleep_until(self, t_ms: int) -> None:
        self._t = max(self._t, t_ms)


class WallClock:
    """Real time, optionally sped up: simulated ms = start + speed * elapsed wall ms."""

    def __init__(self, start_ms: int | None = None, speed: float = 1.0):
        self._wall0 = time.time()
        self._sim0 = int(self._wall0 * 1000) if start_ms is None else start_ms
        self.speed = speed

    def now_ms(self) -> int:
        return self._sim0 + int((time.time() - self._wall0) * 1000 * self.speed)

    def sleep_until(self, t_ms: int) -> None:
        wait = (t_ms - self.now_ms()) / 1000.0 / self.speed
        if wait > 0:
            time.sleep(wait)


@dataclass
class RunStats:
    """What the population did and got; every figure is counted, never assumed."""

    sessions: int = 0
    served: int = 0                 # items returned by the feed (logged as exposures server-side)
    impressions: int = 0            # items that entered the viewport (reported as `view` signals)
    examined: int = 0
    actions: Counter = field(default_factory=Counter)
    published: int = 0
    follows: int = 0
    utility: float = 0.0            # realised true utility of examined items
    impressions_by_pos: Counter = field(default_factory=Counter)
    clicks_by_pos: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    errors: int = 0
    # per user: [sessions, impressions, examined, clicks, utility], for standard errors clustered by user
    per_user: dict[int, list[float]] = field(default_factory=dict)

    @property
    def ctr(self) -> float:
        return self.actions["click"] / self.impressions if self.impressions else 0.0


class SimulatedUser:
    """One person: a session is a sequence of feed pages read with a stopping model."""

    def __init__(self, user_id: int, world: World, params: Clients, rng: np.random.Generator, page_size: int = 20):
        self.user_id = user_id
        self.world = world
        self.params = params
        self.rng = rng
        self.page_size = page_size

    def session(self, api: FeedApi, clock: Clock, stats: RunStats, feed_type: str = "home") -> None:
        before = (stats.impressions, stats.examined, stats.actions["click"], stats.utility)
        try:
            self._session(api, clock, stats, feed_type)
        finally:
            row = stats.per_user.setdefault(self.user_id, [0.0] * 5)
            row[0] += 1
            for i, (a, b) in enumerate(zip(before, (stats.impressions, stats.examined, stats.actions["click"], stats.utility))):
                row[i + 1] += b - a

    def _session(self, api: FeedApi, clock: Clock, stats: RunStats, feed_type: str) -> None:
        u, w, rng = self.user_id, self.world, self.rng
        cursor = ""
        stats.sessions += 1
        now = clock.now_ms()  # sessions overlap in time: each scrolls on its own timeline
        while True:
            page = api.get_feed(u, feed_type, cursor, self.page_size, now_ms=now)
            if not page.items:
                return
            stats.served += len(page.items)
            signals: list[Engagement] = []
            stop = False
            for item in page.items:
                stats.impressions += 1
                stats.impressions_by_pos[item.position] += 1
                stats.sources[item.source] += 1
                base = dict(user_id=u, post_id=item.post_id, author_id=item.author_id, position=item.position,
                            request_id=page.request_id)
                signals.append(Engagement(action=Action.VIEW, ts=now, **base))
                if rng.random() < w.examination_prob(np.array([item.position]))[0]:
                    stats.examined += 1
                    self._act(api, item, now, base, signals, stats)
                now += truth.SESSION_STEP_MS
                if rng.random() > self.params.continue_prob:
                    stop = True
                    break
            api.submit_signals(u, signals)
            if stop or not page.next_cursor:
                return
            cursor = page.next_cursor

    def _act(self, api: FeedApi, item: FeedItem, now: int, base: dict, signals: list[Engagement], stats: RunStats) -> None:
        w, u, p = self.world, self.user_id, item.post_id
        z = w.logit(np.array([u]), np.array([p]), now)
        b = truth.sample_behaviour(z, w.post_ctype[[p]], w.post_flagged[[p]].astype(float), np.array([True]), self.rng)
        stats.utility += float(w.true_utility(u, np.array([p]), now)[0])
        if b["click"][0]:
            stats.clicks_by_pos[item.position] += 1
            for a in ("click", "like", "comment", "share"):
                if b[a][0]:
                    signals.append(Engagement(action=a, ts=now, **base))
                    stats.actions[a] += 1
            signals.append(Engagement(action=Action.DWELL, dwell_ms=int(b["dwell_ms"][0]), ts=now, **base))
            stats.actions["dwell"] += 1
            if b["like"][0] and self.rng.random() < self.params.follow_prob and w.add_follow(u, item.author_id):
                api.follow(u, item.author_id, now_ms=now)  # the world (truth) follows first, then the service
                stats.follows += 1
        elif b["negative"][0]:
            kind = str(b["negative_kind"][0])
            api.submit_feedback(u, p, kind, now_ms=now)
            stats.actions[kind] += 1


class CreatorPublisher:
    """Creators publish new posts as a Poisson process; attributes follow the world's model."""

    def __init__(self, world: World, rate_per_min: float, rng: np.random.Generator, repost_rate: float = 0.2,
                 policy_flag_rate: float = 0.02):
        self.world, self.rate, self.rng = world, rate_per_min, rng
        self.repost_rate, self.flag_rate = repost_rate, policy_flag_rate
        creators = np.flatnonzero(world.is_creator)
        weight = np.sqrt(world.follower_counts()[creators] + 1.0)
        self.creators, self.p = creators, weight / weight.sum()

    def next_gap_ms(self) -> int:
        return int(self.rng.exponential(60_000.0 / self.rate)) if self.rate > 0 else 1 << 62

    def publish(self, api: FeedApi, now_ms: int) -> int:
        w, rng = self.world, self.rng
        author = int(rng.choice(self.creators, p=self.p))
        topic = int(w.creator_topic[author]) if rng.random() < 0.8 else int(rng.integers(w.n_topics))
        original = rng.random() >= self.repost_rate or w.n_posts == 0
        orig_id = None if original else int(rng.integers(max(w.n_posts - 5000, 0), w.n_posts))
        ctype = int(rng.integers(3)) if original else int(w.post_ctype[orig_id])
        if not original:
            topic = int(w.post_topic[orig_id])
        flagged = bool(rng.random() < self.flag_rate)
        post = PostPublished(
            post_id=w.n_posts, author_id=author, topic=topic, content_type=CTYPE_VALUES[ctype],
            is_original=original, original_post_id=orig_id, policy_flagged=flagged,
            text=w.make_text(topic, rng), ts=now_ms,
        )
        quality = float(rng.normal(0.0, 0.5)) - (0.0 if original else 0.3)
        pid = w.add_post(author, topic, ctype, quality, flagged, original, now_ms)
        assert pid == post.post_id
        api.publish_post(post)
        return pid


class Population:
    """N simulated users (drawn by activity) plus the creators, run for a duration."""

    def __init__(self, world: World, params: Clients, n_users: int, seed: int = 0, page_size: int = 20,
                 repost_rate: float = 0.2, policy_flag_rate: float = 0.02):
        self.world, self.params = world, params
        self.rng = np.random.default_rng(seed)
        p = world.activity / world.activity.sum()
        ids = self.rng.choice(world.n_users, size=min(n_users, world.n_users), replace=False, p=p)
        self.users = [SimulatedUser(int(u), world, params, np.random.default_rng([seed, int(u)]), page_size) for u in ids]
        self.publisher = CreatorPublisher(world, params.publish_per_min, np.random.default_rng([seed, 1 << 30]),
                                          repost_rate, policy_flag_rate)

    def run(self, api: FeedApi, clock: Clock, duration_s: float, on_tick=None) -> RunStats:
        """Run until ``duration_s`` of clock time passed; sessions and posts interleave in time order."""
        stats = RunStats()
        t0 = clock.now_ms()
        end = t0 + int(duration_s * 1000)
        gap = self.params.session_gap_s * 1000.0
        queue: list[tuple[int, int, int]] = []  # (time, kind 0=publish 1=session, user index)
        heapq.heappush(queue, (t0 + self.publisher.next_gap_ms(), 0, -1))
        for i, u in enumerate(self.users):
            # first sessions spread over one gap; active users come back sooner
            heapq.heappush(queue, (t0 + int(self.rng.uniform(0, gap)), 1, i))
        act = self.world.activity
        mean_act = float(act.mean())
        while queue:
            t, kind, i = heapq.heappop(queue)
            if t >= end:
                break
            clock.sleep_until(t)
            try:
                if kind == 0:
                    self.publisher.publish(api, clock.now_ms())
                    stats.published += 1
                    heapq.heappush(queue, (clock.now_ms() + self.publisher.next_gap_ms(), 0, -1))
                else:
                    user = self.users[i]
                    user.session(api, clock, stats)
                    rate = float(act[user.user_id]) / mean_act
                    heapq.heappush(queue, (clock.now_ms() + int(self.rng.exponential(gap / max(rate, 0.05))), 1, i))
            except Exception:  # a failing API call must not end the whole population run
                stats.errors += 1
                if stats.errors <= 5:
                    log.exception("simulated client call failed")
                if kind == 1:
                    heapq.heappush(queue, (clock.now_ms() + int(gap), 1, i))
                else:
                    heapq.heappush(queue, (clock.now_ms() + self.publisher.next_gap_ms(), 0, -1))
            if on_tick:
                on_tick(clock.now_ms() - t0, stats)
        return stats
