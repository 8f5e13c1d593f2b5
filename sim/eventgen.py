"""Synthetic event streams: a deterministic mix of every event type, for load and log tests.

``python -m sim.eventgen --uri file:///tmp/log --n 50000 --seed 1`` appends N events
(the writer process used by the multi-writer tests and the throughput benchmarks).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np

from core.events import BaseEvent, Engagement, Exposure, Followed, PostPublished

ACTIONS = ["view", "click", "like", "comment", "share", "dwell", "hide", "not_interested", "see_less"]
ACTION_P = np.array([0.45, 0.2, 0.1, 0.03, 0.02, 0.15, 0.02, 0.02, 0.01])


def synthetic_events(n: int, seed: int = 0, start_ms: int = 1_767_571_200_000, users: int = 10_000,
                     posts: int = 100_000, prefix: str = "") -> Iterator[BaseEvent]:
    """n valid events with unique ids ``{prefix}{seed}-{i}``, one event-time ms apart."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=n, p=[0.02, 0.01, 0.37, 0.60])  # publish, follow, exposure, engagement
    user = rng.integers(0, users, size=n)
    post = rng.integers(0, posts, size=n)
    author = rng.integers(0, max(users // 10, 1), size=n)
    pos = rng.integers(1, 41, size=n)
    act = rng.choice(len(ACTIONS), size=n, p=ACTION_P / ACTION_P.sum())
    dwell = rng.integers(500, 90_000, size=n)
    for i in range(n):
        eid, ts = f"{prefix}{seed}-{i}", start_ms + i
        k = kind[i]
        if k == 0:
            yield PostPublished(event_id=eid, ts=ts, post_id=int(post[i]), author_id=int(author[i]),
                                topic=int(post[i] % 24), content_type=("text", "image", "video")[int(post[i] % 3)],
                                text="ka lo mi")
        elif k == 1:
            a = int(author[i]) if int(author[i]) != int(user[i]) else int(author[i]) + 1
            yield Followed(event_id=eid, ts=ts, user_id=int(user[i]), author_id=a)
        elif k == 2:
            yield Exposure(event_id=eid, ts=ts, request_id=f"r{seed}-{i // 20}", user_id=int(user[i]),
                           post_id=int(post[i]), author_id=int(author[i]), position=int(pos[i]), feed_type="home",
                           source="in_network" if i % 3 else "out_of_network", model_version="v0")
        else:
            a = ACTIONS[act[i]]
            yield Engagement(event_id=eid, ts=ts, user_id=int(user[i]), post_id=int(post[i]), action=a,
                             dwell_ms=int(dwell[i]) if a == "dwell" else None, position=int(pos[i]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--uri", required=True)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rotate-ms", type=int, default=500)
    args = ap.parse_args()
    from features.eventlog import open_event_log

    log = open_event_log(args.uri, rotate_ms=args.rotate_ms)
    batch: list[BaseEvent] = []
    for ev in synthetic_events(args.n, args.seed):
        batch.append(ev)
        if len(batch) >= args.batch:
            log.append_many(batch)
            batch = []
    if batch:
        log.append_many(batch)
    log.close()


if __name__ == "__main__":
    main()
