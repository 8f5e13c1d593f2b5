"""New-post path: PostPublished -> feature job (post tower) -> index delta -> a serving
replica's FAISS index, answered by an ANN query within 5 s of the append."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from features.change_streams import IndexDeltaFollower

from features.online_store import FeatureClient

from features.progress import read_progress
from features.eventlog import open_configured_event_log
from core.events import Engagement, Exposure, PostPublished
from runtime import stack
from models.retrieval import RetrievalIndex
from models.store import ModelStore
from models.towers import PostFeaturizer, TwoTower, UserInputs, embed_posts
from models.train import load_retrieval, publish_two_tower

pytestmark = [pytest.mark.slow, pytest.mark.flink]
T = 1_767_571_200_000
DAY = 86_400_000


def _posts(n: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choice(words, 8)) for _ in range(n)]
    return texts, rng.integers(0, 300, n), rng.integers(0, 24, n), rng.integers(0, 3, n)


def test_published_post_is_retrievable_within_5s(make_cfg):
    from jobs import feature_job as features

    cfg = make_cfg(FEEDRANK_STREAMING_FLUSH_MS="100")
    torch.manual_seed(0)
    model = TwoTower().eval()  # untrained towers: the path, not the quality, is under test
    feat = PostFeaturizer()
    n = 3000
    emb = embed_posts(model, feat(*_posts(n, 1)))
    index = RetrievalIndex(kind="ivf", nlist=32, nprobe=32, day0=T / DAY).build(
        np.arange(n), emb, np.full(n, T / DAY))
    store = ModelStore.from_config(cfg)
    publish_two_tower(cfg, store, model, index, emb)

    stack.up(cfg)
    job = None
    try:
        job = features.run_embedded(cfg)
        log = open_configured_event_log(cfg)
        log.append_many([Exposure(event_id="warm", ts=T, request_id="r", user_id=1, post_id=1, position=1,
                                  feed_type="home", source="in_network")])
        log.flush()
        t0 = time.monotonic()
        while read_progress(cfg, "features").get("post_events", 0) < 1:  # job up and reading
            assert time.monotonic() - t0 < 120, "the feature job did not start"
            time.sleep(0.2)

        serving, version = load_retrieval(store)
        follower = IndexDeltaFollower(cfg, serving, version)
        follower.poll()
        text, author, topic, ctype = "breaking news about a red fox", 42, 5, 2
        want = embed_posts(model, feat([text], np.array([author]), np.array([topic]), np.array([ctype])))
        published = time.monotonic()
        log.append_many([PostPublished(event_id="new", ts=T + 60_000, post_id=n + 7, author_id=author, topic=topic,
                                       content_type="video", text=text)])
        log.flush()
        found_after = None
        while time.monotonic() - published < 5.0:
            follower.poll(block_ms=100)
            _, ids = serving.search(want, 10)  # (scores, ids)
            if n + 7 in ids[0].tolist():
                found_after = time.monotonic() - published
                break
        assert found_after is not None, "the new post was not retrievable within 5 s of publishing"
        # the post tower's embedding also reached the online store
        got = FeatureClient(cfg).posts([n + 7], ["post_embedding:embedding"])["embedding"][0]
        assert np.allclose(got, want[0], atol=1e-5)
        assert follower.skipped == 0 and follower.applied == 1

        # an engagement refreshes the user's embedding from the user tower
        log.append_many([Engagement(event_id="click", ts=T + 70_000, user_id=9, post_id=n + 7, action="click")])
        log.flush()
        from features import realtime as rt

        st = rt.new_user_state()
        rt.user_update(st, (rt.ENGAGEMENT, "click", T + 70_000, 9, n + 7, author, rt.A["click"], 0, topic, ctype, "", 0),
                       cfg.heads.long_dwell_ms)
        with torch.no_grad():
            want_u = model.user(UserInputs(torch.from_numpy(rt.user_dense(st)[None]), torch.zeros(1, dtype=torch.int64),
                                           torch.zeros(1, dtype=torch.int64))).numpy()[0]
        client = FeatureClient(cfg)
        t0 = time.monotonic()
        while (u := client.user(9))["embedding"] is None:
            assert time.monotonic() - t0 < 30, "no user embedding was written"
            time.sleep(0.2)
        assert np.allclose(u["embedding"], want_u, atol=1e-5) and u["topic_clicks"][topic] == 1.0
    finally:
        if job is not None:
            job.cancel().result()
        stack.down(cfg)
