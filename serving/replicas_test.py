"""Two replicas behind a real load balancer: `feedrank serve --replicas 2 --workers 1` as an operator
runs it (two replica processes on their own ports, nginx with grpc_pass in front), one Redis.

What a user sees must not depend on the replica a call lands on: the per-user rate limit is the
configured one in total, a cursor from replica A continues on replica B, a refresh on B reuses
A's ranking, and a post hidden through one replica never comes back from either."""

from __future__ import annotations

import re
import time
import urllib.request
from datetime import datetime, timezone
from typing import Any, Iterator

import grpc
import pytest

from core.services import free_port
from runtime import stack
from runtime.procs import stop_group
from runtime.serve import replica_ports
from serving.conftest import serve_process, token, wait_for
from serving.protos import pb, rpc

pytestmark = pytest.mark.slow
BURST, RPS = 8, 1.0  # a user's limit: 8 calls in any 8 s, whichever replica answers them


@pytest.fixture(scope="module")
def replicas(served_world: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from features.feast_repo import apply

    port, mport = free_port(), free_port()
    while any(p in (mport, mport + 1) for p in replica_ports(port, 2)) or mport == port:
        mport = free_port()
    hport = free_port()  # the HTTP API: nginx on hport, the replicas on hport + 1, + 2
    while {hport, *replica_ports(hport, 2)} & {port, mport, mport + 1, *replica_ports(port, 2)}:
        hport = free_port()
    cfg = served_world.config(FEEDRANK_SERVING_PORT=str(port), FEEDRANK_SERVING_METRICS_PORT=str(mport),
                              FEEDRANK_SERVING_RATE_LIMIT_RPS=str(RPS), FEEDRANK_SERVING_RATE_LIMIT_BURST=str(BURST),
                              FEEDRANK_SERVING_HTTP_PORT=str(hport))
    stack.up(cfg)
    apply(cfg).materialize(datetime(2020, 1, 1, tzinfo=timezone.utc), datetime(2030, 1, 1, tzinfo=timezone.utc),
                           feature_views=["user_topic", "topic_stats"])
    out = tmp_path_factory.mktemp("replicas") / "serve.log"
    proc = serve_process(served_world, cfg, port, out, "--replicas", "2", "--workers", "1",
                         FEEDRANK_SERVING_RATE_LIMIT_RPS=str(RPS), FEEDRANK_SERVING_RATE_LIMIT_BURST=str(BURST))
    channels: list[grpc.Channel] = []
    try:
        wait_for("nginx in front of both replicas",
                 lambda: "balancing gRPC calls over" in out.read_text() or proc.poll() is not None, timeout=300)
        assert proc.poll() is None, out.read_text()[-3000:]

        def stub(p: int) -> Any:
            channels.append(grpc.insecure_channel(f"127.0.0.1:{p}"))
            return rpc.FeedServiceStub(channels[-1])

        a, b = replica_ports(port, 2)
        yield {"cfg": cfg, "lb": stub(port), "a": stub(a), "b": stub(b), "metrics": [mport, mport + 1], "log": out,
               "http": f"http://127.0.0.1:{hport}"}
    finally:
        for ch in channels:
            ch.close()
        stop_group(proc)
        stack.down(cfg)


def _served_ok(mport: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    m = re.search(r'feedrank_rpcs_total\{code="OK",rpc="GetFeed"\} ([0-9.e+]+)', text) or \
        re.search(r'feedrank_rpcs_total\{rpc="GetFeed",code="OK"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def _md(replicas: dict[str, Any], user: int) -> list[tuple[str, str]]:
    return token(replicas["cfg"], user)


def test_the_load_balancer_spreads_calls_and_the_rate_limit_is_the_configured_one_in_total(replicas):
    before = [_served_ok(p) for p in replicas["metrics"]]
    user = 301
    codes = []
    t0 = time.monotonic()
    for _ in range(3 * BURST):
        try:
            replicas["lb"].GetFeed(pb.GetFeedRequest(user_id=user), metadata=_md(replicas, user), timeout=20)
            codes.append("OK")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
            assert "rate limit" in e.details()
            codes.append("RESOURCE_EXHAUSTED")
    elapsed = time.monotonic() - t0
    after = [_served_ok(p) for p in replicas["metrics"]]
    served = [x - y for x, y in zip(after, before)]
    assert elapsed < BURST / RPS, f"the calls took {elapsed:.1f} s: longer than the limit's window"
    assert codes.count("OK") == BURST, codes  # per replica it would be 2 x BURST
    assert all(s >= 2 for s in served), f"GetFeed answered OK per replica: {served} (the balancer did not spread)"
    # another user has a limit of their own
    replicas["lb"].GetFeed(pb.GetFeedRequest(user_id=user + 1), metadata=_md(replicas, user + 1), timeout=20)


def test_page_2_of_a_cursor_from_replica_a_is_served_by_replica_b(replicas):
    user = 310
    md = _md(replicas, user)
    p1 = replicas["a"].GetFeed(pb.GetFeedRequest(user_id=user, limit=10), metadata=md, timeout=20)
    assert p1.next_cursor and not p1.degraded, list(p1.degraded_reasons)
    on_b = replicas["b"].GetFeed(pb.GetFeedRequest(user_id=user, limit=10, cursor=p1.next_cursor), metadata=md,
                                 timeout=20)
    on_a = replicas["a"].GetFeed(pb.GetFeedRequest(user_id=user, limit=10, cursor=p1.next_cursor), metadata=md,
                                 timeout=20)
    assert on_b.request_id == p1.request_id, "B ranked again instead of continuing A's ranking"
    assert not on_b.degraded, list(on_b.degraded_reasons)
    ids_b = [(it.post_id, it.position) for it in on_b.items]
    assert ids_b == [(it.post_id, it.position) for it in on_a.items]  # the same page from either replica
    assert [pos for _, pos in ids_b] == list(range(11, 21))
    assert not {it.post_id for it in p1.items} & {pid for pid, _ in ids_b}


def test_a_refresh_on_replica_b_reuses_the_ranking_replica_a_cached(replicas):
    user = 320
    md = _md(replicas, user)
    first = replicas["a"].GetFeed(pb.GetFeedRequest(user_id=user), metadata=md, timeout=20)
    assert not first.from_cache
    again = replicas["b"].GetFeed(pb.GetFeedRequest(user_id=user), metadata=md, timeout=20)
    assert again.from_cache, "B ranked from scratch: it did not find A's cached ranking"
    assert not again.degraded, list(again.degraded_reasons)
    assert not {it.post_id for it in first.items} & {it.post_id for it in again.items}  # seen on A, not repeated


def test_a_post_hidden_through_one_replica_stays_hidden_on_both(replicas):
    from features.connection import redis_client
    from serving.rankings import RANKING_KEY, decode

    user = 330
    md = _md(replicas, user)
    p1 = replicas["a"].GetFeed(pb.GetFeedRequest(user_id=user, limit=5), metadata=md, timeout=20)
    ranked = decode(redis_client(replicas["cfg"]).get(RANKING_KEY.format(p1.request_id))).cands.ids
    victim = int(ranked[7])  # ranked on A, not served yet
    replicas["b"].SubmitFeedback(pb.SubmitFeedbackRequest(user_id=user, kind=pb.HIDE, target=pb.POST, post_id=victim),
                                 metadata=md, timeout=20)
    served = list(replicas["a"].GetFeed(pb.GetFeedRequest(user_id=user, limit=5, cursor=p1.next_cursor),
                                        metadata=md, timeout=20).items)  # A's own cursor, after B took the feedback
    for stub in (replicas["a"], replicas["b"]):
        for feed in (pb.HOME, pb.EXPLORE):  # 7 calls in all: within the user's limit
            served += list(stub.GetFeed(pb.GetFeedRequest(user_id=user, feed_type=feed), metadata=md, timeout=20).items)
    assert len(served) > 60
    assert victim not in {it.post_id for it in served}


def test_the_http_api_is_balanced_over_the_replicas_too(replicas):
    import requests

    from serving.edge import config_token

    user = 1400
    auth = {"Authorization": "Bearer " + config_token(replicas["cfg"], user, False, 600.0)}
    before = [_served_ok(m) for m in replicas["metrics"]]
    first = requests.get(f"{replicas['http']}/api/v1/feed", params={"limit": 10}, headers=auth, timeout=30)
    assert first.status_code == 200, first.text
    page = first.json()
    assert [i["position"] for i in page["items"]] == list(range(1, 11)) and page["next_cursor"]
    second = requests.get(f"{replicas['http']}/api/v1/feed", params={"cursor": page["next_cursor"], "limit": 10},
                          headers=auth, timeout=30).json()
    assert second["request_id"] == page["request_id"] and [i["position"] for i in second["items"]] == list(range(11, 21))
    after = [_served_ok(m) for m in replicas["metrics"]]
    assert all(a - b == 1 for a, b in zip(after, before)), (before, after)  # one call on each replica
