"""What a feed client sees and can do: a page of ranked items, and the calls of the FeedService.

The gRPC client (:mod:`serving.client`), the in-process EdgeRank baseline
(:mod:`sim.chronological`) and the simulated users (:mod:`sim.clients`) all speak it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from core.events import Engagement, PostPublished


@dataclass
class FeedItem:
    post_id: int
    author_id: int
    position: int
    source: str
    score: float = 0.0


@dataclass
class FeedPage:
    request_id: str
    items: list[FeedItem]
    next_cursor: str = ""
    model_version: str = ""
    degraded: bool = False


class FeedApi(Protocol):
    """What a client can do; the gRPC FeedService implements the same calls."""

    def get_feed(self, user_id: int, feed_type: str = "home", cursor: str = "", limit: int = 20,
                 now_ms: int | None = None) -> FeedPage: ...
    def submit_signals(self, user_id: int, signals: list[Engagement]) -> None: ...
    def submit_feedback(self, user_id: int, post_id: int, kind: str, now_ms: int | None = None) -> None: ...
    def publish_post(self, post: PostPublished) -> int: ...
    def follow(self, user_id: int, author_id: int, now_ms: int | None = None) -> None: ...
