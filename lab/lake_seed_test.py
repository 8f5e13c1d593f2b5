"""Seeding the lake from a simulated world, then the batch tier on it: every impression of the window is
an exposure with its served row, and the training set's labels are the simulator's own labels for the
same impressions (the lake's attribution rule agrees with the logged request and position)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

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
    assert x.shape[1] == 309 and np.isfinite(x).all()
