"""Seeding the lake from a simulated world, then the batch tier on it: every impression of the window is
an exposure with its served row, and the training set's labels are the simulator's own labels for the
same impressions (the lake's attribution rule agrees with the logged request and position)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.schema import HEAVY_FEATURES
from features import lake
from jobs import training_set
from lab.lake_seed import seed_lake
from models.sim_data import SimData
from models.store import ModelStore
from serving.conftest import served_world  # noqa: F401  (the tiny trained world, once per session)

pytestmark = pytest.mark.slow


def test_seeded_lake_gives_the_simulators_labels(served_world, tmp_path):  # noqa: F811
    cfg = served_world.config(FEEDRANK_LAKE_URI="file://" + str(tmp_path / "lake"), FEEDRANK_LAKE_NEGATIVES_PER_POSITIVE="1000000")
    res = seed_lake(cfg, served_world.world_dir, ModelStore.from_config(cfg), days=1.0)
    data = SimData.load(served_world.world_dir)
    ts = data.impressions["ts"].to_numpy()
    in_window = ts >= res["since_ms"]
    assert res["rows"]["exposures"] == int(in_window.sum()) > 1000
    # one day of the world: its last date, and the one before when the day crosses midnight
    dates = sorted({lake.partition(int(t))[0] for t in ts[in_window]})
    date, days = dates[-1], len(dates)
    meta = training_set.run(cfg, date, days, workers=1)
    assert meta["counts"]["exposures"] == res["rows"]["exposures"] and meta["counts"]["missing_features"] == 0
    out = training_set.out_dir(cfg, date, days)
    t = pq.read_table(sorted(out.glob("*/*.parquet"))).to_pandas()
    key = t["request_id"] + "#" + t["position"].astype(str)
    imp = data.impressions[in_window]
    sim_click = dict(zip(imp["request_id"] + "#" + imp["position"].astype(str), data.labels[in_window][:, 0]))
    assert len(t) == res["rows"]["exposures"]  # all negatives kept at this ratio
    assert np.array_equal(t["click"].to_numpy(), np.array([sim_click[k] for k in key], dtype=np.int8))
    assert int(t["click"].sum()) > 50
    x = np.stack(t["x"].to_numpy())
    assert x.shape[1] == len(HEAVY_FEATURES) and np.isfinite(x).all()


def test_the_two_tower_trains_from_a_seeded_lake(served_world, tmp_path):  # noqa: F811
    from models.lake_training import train_two_tower_from_lake
    from models.train import load_two_tower

    cfg = served_world.config(FEEDRANK_LAKE_URI="file://" + str(tmp_path / "lake"))
    res = seed_lake(cfg, served_world.world_dir, ModelStore.from_config(cfg))  # the whole history
    import datetime as dt

    first, date = (lake.partition(int(t))[0] for t in (res["since_ms"], res["until_ms"]))
    days = (dt.date.fromisoformat(date) - dt.date.fromisoformat(first)).days + 1
    store = ModelStore("file://" + str(tmp_path / "models"))
    out = train_two_tower_from_lake(cfg, date, days, store=store, epochs=4)
    c = out["corpus"]
    assert c["impressions"] == res["rows"]["exposures"] and c["unknown_posts"] == 0 and c["follows"] > 100
    for model in ("two_tower", "retrieval"):
        ck, _ = store.fetch(model)
        assert store.current(model) == out[model]["version"]
        assert ck.data_window["source"] == "lake" and ck.data_window["dates"] == lake.days(date, days)
        assert ck.data_window["lake_schema"] == lake.schema_hash()
    assert out["retrieval"]["recall"] >= 0.95
    # on the corpus's validation clicks the towers score the clicked post above a random one
    data = SimData.load(c["dir"], valid_days=days * cfg.lake.validation_fraction)
    model, emb = load_two_tower(store)
    rows = np.flatnonzero(~data.train_mask & (data.labels[:, 0] > 0))
    assert rows.size > 20
    imp = data.impressions
    users, posts, t = (imp[k].to_numpy()[rows] for k in ("user_id", "post_id", "ts"))
    ue = data.user_embeddings(model, users, t)
    other = np.random.default_rng(0).integers(0, emb.shape[0], size=rows.size)
    pos, neg = (ue * emb[posts]).sum(1), (ue * emb[other]).sum(1)
    assert (pos > neg).mean() > 0.6, (pos > neg).mean()
