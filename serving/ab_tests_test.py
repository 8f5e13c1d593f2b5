"""Experiments: stable, roughly uniform, independent assignment; overrides; clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import ConfigError, load_config
from serving.ab_tests import Experiment, Experiments, Variant


def _many(n: int) -> Experiments:
    return Experiments([Experiment(name=f"exp{i}", salt=f"s{i}", variants=[
        Variant(name="control", weight=50), Variant(name="treatment", weight=30, heads={"share": 9.0}),
        Variant(name="other", weight=20, rerank={"ad_every": 0})]) for i in range(n)])


def test_sixty_concurrent_experiments_are_stable_uniform_and_independent():
    a, b = _many(60), _many(60)
    users = range(20_000)
    assign = [a.assign(u) for u in users]
    assert assign == [b.assign(u) for u in users]  # another replica / a restart: same buckets
    for i in (0, 17, 59):
        got = np.array([x[f"exp{i}"] for x in assign])
        shares = {v: float((got == v).mean()) for v in ("control", "treatment", "other")}
        assert abs(shares["control"] - 0.5) < 0.02 and abs(shares["treatment"] - 0.3) < 0.02, shares
    x0 = np.array([x["exp0"] == "control" for x in assign])
    x1 = np.array([x["exp1"] == "control" for x in assign])
    assert abs((x0 & x1).mean() - x0.mean() * x1.mean()) < 0.02  # independent salts


def test_variant_overrides_reach_the_request_params():
    cfg = load_config(env={})
    e = _many(1)
    for u in range(200):
        params, assigned = e.params(cfg, u)
        v = assigned["exp0"]
        assert (params.head_weights[3] == 9.0) == (v == "treatment")
        assert (params.rerank.ad_every == 0) == (v == "other")


def test_invalid_files_name_the_problem(tmp_path):
    p = tmp_path / "e.toml"
    p.write_text('[[experiments]]\nname = "x"\n[[experiments.variants]]\nname = "a"\nweight = 1\nheads = { sharez = 2.0 }\n')
    with pytest.raises(ConfigError, match="sharez"):
        Experiments.load(p)
    p.write_text('[[experiments]]\nname = "x"\n[[experiments.variants]]\nname = "a"\nweight = 1\nrerank = { ad_every = -3 }\n')
    with pytest.raises(ConfigError, match="ad_every"):
        Experiments.load(p).check(load_config(env={}))
    assert Experiments.load(tmp_path / "missing.toml").experiments == []
    assert len(Experiments.load(load_config(env={}).path("experiments.toml")).experiments) >= 1  # the shipped file
