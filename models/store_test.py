from __future__ import annotations

import time

import pytest

from models.store import COMPLETE, ModelStore, ModelStoreError, PointerMoved


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    uri = "file://" + str(tmp_path / "models") if request.param == "file" else f"memory://store-{time.time_ns()}"
    return ModelStore(uri, retention_hours=48, retention_versions=2, cache_dir=tmp_path / "cache")


def test_publish_promote_fetch(store):
    a = store.publish("heavy", {"model.pt": b"weights-a"}, metrics={"auc": 0.71}, feature_schema_hash="abc",
                      data_window={"from": 1, "to": 2})
    assert store.current("heavy") is None
    store.promote("heavy", a.version)
    ck, path = store.fetch("heavy")
    assert ck.version == a.version and ck.metrics["auc"] == 0.71 and ck.feature_schema_hash == "abc"
    assert (path / "model.pt").read_bytes() == b"weights-a"
    b = store.publish("heavy", {"model.pt": b"weights-b"}, parent=a.version, promote=True)
    assert store.current("heavy") == b.version and store.meta("heavy", b.version).parent == a.version
    assert store.versions("heavy") == sorted([a.version, b.version])
    assert store.models() == ["heavy"]


def test_corrupt_or_half_written_checkpoint_never_becomes_current(store):
    good = store.publish("heavy", {"model.pt": b"good"}, promote=True)
    bad = store.publish("heavy", {"model.pt": b"fine"})
    with store.fs.open(store._p("heavy", "versions", bad.version, "model.pt"), "wb") as f:
        f.write(b"flipped bits")
    with pytest.raises(ModelStoreError, match="corrupt"):
        store.promote("heavy", bad.version)
    half = store.publish("heavy", {"model.pt": b"x"})
    store.fs.rm(store._p("heavy", "versions", half.version, COMPLETE))
    with pytest.raises(ModelStoreError, match="incomplete"):
        store.promote("heavy", half.version)
    missing = store.publish("heavy", {"model.pt": b"y", "index.faiss": b"z"})
    store.fs.rm(store._p("heavy", "versions", missing.version, "index.faiss"))
    with pytest.raises(ModelStoreError, match="missing"):
        store.promote("heavy", missing.version)
    assert store.current("heavy") == good.version
    # a crashed writer's staging directory is invisible to readers
    store.fs.makedirs(store._p("heavy", "staging", "0000000000000001-dead"), exist_ok=True)
    assert "0000000000000001-dead" not in store.versions("heavy")
    with pytest.raises(ModelStoreError, match="no such version"):
        store.promote("heavy", "0000000000000001-dead")


def test_rollback_skips_versions_that_no_longer_verify(store):
    v1 = store.publish("heavy", {"m": b"1"}, promote=True).version
    v2 = store.publish("heavy", {"m": b"2"}, promote=True).version
    v3 = store.publish("heavy", {"m": b"3"}, promote=True).version
    with store.fs.open(store._p("heavy", "versions", v2, "m"), "wb") as f:
        f.write(b"corrupted")
    assert store.rollback("heavy") == v1  # v2 is corrupt: skipped
    assert store.current("heavy") == v1 and store.pointer("heavy")["rolled_back_from"] == v3
    with pytest.raises(ModelStoreError, match="nothing to roll back"):
        store.rollback("heavy")


def test_retention_keeps_current_previous_and_newest(store):
    vs = [store.publish("heavy", {"m": str(i).encode()}).version for i in range(6)]
    store.promote("heavy", vs[0])
    store.promote("heavy", vs[1])
    assert store.apply_retention("heavy") == []  # all younger than 48 h
    deleted = store.apply_retention("heavy", now=time.time() + 49 * 3600)
    # current (vs[1]), its rollback target (vs[0]) and the 2 newest survive
    assert sorted(deleted) == sorted(vs[2:4])
    assert store.versions("heavy") == sorted([vs[0], vs[1], vs[4], vs[5]])
    assert store.rollback("heavy") == vs[0]


def test_copy_current_gives_an_independent_store(store, tmp_path):
    store.publish("heavy", {"model.pt": b"old"}, promote=True)
    cur = store.publish("heavy", {"model.pt": b"cur"}, metrics={"auc": 0.7}, promote=True)
    store.publish("light", {"light.npz": b"l"}, promote=True)
    dst = ModelStore("file://" + str(tmp_path / "copy"), cache_dir=tmp_path / "cache2")
    assert store.copy_current(dst) == {"heavy": cur.version, "light": store.current("light")}
    ck, path = dst.fetch("heavy")
    assert ck.version == cur.version and ck.metrics == {"auc": 0.7} and (path / "model.pt").read_bytes() == b"cur"
    assert dst.versions("heavy") == [cur.version]  # only the current version travels
    dst.publish("heavy", {"model.pt": b"learned"}, parent=cur.version, promote=True)
    assert store.current("heavy") == cur.version  # promotions in the copy never reach the source


def test_compare_and_set_promotion_never_overwrites_a_moved_pointer(store):
    v1 = store.publish("heavy", {"m": b"1"}, promote=True).version
    v2 = store.publish("heavy", {"m": b"2"}, parent=v1, promote=True, expect=v1).version
    assert store.current("heavy") == v2
    store.rollback("heavy")  # an operator rolls back while a publisher trains from v2
    with pytest.raises(PointerMoved, match=f"current is {v1}, not {v2}"):
        store.publish("heavy", {"m": b"3"}, parent=v2, promote=True, expect=v2)
    assert store.current("heavy") == v1, "the rollback stands"
    with pytest.raises(PointerMoved):
        store.rollback("heavy", expect=v2)
    assert store.current("heavy") == v1


def test_every_publish_prunes_online_checkpoints_beyond_their_own_limit(tmp_path):
    s = ModelStore("file://" + str(tmp_path / "m"), retention_hours=48, retention_versions=50,
                   cache_dir=tmp_path / "cache", retention_online_versions=3)
    offline = s.publish("heavy", {"m": b"offline"}, promote=True).version
    online = [s.publish("heavy", {"m": str(i).encode()}, parent=offline, extra={"online": True}, promote=True).version
              for i in range(6)]
    # all younger than 48 h and fewer than 50: only the online surplus goes, the rollback target stays
    assert s.versions("heavy") == sorted([offline, *online[-3:]])
    assert s.current("heavy") == online[-1] and s.rollback("heavy") == online[-2]
