"""Abuse and bad input on a real server (real Redis, real gRPC): hostile ids cost nothing, injected
signals count nothing, every bad field is INVALID_ARGUMENT naming it, undecodable bytes never reach
a traceback, and a Follow during a Redis outage changes nothing anywhere."""

from __future__ import annotations

import logging
import os
import time

import grpc
import numpy as np
import psutil

from features.eventlog import read_all
from core.events import parse_event
from runtime import stack
from serving.catalog import FOLLOW_CHANGES, POST_CHANGES
from serving.conftest import token
from serving.protos import pb


def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _metric(server, name: str, labels: dict[str, str]) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def _rss_mb() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def test_hostile_post_and_author_ids_are_invalid_and_cost_no_memory(stub, serving):
    cat, graph, redis = serving.state.catalog, serving.state.graph, serving.state.redis.client
    u = 77
    md = token(serving.cfg, u)
    sizes = (cat.author.size, cat.emb.shape[0], graph.in_delta.size)
    streams = (redis.xlen(POST_CHANGES), redis.xlen(FOLLOW_CHANGES))
    rss = _rss_mb()
    headroom = serving.cfg.serving.id_headroom
    for post_id in (1_000_000, 2**62, 2**64 - 1, cat.count + headroom):
        code, msg = _code(lambda: stub.PublishPost(pb.PublishPostRequest(author_id=u, topic=1, content_type=pb.TEXT,
                                                                         post_id=post_id), metadata=md))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "post_id" in msg, (post_id, code, msg)
    for author in (50_000_000, 2**62, serving.state.user_id_bound() + headroom):
        code, msg = _code(lambda: stub.Follow(pb.FollowRequest(user_id=u, author_id=author), metadata=md))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "author_id" in msg, (author, code, msg)
    assert (cat.author.size, cat.emb.shape[0], graph.in_delta.size) == sizes
    assert (redis.xlen(POST_CHANGES), redis.xlen(FOLLOW_CHANGES)) == streams  # nothing unvalidated announced
    assert _rss_mb() - rss < 20
    # the ids the server issues, and a client-chosen one next to the known ones, still work
    issued = stub.PublishPost(pb.PublishPostRequest(author_id=u, topic=1, content_type=pb.TEXT), metadata=md).post_id
    assert cat.known(np.array([issued]))[0]
    chosen = cat.n + 5
    r = stub.PublishPost(pb.PublishPostRequest(author_id=u, topic=2, content_type=pb.TEXT, post_id=chosen), metadata=md)
    assert r.post_id == chosen and cat.known(np.array([chosen]))[0]


def test_bad_fields_are_invalid_argument_naming_them(stub, serving, caplog):
    u = 78
    md, admin = token(serving.cfg, u), token(serving.cfg, 1, admin=True)
    page = stub.GetFeed(pb.GetFeedRequest(user_id=u), metadata=md)
    it = page.items[0]
    cached = serving.service.feeds.rankings.get(page.request_id)
    assert "x" not in cached.cands and cached.nbytes < 32_000, cached.nbytes  # compact: no feature matrices
    print(f"cached ranking: {len(cached.cands)} items, {cached.nbytes} bytes")
    bad = {
        "text": lambda: stub.PublishPost(pb.PublishPostRequest(author_id=u, topic=1, content_type=pb.TEXT,
                                                               text="x" * 20_001), metadata=md),
        "original_post_id": lambda: stub.PublishPost(pb.PublishPostRequest(
            author_id=u, topic=1, content_type=pb.TEXT, is_repost=True, original_post_id=0), metadata=md),
        "cursor": lambda: stub.GetFeed(pb.GetFeedRequest(user_id=u, cursor="é.ü"), metadata=md),
        "feed_type": lambda: stub.DebugRanking(pb.DebugRankingRequest(user_id=u, post_id=it.post_id, feed_type=99),
                                               metadata=admin),
        "request_id": lambda: stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=u, signals=[
            pb.Signal(post_id=it.post_id, action=pb.CLICK, request_id="r" * 200_000)]), metadata=md),
    }
    for what, call in bad.items():
        code, msg = _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and what in msg, (what, code, msg)

    # bytes that are not a request message: INVALID_ARGUMENT, no traceback logged, counted
    caplog.set_level(logging.INFO)
    ch = grpc.insecure_channel(serving.address)
    raw = ch.unary_unary("/feedrank.v1.FeedService/GetFeed", request_serializer=lambda b: b,
                         response_deserializer=lambda b: b)
    serving.metrics.rpcs.labels("GetFeed", "INVALID_ARGUMENT")
    before = _metric(serving, "feedrank_rpcs_total", {"rpc": "GetFeed", "code": "INVALID_ARGUMENT"})
    code, msg = _code(lambda: raw(b"\xff\xff\xff\xff\x0f garbage", timeout=5))
    ch.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "GetFeedRequest" in msg, (code, msg)
    assert _metric(serving, "feedrank_rpcs_total", {"rpc": "GetFeed", "code": "INVALID_ARGUMENT"}) == before + 1
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


