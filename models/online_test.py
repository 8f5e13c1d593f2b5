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


# ---------------------------------------------------------------- each branch of the promotion rule
# (validate on a fixed clean holdout; the candidate's final layer set directly, so each test isolates one check)


def _good_model() -> NumpyHeavy:
    """The untrained ranker's final layer after 14K examples (its towers, so the untrained one is
    ``good.with_final(...)`` of the original weights)."""
    learner, nh = _learner(lr=0.001, lr_cap=0.001, batch_size=16, min_holdout=200, min_holdout_positives=20,
                           holdout_fraction=0.3)
    for ex in _examples(nh, 20_000, 2):
        learner.add(ex)
    return learner.candidate()


def _judge(current: NumpyHeavy, cand: NumpyHeavy, frozen: NumpyHeavy | None = None, n: int = 3000, **ol) -> dict:
    cfg = load_config({})
    learner = OnlineLearner(cfg.online_learning.model_copy(update={"min_holdout": 200, "min_holdout_positives": 20,
                                                                   **ol}), frozen or current, "v0")
    if frozen is not None:
        learner.promoted(current, "v1")
    learner.holdout.extend(_examples(current, n, 7))
    learner.w, learner.b, learner.wide = cand.final_w.copy(), cand.final_b.copy(), cand.wide.copy()
    learner.steps_since_promotion = 1
    return learner.validate(1)


def _shifted(m: NumpyHeavy, w_scale: float = 1.0, bias: float = 0.0) -> NumpyHeavy:
    b = m.final_b.copy()
    b[0] += bias
    return m.with_final(m.final_w * w_scale, b, m.wide * w_scale)


def test_rule_waits_for_a_large_enough_holdout():
    good = _good_model()
    d = _judge(good, good, n=100)
    assert d["decision"] == "wait" and d["reason"].startswith("holdout too small"), d


def test_rule_rejects_an_auc_drop_beyond_the_seeds_one_percent():
    good = _good_model()
    d = _judge(good, _shifted(good, w_scale=-1.0), max_logloss_increase=100.0)  # isolate the AUC floor
    assert d["decision"] == "reject" and "1% below the current's" in d["reason"], d
    assert d["auc_candidate"] < 0.99 * d["auc_current"] and d["auc_floor"] == round(0.99 * d["auc_current"], 5)


def test_rule_rejects_a_candidate_below_the_offline_anchor_even_within_one_percent_of_current():
    """A stream that degrades each promotion by just under 1% must not ratchet the model down."""
    good = _good_model()
    _, untrained = _learner()
    worse = good.with_final(untrained.final_w, untrained.final_b, untrained.wide)  # ranks worse than the anchor
    d = _judge(worse, worse, frozen=good, max_logloss_increase=100.0)
    assert d["auc_current"] < 0.99 * d["auc_frozen"], d
    assert d["decision"] == "reject" and "below the offline model's" in d["reason"], d


def test_rule_rejects_a_miscalibrated_candidate_whose_ranking_is_unchanged():
    good = _good_model()
    d = _judge(good, _shifted(good, bias=3.0))  # every click logit +3: same order, wrong probabilities
    assert d["auc_candidate"] == d["auc_current"], d
    assert d["decision"] == "reject" and d["reason"].startswith("holdout log loss") and "above current" in d["reason"]


def test_rule_promotes_a_candidate_that_improves_log_loss_within_the_auc_floor():
    good = _good_model()
    base = _shifted(good, bias=-0.6)  # the current model under-predicts clicks
    d = _judge(base, good)
    assert d["decision"] == "promote", d
    assert d["auc_candidate"] >= d["auc_floor"] and d["logloss_gain"] > 0


# ---------------------------------------------------------------- the learner and the model store


class _Store:
    """A real model store whose publish first runs ``before`` (another writer acting at that moment)."""

    def __init__(self, store, before=None):
        self.store, self.before = store, before

    def publish(self, *a, **k):
        if self.before is not None:
            self.before()
            self.before = None
        return self.store.publish(*a, **k)

    def __getattr__(self, name):
        return getattr(self.store, name)


