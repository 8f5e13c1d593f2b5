"""A simulated served stream for the online learner: pages of exposures with their feature
snapshots, and the engagements users make, under a known and changeable truth.

Each request shows 20 posts at positions 1..20 to one user; serving's snapshot of the 20
heavy-feature rows goes to the snapshot store and every exposure carries its id and the
model version that served it. Whether a user clicks is ``sigmoid(truth . x) * (1/pos)^eta``
where the truth weights a few named features and can shift at a given minute (a trend:
topical relevance suddenly matters more than popularity). Scenarios also inject the
failures the learner's guardrails must catch: inverted labels from non-holdout users (a
poisoning attack) and a lower click rate for one serving version (a bad model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.events import BaseEvent, Engagement, Exposure
from core.schema import HEAVY_NAMES

INFORMATIVE = ("post_ctr", "topic_match", "ann_score", "log_author_affinity")
PAGE = 20


@dataclass
class Scenario:
    minutes: float = 12.0
    exposures_per_s: float = 100.0
    start_ms: int = 1_767_571_200_000
    w_pre: tuple[float, ...] = (1.2, 0.4, 0.8, 0.3)
    w_post: tuple[float, ...] = (0.2, 1.8, 0.8, 0.3)
    shift_at_min: float | None = None
    bias: float = -0.8
    exam_eta: float = 0.7
    users: int = 4000
    poison_train_users: bool = False      # invert the labels of every user outside the holdout
    holdout_fraction: float = 0.05
    versions: dict[str, float] = field(default_factory=lambda: {"v0": 1.0})   # serving version -> traffic share
    ctr_factor: dict[str, float] = field(default_factory=dict)                # serving version -> click multiplier
    seed: int = 0


IDX = [HEAVY_NAMES.index(n) for n in INFORMATIVE]


def features(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(size=(n, len(HEAVY_NAMES))).astype(np.float32)


def truth_logit(x: np.ndarray, minute: np.ndarray | float, sc: Scenario) -> np.ndarray:
    minute = np.broadcast_to(np.asarray(minute, dtype=np.float64), (x.shape[0],))
    shifted = (minute >= sc.shift_at_min) if sc.shift_at_min is not None else np.zeros(x.shape[0], bool)
    pre = x[:, IDX] @ np.array(sc.w_pre)
    post = x[:, IDX] @ np.array(sc.w_post)
    return np.where(shifted, post, pre) + sc.bias


def examination(pos: np.ndarray, eta: float) -> np.ndarray:
    return (1.0 / np.asarray(pos, dtype=np.float64)) ** eta


def head_labels(rng: np.random.Generator, click: np.ndarray) -> np.ndarray:
    """[n, 6] in HEAD_NAMES order: likes/comments/shares/long dwells follow clicks; negatives don't."""
    n = click.size
    c = click.astype(bool)
    return np.stack([c, c & (rng.random(n) < 0.3), c & (rng.random(n) < 0.1), c & (rng.random(n) < 0.05),
                     c & (rng.random(n) < 0.5), ~c & (rng.random(n) < 0.03)], axis=1).astype(np.float32)


def offline_data(sc: Scenario, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, labels, position) of pre-shift logs, for training the base model offline."""
    rng = np.random.default_rng(seed)
    x = features(rng, n)
    pos = rng.integers(1, PAGE + 1, n)
    p = 1 / (1 + np.exp(-truth_logit(x, 0.0, sc))) * examination(pos, sc.exam_eta)
    return x, head_labels(rng, rng.random(n) < p), pos


def stream(sc: Scenario, snapshots) -> list[BaseEvent]:
    """Write the scenario's snapshots to ``snapshots`` (a SnapshotStore) and return its events in time order."""
    from models.online import in_holdout

    rng = np.random.default_rng(sc.seed)
    requests = int(sc.minutes * 60 * sc.exposures_per_s / PAGE)
    gap_ms = 1000.0 * PAGE / sc.exposures_per_s
    versions = list(sc.versions)
    share = np.array([sc.versions[v] for v in versions])
    events: list[tuple[int, BaseEvent]] = []
    pipe = snapshots.redis.pipeline(transaction=False)
    next_post = 1
    for r in range(requests):
        ts = sc.start_ms + int(r * gap_ms)
        user = int(rng.integers(0, sc.users))
        version = versions[int(rng.choice(len(versions), p=share / share.sum()))]
        x = features(rng, PAGE)
        posts = np.arange(next_post, next_post + PAGE)
        next_post += PAGE
        sid = f"s{sc.seed}-{r}"
        snapshots.put(sid, posts, x, pipe=pipe)
        if r % 200 == 199:
            pipe.execute()
        pos = np.arange(1, PAGE + 1)
        p = 1 / (1 + np.exp(-truth_logit(x, (ts - sc.start_ms) / 60_000, sc))) * examination(pos, sc.exam_eta)
        p = np.clip(p * sc.ctr_factor.get(version, 1.0), 0, 1)
        y = head_labels(rng, rng.random(PAGE) < p)
        if sc.poison_train_users and not in_holdout(user, sc.holdout_fraction):
            y = 1.0 - y  # the attack: every label of these users inverted
        for i in range(PAGE):
            events.append((ts, Exposure(event_id=f"{sid}-x{i}", ts=ts, request_id=sid, user_id=user, post_id=int(posts[i]),
                                        position=i + 1, feed_type="home", source="in_network", model_version=version,
                                        snapshot_id=sid)))
            t = ts + int(rng.integers(1_000, 20_000))
            for j, action in enumerate(("click", "like", "comment", "share", "dwell", "hide")):
                if y[i, j]:
                    events.append((t + j, Engagement(event_id=f"{sid}-e{i}-{j}", ts=t + j, user_id=user,
                                                     post_id=int(posts[i]), action=action,
                                                     dwell_ms=45_000 if action == "dwell" else None)))
    pipe.execute()
    events.sort(key=lambda e: e[0])
    return [e for _, e in events]