def test_injected_signals_count_once_and_only_for_served_posts(stub, serving):
    cfg = serving.cfg
    u = 79
    md = token(cfg, u)
    page = stub.GetFeed(pb.GetFeedRequest(user_id=u), metadata=md)
    served = page.items[0].post_id
    shown = {it.post_id for it in page.items}
    never = next(int(p) for p in np.flatnonzero(serving.state.catalog.known(np.arange(serving.state.catalog.n)))
                 if int(p) not in shown and not serving.state.redis.client.zscore(f"feedrank:seen:{u}", int(p)))
    for outcome in ("accepted", "repeated", "not_served"):  # the children exist before the first reading: in
        serving.metrics.signals.labels(outcome)           # prometheus' multi-process mode they share values
    acc = _metric(serving, "feedrank_signals_total", {"outcome": "accepted"})
    rep = _metric(serving, "feedrank_signals_total", {"outcome": "repeated"})
    click = pb.Signal(post_id=served, action=pb.CLICK, request_id=page.request_id)
    r = stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=u, signals=[click] * 500), metadata=md)
    assert r.accepted == 1 and dict(r.dropped) == {"repeated": 499}
    r = stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=u, signals=[click] * 400), metadata=md)
    assert r.accepted == 0 and dict(r.dropped) == {"repeated": 400}
    r = stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=u, signals=[
        pb.Signal(post_id=never, action=pb.CLICK), pb.Signal(post_id=served, action=pb.LIKE)]), metadata=md)
    assert r.accepted == 1 and dict(r.dropped) == {"not_served": 1}
    assert _metric(serving, "feedrank_signals_total", {"outcome": "accepted"}) == acc + 2
    assert _metric(serving, "feedrank_signals_total", {"outcome": "repeated"}) == rep + 899
    # the signal budget counts signals, not calls: 1000 per burst, then RESOURCE_EXHAUSTED
    code, msg = _code(lambda: stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=u, signals=[click] * 500),
                                                 metadata=md))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "signal rate limit" in msg, (code, msg)
    serving.state.events.flush()
    mine = [parse_event(x) for x in read_all(serving.state.events.reader(), idle_s=0.5)]
    clicks = [e for e in mine if e.type == "engagement" and e.user_id == u and e.action == "click"]
    assert [(e.post_id, e.action) for e in clicks] == [(served, "click")]  # one click in the log: CTR unchanged


def test_follow_during_a_redis_outage_changes_nothing_then_succeeds(stub, serving):
    cfg, graph = serving.cfg, serving.state.graph
    u = 81
    author = next(a for a in range(200, 400) if a != u and not graph.follows(u, a))
    md = token(cfg, u)
    stack.down(cfg)
    try:
        code, msg = _code(lambda: stub.Follow(pb.FollowRequest(user_id=u, author_id=author), metadata=md))
        assert code == grpc.StatusCode.UNAVAILABLE, (code, msg)
        assert not graph.follows(u, author)  # this replica did not keep an edge nobody else heard of
    finally:
        stack.up(cfg)
    deadline = time.monotonic() + 15
    while True:
        try:
            r = stub.Follow(pb.FollowRequest(user_id=u, author_id=author), metadata=md)
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, (e.code(), e.details())
            time.sleep(0.3)
    assert r.changed and graph.follows(u, author)  # the retry changes it: nothing said "unchanged"


