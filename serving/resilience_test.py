"""Degradation and hot reload on the real stack: Redis stopped mid-test, the model store
made unreadable, a new model promoted while requests are in flight."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest

from runtime import stack
from serving.conftest import token, world_clock
from serving.protos import pb, rpc

pytestmark = pytest.mark.slow


@pytest.fixture
def server(served_world):
    from serving.server import Server

    cfg = served_world.config(FEEDRANK_MODEL_STORE_POLL_INTERVAL_S="0.5")
    stack.up(cfg)
    s = Server(cfg, bootstrap_dir=served_world.world_dir, clock=world_clock(served_world.end_ms), port=0, metrics_port=0)
    try:
        yield s
    finally:
        s.stop(grace=1.0)
        stack.down(cfg)


def _get(stub, cfg, user: int, feed=pb.HOME):
    return stub.GetFeed(pb.GetFeedRequest(user_id=user, feed_type=feed), metadata=token(cfg, user), timeout=10)


def test_redis_outage_degrades_then_recovers(server):
    cfg = server.cfg
    stub = rpc.FeedServiceStub(grpc.insecure_channel(server.address))
    ok = _get(stub, cfg, 300)
    assert ok.items and not ok.degraded
    stack.down(cfg)  # Redis gone: candidate cache, seen sets, user features, snapshots
    try:
        for u in (300, 301, 302):  # 300: last good features; 301/302: never seen by this replica
            r = _get(stub, cfg, u)
            assert r.items, "the feed must still be served"
            assert r.degraded and "redis_unavailable" in r.degraded_reasons, list(r.degraded_reasons)
        ex = _get(stub, cfg, 303, pb.EXPLORE)
        assert ex.items and ex.degraded
        # signals still land in the event log (the record); writes that need Redis say UNAVAILABLE, not crash
        item = ok.items[0]
        acc = stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=300, signals=[
            pb.Signal(post_id=item.post_id, action=pb.CLICK, position=item.position, request_id=ok.request_id)]),
            metadata=token(cfg, 300))
        assert acc.accepted == 1
        with pytest.raises(grpc.RpcError) as e:
            stub.PublishPost(pb.PublishPostRequest(author_id=300, topic=1, content_type=pb.TEXT), metadata=token(cfg, 300))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in e.value.details()
    finally:
        stack.up(cfg)
    deadline = time.time() + 15
    while True:
        r = _get(stub, cfg, 304)
        if not r.degraded or time.time() > deadline:
            break
        time.sleep(0.3)
    assert r.items and not r.degraded, list(r.degraded_reasons)


def test_hot_reload_under_load_and_unreadable_model_store(server):
    cfg = server.cfg
    stub = rpc.FeedServiceStub(grpc.insecure_channel(server.address))
    store = server.loader.store
    old = store.current("heavy")
    errors: list[Exception] = []
    versions: list[str] = []
    stop = threading.Event()

    def load() -> None:
        u = 400
        while not stop.is_set():
            try:
                versions.append(_get(stub, cfg, u, pb.EXPLORE).model_version)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            u = 400 + (u - 399) % 50

    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(1.0)
        _, path = store.fetch("heavy", old)
        files = {f.name: f.read_bytes() for f in path.iterdir() if f.name in store.meta("heavy", old).files}
        schema = store.meta("heavy", old).feature_schema_hash
        new = store.publish("heavy", files, parent=old, feature_schema_hash=schema, promote=True).version
        deadline = time.time() + 15
        while server.loader.models.heavy_version != new and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert versions[0] == old and versions[-1] == new, (versions[0], versions[-1])
    # the model store becomes unreadable: keep serving the last good models, say degraded
    root = server.loader.store.root
    shutil.move(root, root + ".away")
    try:
        deadline = time.time() + 10
        while server.loader.store_ok and time.time() < deadline:
            time.sleep(0.1)
        r = _get(stub, cfg, 460)
        assert r.items and r.model_version == new
        assert r.degraded and "model_store_unavailable" in r.degraded_reasons
    finally:
        shutil.move(root + ".away", root)
    deadline = time.time() + 10
    while not server.loader.store_ok and time.time() < deadline:
        time.sleep(0.1)
    assert not _get(stub, cfg, 461).degraded
    # a model trained on other feature columns becomes current: refused at load, the last good one serves
    other = store.publish("heavy", files, parent=new, feature_schema_hash="0123456789abcdef", promote=True).version
    try:
        deadline = time.time() + 10
        while other not in server.loader.refused.get("heavy", {}) and time.time() < deadline:
            time.sleep(0.1)
        assert "feature schema 0123456789abcdef does not match the serving schema" in server.loader.refused["heavy"][other]
        r = _get(stub, cfg, 462)
        assert r.items and r.model_version == new and not r.degraded
        assert store.current("heavy") == other and server.loader.store_ok
        time.sleep(1.5)  # the metrics watcher's tick
        assert server.metrics.models_refused.labels("heavy")._value.get() == 1
    finally:
        assert store.rollback("heavy") == new  # the store is shared with later tests
