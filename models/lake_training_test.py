"""Training the rankers from the lake: a lake written in the lake job's format (served rows in which one
feature drives clicks) -> the Beam training set -> light and heavy fitted, published with their lake
window, and better than chance on the validation split; rows of another feature schema are refused."""

from __future__ import annotations

import numpy as np
import pytest

from core.events import Engagement, Exposure, FeaturesServed
from core.schema import HEAVY_FEATURES, schema_hash
from features import lake
from jobs import training_set
from models.lake_training import LakeTrainingError, train_from_lake
from models.store import ModelStore

pytestmark = pytest.mark.slow
T = 1_767_571_200_000  # 2026-01-05


def _seed_lake(cfg, users: int, schema: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    exps, served, engs = [], [], []
    for u in range(users):
        t = T + u * 60_000
        posts = list(range(u * 10, u * 10 + 10))
        x = rng.uniform(0, 1, size=(10, len(HEAVY_FEATURES))).astype(np.float32)
        rid = f"r{u}"
        served.append(FeaturesServed(event_id=f"fs{u}", ts=t, request_id=rid, snapshot_id=f"{rid}:1", user_id=u, post_ids=posts,
                                     feature_schema=schema, n_features=x.shape[1], rows=FeaturesServed.encode_rows(x)))
        for i, p in enumerate(posts):
            exps.append(Exposure(event_id=f"{rid}-{p}", ts=t, request_id=rid, user_id=u, post_id=p, author_id=1, position=i + 1,
                                 feed_type="home", source="in_network", snapshot_id=f"{rid}:1"))
            if rng.random() < 1 / (1 + np.exp(-(6 * x[i, 0] - 5))):  # recency drives clicks
                engs.append(Engagement(event_id=f"c{u}-{p}", ts=t + 5_000, user_id=u, post_id=p, action="click"))
    lake.write_rows(cfg, "exposures", [lake.row_of("exposures", e) for e in exps])
    lake.write_rows(cfg, "features_served", [lake.row_of("features_served", f) for f in served])
    lake.write_rows(cfg, "engagements", [lake.row_of("engagements", e) for e in engs])


def test_light_and_heavy_from_the_lake(make_cfg):
    cfg = make_cfg()
    _seed_lake(cfg, 1500, schema_hash(HEAVY_FEATURES))
    meta = training_set.run(cfg, "2026-01-05", 1, workers=1)
    assert meta["counts"]["missing_features"] == 0 and meta["splits"]["validation"]["rows"] > 100
    store = ModelStore.from_config(cfg)
    out = train_from_lake(cfg, "both", lake.training_set_dir(cfg, "2026-01-05", 1), store=store, epochs=10)
    assert out["light"]["validation_click_auc"] > 0.7, out
    assert out["heavy"]["validation_click_auc"] > 0.7, out
    for model in ("light", "heavy"):
        assert store.current(model) == out[model]["version"]
        ck, _ = store.fetch(model)
        w = ck.data_window
        assert w["source"] == "lake" and w["dates"] == ["2026-01-05"] and w["lake_schema"] == lake.schema_hash()
        assert w["feature_schema"] == schema_hash(HEAVY_FEATURES) and w["rows"] == out["train_rows"]


def test_rows_of_another_feature_schema_are_refused(make_cfg):
    cfg = make_cfg()
    _seed_lake(cfg, 30, "0123456789abcdef")
    training_set.run(cfg, "2026-01-05", 1, workers=1)
    with pytest.raises(LakeTrainingError, match="feature schema"):
        train_from_lake(cfg, "heavy", lake.training_set_dir(cfg, "2026-01-05", 1), store=ModelStore.from_config(cfg))