def test_feedback_and_follows_survive_a_redis_restart(stub, serving):
    cfg = serving.cfg
    u = 82
    md = token(cfg, u)
    author = next(a for a in range(400, 600) if a != u and not serving.state.graph.follows(u, a))
    stub.SubmitFeedback(pb.SubmitFeedbackRequest(user_id=u, kind=pb.SEE_LESS, target=pb.TOPIC, topic=4), metadata=md)
    stub.SubmitFeedback(pb.SubmitFeedbackRequest(user_id=u, kind=pb.HIDE, target=pb.AUTHOR, author_id=author + 1),
                        metadata=md)
    assert stub.Follow(pb.FollowRequest(user_id=u, author_id=author), metadata=md).changed
    neg = serving.state.redis.client.hgetall(f"feedrank:neg:{u}")
    assert b"ft:4" in neg and f"a:{author + 1}".encode() in neg
    serving.state.events.flush()
    logged = [parse_event(x) for x in read_all(serving.state.events.reader(), idle_s=0.5)]
    fb = {(e.action, e.target, e.author_id, e.topic) for e in logged if e.type == "feedback" and e.user_id == u}
    assert fb == {("see_less", "topic", None, 4), ("hide", "author", author + 1, None)}  # logged, not only in Redis
    stack.down(cfg)
    stack.up(cfg)  # the append-only file brings it back
    client = serving.state.redis.client
    deadline = time.monotonic() + 10
    while True:
        try:
            assert client.hgetall(f"feedrank:neg:{u}") == neg
            break
        except Exception:  # noqa: BLE001 - Redis still loading its AOF
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert client.hget("feedrank:follows:since-export", f"{u}:{author}") == b"1"


def test_a_replica_started_later_knows_every_runtime_post_and_edge(serving, served_world):
    """More posts than the change stream keeps (change_stream_maxlen): a new replica still knows them all."""
    from serving.state import ServingState

    cfg = served_world.config(FEEDRANK_REDIS=serving.cfg.redis.uri, FEEDRANK_STREAMING_CHANGE_STREAM_MAXLEN="10")
    first = ServingState(cfg, bootstrap_dir=served_world.world_dir)
    new = [first.next_post_id() for _ in range(300)]
    for pid in new:
        first.publish(pid, 12, 3, 0, True, False, first.clock())
    user = 83
    author = next(a for a in range(600, 800) if not first.graph.follows(user, a))
    assert first.follow(user, author, True)
    assert serving.state.redis.client.xlen(POST_CHANGES) < 300  # the stream alone would not tell
    later = ServingState(cfg, bootstrap_dir=served_world.world_dir)
    later.changes.resolve_start()
    later.changes.poll(block_ms=100)
    assert later.catalog.known(np.array(new)).all()
    assert later.graph.follows(user, author)
    first.events.close()
    later.events.close()


def test_feedback_entries_per_user_are_capped_newest_kept(stub, serving):
    cfg = serving.cfg
    u = 84
    md = token(cfg, u)
    cap = cfg.serving.max_feedback_entries
    posts = [int(p) for p in np.flatnonzero(serving.state.catalog.known(np.arange(serving.state.catalog.n)))]
    key = f"feedrank:neg:{u}"
    old = {f"p:{p}": f"hide:{1000 + i}" for i, p in enumerate(posts[: cap + 50])}  # as if given long ago
    serving.state.redis.client.hset(key, mapping=old)
    newest = posts[cap + 60]
    stub.SubmitFeedback(pb.SubmitFeedbackRequest(user_id=u, post_id=newest, kind=pb.HIDE), metadata=md)
    entries = serving.state.redis.client.hgetall(key)
    assert len(entries) == cap and f"p:{newest}".encode() in entries
    assert f"p:{posts[0]}".encode() not in entries  # the oldest went first


def test_a_malformed_change_is_skipped_and_the_follower_stays_healthy(serving):
    redis, follower = serving.state.redis.client, serving.state.changes
    skipped = follower.skipped
    redis.xadd(POST_CHANGES, {"post_id": 2**62, "author_id": 1, "topic": 1, "ctype": 0, "original": 1, "flagged": 0,
                              "published_ms": 1})  # as an unvalidated release could have written
    redis.xadd(POST_CHANGES, {"post_id": "x"})
    ok = serving.state.catalog.n + 3
    redis.xadd(POST_CHANGES, {"post_id": ok, "author_id": 12, "topic": 1, "ctype": 0, "original": 1, "flagged": 0,
                              "published_ms": 1})
    deadline = time.monotonic() + 10
    while not serving.state.catalog.known(np.array([ok]))[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert serving.state.catalog.known(np.array([ok]))[0] and follower.healthy
    assert follower.skipped == skipped + 2 and serving.state.catalog.author.size < 2**40