def _loop(tmp_path, m: NumpyHeavy, **ol):
    from core.schema import HEAVY_SCHEMA_HASH
    from models.online import LearnerLoop
    from models.store import ModelStore

    store = ModelStore("file://" + str(tmp_path / "models"), cache_dir=tmp_path / "cache")
    v0 = store.publish("heavy", {"heavy.ts": b"ts", "heavy.npz": m.to_npz()}, feature_schema_hash=HEAVY_SCHEMA_HASH,
                       promote=True).version
    cfg = load_config({})
    ol = cfg.online_learning.model_copy(update={"lr": 0.001, "lr_cap": 0.001, "batch_size": 16, "min_holdout": 200,
                                                "min_holdout_positives": 20, "holdout_fraction": 0.3, **ol})
    return LearnerLoop(ol, store, HEAVY_SCHEMA_HASH), store, v0


def _feed(loop, seed: int, n: int = 8000) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    cur = loop.learner.current
    z = cur.normalized(x).astype(np.float32)
    h = cur.hidden(None, z=z)
    for i in range(n):
        y = np.zeros(6)
        y[0] = rng.random() < 1 / (1 + np.exp(-3 * x[i, 0]))
        loop.learner.add(Example(h[i], z[i], y, int(rng.integers(1, 20)), int(rng.integers(0, 10_000)), i,
                                 loop.learner.current_version, x=x[i]))


def test_an_operator_rollback_while_the_learner_runs_is_never_overridden(tmp_path):
    torch.manual_seed(0)
    nh = NumpyHeavy.from_npz(rankers.heavy_npz(rankers.HeavyRanker(12)))
    loop, store, v0 = _loop(tmp_path, nh)
    _feed(loop, 1)
    [d] = loop.decide(1)
    assert d["decision"] == "promote", d
    v1 = d["version"]
    assert store.current("heavy") == v1 and store.meta("heavy", v1).parent == v0
    store.rollback("heavy")  # the operator: back to v0, while the learner keeps training from v1
    _feed(loop, 2)
    [d] = loop.decide(2)
    assert d["decision"] == "rebase" and d["from"] == v1 and d["to"] == v0 and d["new_anchor"], d
    assert store.current("heavy") == v0 and loop.learner.current_version == v0
    _feed(loop, 3)
    [d] = loop.decide(3)
    assert d["decision"] == "promote" and store.meta("heavy", d["version"]).parent == v0, d  # parented on v0
    assert v1 not in [store.current("heavy"), *store.pointer("heavy")["history"][:1]]


def test_a_pointer_moved_during_publishing_leaves_the_candidate_unpromoted(tmp_path):
    from core.schema import HEAVY_SCHEMA_HASH

    torch.manual_seed(0)
    nh = NumpyHeavy.from_npz(rankers.heavy_npz(rankers.HeavyRanker(12)))
    loop, store, v0 = _loop(tmp_path, nh)
    torch.manual_seed(1)
    other = NumpyHeavy.from_npz(rankers.heavy_npz(rankers.HeavyRanker(12)))
    newer: list[str] = []
    loop.store = _Store(store, lambda: newer.append(store.publish(  # a daily retrain lands at that moment
        "heavy", {"heavy.ts": b"ts2", "heavy.npz": other.to_npz()}, feature_schema_hash=HEAVY_SCHEMA_HASH,
        promote=True).version))
    _feed(loop, 1)
    superseded, rebase = loop.decide(1)
    assert superseded["decision"] == "superseded" and "not promoted" in superseded["reason"], superseded
    assert rebase["decision"] == "rebase" and rebase["to"] == newer[0] and rebase["new_anchor"], rebase
    assert store.current("heavy") == newer[0] and loop.learner.current_version == newer[0]
    assert loop.learner.frozen is loop.learner.current  # the new offline model is the AUC floor's anchor
    # the buffered holdout was re-featurised under the new model's towers
    e = loop.learner.holdout[-1]
    np.testing.assert_allclose(e.h, loop.learner.current.hidden(e.x[None, :])[0], atol=1e-6)


def test_a_model_of_another_feature_schema_is_refused_and_the_learner_keeps_its_model(tmp_path):
    torch.manual_seed(0)
    nh = NumpyHeavy.from_npz(rankers.heavy_npz(rankers.HeavyRanker(12)))
    loop, store, v0 = _loop(tmp_path, nh)
    bad = store.publish("heavy", {"heavy.ts": b"ts", "heavy.npz": nh.to_npz()}, feature_schema_hash="ffff",
                        promote=True).version
    _feed(loop, 1)
    [d] = loop.decide(1)
    assert d["decision"] == "wait" and "feature schema ffff does not match" in d["reason"], d
    assert loop.learner.current_version == v0 and store.current("heavy") == bad  # nothing promoted over it
    assert loop.decide(2)[0]["reason"] == d["reason"]  # still refused, not retried into a crash
