"""Guardrails of the online learner, on synthetic examples (the job tests run it in Flink)."""

from __future__ import annotations

import numpy as np
import torch

from core.config import load_config
from models import rankers
from models.online import Example, OnlineLearner, auc, in_holdout
from models.rankers import NumpyHeavy


def _learner(**ol) -> tuple[OnlineLearner, NumpyHeavy]:
    torch.manual_seed(0)
    m = rankers.HeavyRanker(12)
    nh = NumpyHeavy.from_npz(rankers.heavy_npz(m))
    cfg = load_config({})
    return OnlineLearner(cfg.online_learning.model_copy(update=ol), nh, "v0"), nh


def _examples(nh: NumpyHeavy, n: int, seed: int, flip: bool = False, offset: float = 0.0) -> list[Example]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    z = nh.normalized(x)
    h = nh.hidden(x, z=z)
    y = np.zeros((n, 6))
    y[:, 0] = rng.random(n) < 1 / (1 + np.exp(-3 * x[:, 0] - offset))
    if flip:
        y = 1 - y
    return [Example(h[i], z[i].astype(np.float32), y[i], int(rng.integers(1, 20)), int(rng.integers(0, 10_000)),
                    i * 10, "v0") for i in range(n)]


def test_auc_matches_the_rank_statistic():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    assert np.isnan(auc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_holdout_is_a_stable_user_hash():
    users = range(20_000)
    share = np.mean([in_holdout(u, 0.05) for u in users])
    assert 0.04 < share < 0.06
    assert [in_holdout(u, 0.05) for u in range(100)] == [in_holdout(u, 0.05) for u in range(100)]


def test_step_size_is_capped_and_gradients_clipped():
    learner, nh = _learner(lr=0.5, lr_cap=0.001, grad_clip=0.1, batch_size=32)
    assert learner.lr == 0.001
    before = np.concatenate([learner.w.ravel(), learner.wide.ravel(), learner.b])
    learner.step(_examples(nh, 32, 1, flip=True))
    after = np.concatenate([learner.w.ravel(), learner.wide.ravel(), learner.b])
    assert np.linalg.norm(after - before) <= 0.001 * 0.1 + 1e-12
    assert learner.clipped_steps == 1


def test_learning_improves_and_decisions_carry_numbers():
    learner, nh = _learner(lr=0.001, lr_cap=0.001, grad_clip=1.0, batch_size=16, min_holdout=200,
                           min_holdout_positives=20, holdout_fraction=0.3)
    for ex in _examples(nh, 20_000, 2):
        learner.add(ex)
    d = learner.validate(1)
    assert d["decision"] == "promote" and d["auc_candidate"] > d["auc_current"] + 0.05, d
    learner.promoted(learner.candidate(), "v1")
    assert learner.validate(2)["decision"] == "wait"  # nothing new since the promotion


def test_live_ctr_drop_is_a_rollback_decision():
    learner, nh = _learner(rollback_min_exposures=100, rollback_ctr_drop=0.05, rollback_window_s=600.0)
    for i in range(400):
        learner.live.add("v0", i * 100, i % 10 == 0)       # 10% CTR
        learner.live.add("v1", i * 100, i % 20 == 0)       # 5% CTR
    d = learner.rollback_check("v1", "v0", 40_000)
    assert d is not None and d["to"] == "v0" and d["ctr_current"] < d["ctr_previous"]
    assert learner.rollback_check("v0", "v1", 40_000) is None  # the better version is never rolled back


def test_labels_that_disagree_with_the_holdout_train_nothing_into_serving():
    """Training users' labels inverted, holdout users' clean: rejected as label drift, with the rates."""
    learner, nh = _learner(lr=0.001, lr_cap=0.001, batch_size=16, min_holdout=200, min_holdout_positives=20,
                           holdout_fraction=0.3)
    clean, flipped = _examples(nh, 20_000, 3, offset=-3.0), _examples(nh, 20_000, 3, flip=True, offset=-3.0)  # ~10% clicks
    for c, f in zip(clean, flipped):
        learner.add(c if in_holdout(c.user_id, 0.3) else f)
    d = learner.validate(1)
    assert d["decision"] == "reject" and d["reason"].startswith("label drift"), d
    assert d["train_click_rate"] > d["holdout_click_rate"] and abs(d["label_drift_z"]) > 6


def test_a_candidate_must_show_evidence_of_improvement():
    learner, nh = _learner(lr=0.001, lr_cap=0.001, batch_size=16, min_holdout=200, min_holdout_positives=20,
                           holdout_fraction=0.3, promotion_z=1e6)  # demand an impossible significance
    for ex in _examples(nh, 20_000, 4):
        learner.add(ex)
    d = learner.validate(1)
    assert d["decision"] == "reject" and "standard errors" in d["reason"] and d["logloss_gain"] > 0, d
