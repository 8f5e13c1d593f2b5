"""Simulated clients against the in-process V0 feed: real events in a real event log."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from features.eventlog import read_all

from features.eventlog_file import FileEventLog
from core.events import PostPublished, parse_event
from sim.chronological import ChronologicalFeed
from sim.clients import Population, SimClock
from sim.generate import WorldSpec, generate_world


@pytest.fixture(scope="module")
def world_cfg():
    from core.config import load_config

    cfg = load_config(env={"FEEDRANK_SIM_SCALES_SMALL_USERS": "2000", "FEEDRANK_SIM_SCALES_SMALL_CREATORS": "500",
                           "FEEDRANK_SIM_SCALES_SMALL_POSTS": "20000", "FEEDRANK_SIM_SCALES_SMALL_IMPRESSIONS": "20000"})
    return cfg


def _world(cfg):
    return generate_world(WorldSpec.from_config(cfg, "small", 5))[0]


def test_population_writes_valid_events_driven_by_ground_truth(world_cfg, tmp_path):
    world = _world(world_cfg)
    log = FileEventLog(tmp_path)
    api = ChronologicalFeed(world, log)
    n_posts0 = world.n_posts
    pop = Population(world, world_cfg.clients, 300, seed=1)
    stats = pop.run(api, SimClock(world.end_ms), duration_s=3600)
    log.close()
    lines = read_all(log.reader(), idle_s=0.2)
    events = [parse_event(x) for x in lines]  # every line valid
    types = Counter(e.type for e in events)
    assert stats.errors == 0
    assert stats.sessions > 300 and stats.impressions > 3000
    assert types["exposure"] == stats.served >= stats.impressions
    assert types["post_published"] == stats.published == world.n_posts - n_posts0
    assert stats.published > 0.5 * world_cfg.clients.publish_per_min * 60  # Poisson around the rate
    acts = Counter(e.action for e in events if e.type == "engagement")
    assert acts["click"] == stats.actions["click"] > 0 and acts["view"] == stats.impressions
    # engagement follows the examination model: CTR at position 1 well above position 10
    ctr = {k: stats.clicks_by_pos[k] / stats.impressions_by_pos[k] for k in (1, 10)}
    assert ctr[1] > 2 * ctr[10]
    # exposures carry request ids and positions that match engagements
    exp_keys = {(e.request_id, e.position) for e in events if e.type == "exposure"}
    assert all((e.request_id, e.position) in exp_keys for e in events if e.type == "engagement" and e.request_id)


def test_v0_feed_serves_new_followed_posts_and_respects_feedback(world_cfg, tmp_path):
    world = _world(world_cfg)
    log = FileEventLog(tmp_path)
    api = ChronologicalFeed(world, log)
    user = int(np.argmax(np.bincount(world.follow_src, minlength=world.n_users)))
    author = int(world.following(user)[0])
    now = world.end_ms + 60_000
    pid = world.add_post(author, 1, 2, 0.0, False, True, now)
    api.publish_post(PostPublished(post_id=pid, author_id=author, topic=1, content_type="video", ts=now))
    page = api.get_feed(user, now_ms=now + 1000)
    assert page.items and page.items[0].post_id == pid  # newest post of a followed author ranks first
    assert [it.position for it in page.items] == list(range(1, len(page.items) + 1))
    nxt = api.get_feed(user, cursor=page.next_cursor, now_ms=now + 2000)
    assert not {i.post_id for i in page.items} & {i.post_id for i in nxt.items}  # no duplicates across pages
    victim = nxt.items[0].post_id
    api.submit_feedback(user, victim, "hide", now_ms=now + 3000)
    assert victim not in {p for p, _ in api.rank(user, now + 4000)}
    with pytest.raises(ValueError, match="cursor"):
        api.get_feed(user, cursor="forged:20")
    log.close()
    types = Counter(json.loads(x)["type"] for x in read_all(log.reader(), idle_s=0.2))
    assert types["exposure"] == len(page.items) + len(nxt.items) and types["post_published"] == 1
