"""Request validation: protobuf requests -> typed values and events, or :class:`Invalid` naming the
field and the reason (answered INVALID_ARGUMENT). Nothing here touches state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from core.config import Config
from core.events import Action, ContentType, Engagement, PostPublished, coerce_event
from core.schema import N_TOPICS
from core.units import DAY_MS
from serving.catalog import PostCatalog
from serving.components import CONTENT_TYPE_CODES
from serving.protos import pb

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
MAX_CURSOR_CHARS = 1024
MAX_ID = 2**63 - 1
PAST_SKEW_MS = 7 * DAY_MS        # client event times may be this old (offline batches)...
FUTURE_SKEW_MS = 300_000         # ...or this far ahead of the server clock


class Invalid(ValueError):
    """Bad input: INVALID_ARGUMENT with this message."""


class Abort(Exception):
    """Any other non-OK status, with its message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def check_id(value: int, what: str) -> int:
    if not 0 <= value <= MAX_ID:
        raise Invalid(f"{what}: {value} is out of range")
    return int(value)


def event_ts(value: int, now: int, what: str) -> int:
    """A client-given epoch-ms time (0 = now) within the accepted skew of the server clock."""
    if value == 0:
        return now
    if not now - PAST_SKEW_MS <= value <= now + FUTURE_SKEW_MS:
        raise Invalid(f"{what}: {value} is not an epoch-ms time within 7 days before / 5 minutes after now ({now})")
    return int(value)


def feed_type(value: int) -> str:
    if value not in FEEDS:
        raise Invalid(f"feed_type: unknown value {value} (HOME, EXPLORE or FOLLOWING)")
    return FEEDS[value]


def page_limit(value: int, cfg: Config) -> int:
    if value > MAX_LIMIT:
        raise Invalid(f"limit: at most {MAX_LIMIT}, got {value}")
    return value or cfg.funnel.page_size


def cursor_text(value: str) -> str:
    if not value.isascii() or len(value) > MAX_CURSOR_CHARS:
        raise Invalid("cursor: not a cursor this service issued")
    return value


def known_post(cat: PostCatalog, post_id: int, what: str = "post_id") -> int:
    if not cat.known(np.array([post_id]))[0]:
        raise Invalid(f"{what}: unknown post {post_id}")
    return int(post_id)


def signals(req: Any, user: int, cat: PostCatalog, cfg: Config, now: int) -> list[Engagement]:
    """SubmitSignals' signals as Engagement events (all valid, or Invalid naming the first bad one)."""
    if len(req.signals) > MAX_SIGNALS:
        raise Invalid(f"signals: at most {MAX_SIGNALS} per call, got {len(req.signals)}")
    events: list[Engagement] = []
    for i, s in enumerate(req.signals):
        if s.action not in SIGNAL_ACTIONS:
            raise Invalid(f"signals[{i}].action: unknown value {s.action}")
        known_post(cat, s.post_id, f"signals[{i}].post_id")
        action = SIGNAL_ACTIONS[s.action]
        if action == Action.DWELL and s.dwell_ms == 0:
            raise Invalid(f"signals[{i}].dwell_ms: required (> 0) for DWELL")
        if action != Action.DWELL and s.dwell_ms:
            raise Invalid(f"signals[{i}].dwell_ms: only allowed for DWELL")
        if len(s.request_id) > cfg.serving.max_request_id_chars:
            raise Invalid(f"signals[{i}].request_id: at most {cfg.serving.max_request_id_chars} characters")
        try:
            events.append(Engagement(user_id=user, post_id=int(s.post_id), action=action,
                                     dwell_ms=int(s.dwell_ms) if action == Action.DWELL else None,
                                     author_id=int(cat.author[s.post_id]), position=int(s.position) or None,
                                     request_id=s.request_id or None, ts=event_ts(s.ts_ms, now, f"signals[{i}].ts_ms")))
        except ValueError as e:
            raise Invalid(f"signals[{i}]: {e}") from None
    return events


@dataclass(frozen=True)
class FeedbackRequest:
    user: int
    kind: str                # hide | not_interested | see_less
    target: str              # post | author | topic
    post: int | None
    author: int | None
    topic: int | None
    ts: int


def feedback(req: Any, user: int, cat: PostCatalog, user_id_bound: int, cfg: Config, now: int) -> FeedbackRequest:
    if req.kind not in FEEDBACK_KINDS:
        raise Invalid("kind: HIDE, NOT_INTERESTED or SEE_LESS required")
    if req.target not in TARGETS:
        raise Invalid(f"target: unknown value {req.target}")
    kind, target = FEEDBACK_KINDS[req.kind], TARGETS[req.target]
    post = author = topic = None
    if target == "post" or req.post_id != 0:
        post = known_post(cat, req.post_id)
        author, topic = int(cat.author[post]), int(cat.topic[post])
    if target == "author":
        author = check_id(req.author_id, "author_id") if req.author_id or post is None else author
        if author >= user_id_bound + cfg.serving.id_headroom:
            raise Invalid(f"author_id: unknown user {author}")
    if target == "topic":
        if not 0 <= req.topic < N_TOPICS:
            raise Invalid(f"topic: must be in [0, {N_TOPICS}), got {req.topic}")
        topic = int(req.topic)
    return FeedbackRequest(user, kind, target, post, author, topic, event_ts(req.ts_ms, now, "ts_ms"))


def new_post(req: Any, author: int, cat: PostCatalog, cfg: Config, now: int) -> PostPublished:
    """PublishPost's post (``post_id`` 0 until the caller assigns one); ALREADY_EXISTS is the caller's check."""
    if not 0 <= req.topic < N_TOPICS:
        raise Invalid(f"topic: must be in [0, {N_TOPICS}), got {req.topic}")
    if req.content_type not in CTYPES:
        raise Invalid("content_type: TEXT, IMAGE or VIDEO required")
    if len(req.text) > cfg.serving.max_text_chars:
        raise Invalid(f"text: at most {cfg.serving.max_text_chars} characters, got {len(req.text)}")
    if req.is_repost and (req.original_post_id == 0 or not cat.known(np.array([req.original_post_id]))[0]):
        raise Invalid(f"original_post_id: a repost needs a known post, got {req.original_post_id}")
    if not req.is_repost and req.original_post_id:
        raise Invalid("original_post_id: only allowed for a repost")
    if req.post_id >= cat.count + cfg.serving.id_headroom:
        raise Invalid(f"post_id: {req.post_id} is beyond the ids this service issues (< {cat.count} known posts "
                      f"+ {cfg.serving.id_headroom}); leave it 0 and the server assigns one")
    if req.post_id:
        check_id(req.post_id, "post_id")
    return coerce_event(PostPublished(
        post_id=int(req.post_id), author_id=author, topic=int(req.topic), content_type=CTYPES[req.content_type],
        is_original=not req.is_repost, original_post_id=int(req.original_post_id) if req.is_repost else None,
        policy_flagged=req.policy_flagged, text=req.text, ts=event_ts(req.ts_ms, now, "ts_ms")))
