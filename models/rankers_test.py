import numpy as np
import torch

from models.inference import NumpyHeavy
from models.rankers import HeavyRanker, LightRanker, export_torchscript, heavy_from_bytes, load_torchscript, state_bytes, train_heavy


def test_light_ranker_recovers_logistic_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 3)).astype(np.float32) * [1, 2, 1] + [0, 5, 0]
    logit = 1.5 * x[:, 0] - 0.5 * (x[:, 1] - 5) / 2
    y = (rng.random(20_000) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    lr = LightRanker.fit(x, y)
    assert lr.w[0] > 1.2 and lr.w[1] < -0.3 and abs(lr.w[2]) < 0.1
    again = LightRanker.from_bytes(lr.to_bytes())
    assert np.allclose(again.score(x[:10]), lr.score(x[:10]))


def _heavy_data(n=60_000, f=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype(np.float32)
    rel = 1 / (1 + np.exp(-(x[:, :6] * 1.5 - 0.5)))  # head j depends on feature j
    pos = rng.integers(1, 11, n)
    exam = (1.0 / pos) ** 1.0
    y = (rng.random((n, 6)) < rel * exam[:, None]).astype(np.float32)
    return x, y, pos


def test_pal_heavy_ranker_learns_position_and_relevance_and_exports():
    x, y, pos = _heavy_data()
    m = HeavyRanker(x.shape[1], hidden=32, expert_dim=16)
    m.set_normalization(x.mean(0), x.std(0), np.full(12, -1e9), np.full(12, 1e9))
    losses = train_heavy(m, x, y, pos, epochs=4, batch=1024)
    assert losses[-1] < losses[0]
    curve = m.examination_curve(np.arange(1, 11))
    rel_curve = curve / curve[0]
    assert np.all(np.abs(rel_curve - 1.0 / np.arange(1, 11)) < 0.1 * (1.0 / np.arange(1, 11)) + 0.02), rel_curve
    ts = load_torchscript(export_torchscript(m, np.array([1, 2, 4, 6, 3, -8], dtype=np.float32)))
    batch = torch.from_numpy(x[:500])
    p, score = ts(batch)  # 500 rows, one call
    with torch.no_grad():
        eager = torch.sigmoid(m.relevance_logits(batch))
    assert p.shape == (500, 6) and score.shape == (500,)
    assert torch.allclose(p, eager, atol=1e-5)
    assert torch.allclose(score, eager @ torch.tensor([1.0, 2, 4, 6, 3, -8]), atol=1e-4)
    again = heavy_from_bytes(state_bytes(m))
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(again.relevance_logits(batch)), eager)


def _random_heavy(rows: int, seed: int, bound: float) -> tuple[HeavyRanker, np.ndarray, np.random.Generator]:
    """An untrained 30-feature heavy ranker normalised to ``rows`` random feature rows."""
    torch.manual_seed(0)
    m = HeavyRanker(30)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 30)).astype(np.float32)
    m.set_normalization(x.mean(0), x.std(0) + 0.1, np.full(30, -bound), np.full(30, bound))
    return m, x, rng


def test_numpy_heavy_matches_torch_and_final_layer_patch():
    from models.rankers import NumpyHeavy, apply_final, heavy_npz

    m, x, rng = _random_heavy(50, 0, 2.0)
    nh = NumpyHeavy.from_npz(heavy_npz(m))
    with torch.no_grad():
        want = m.relevance_logits(torch.from_numpy(x)).numpy()
    assert np.allclose(nh.score(x), want, atol=1e-4)
    assert np.allclose(nh.examination(np.array([1, 2])), torch.sigmoid(m.position.weight[[1, 2], 0]).detach().numpy())
    # an online update of the final layer, applied to the TorchScript serving module
    w2, b2 = nh.final_w + rng.normal(size=nh.final_w.shape) * 0.1, nh.final_b - 0.3
    upd = nh.with_final(w2, b2, rng.normal(size=nh.wide.shape) * 0.05)
    ts = apply_final(load_torchscript(export_torchscript(m, np.ones(6, dtype=np.float32))), upd.final_npz())
    with torch.no_grad():
        p, _ = ts(torch.from_numpy(x))
    assert np.allclose(p.numpy(), 1 / (1 + np.exp(-upd.score(x))), atol=1e-4)


def test_masked_columns_have_no_effect_in_every_serving_form():
    from models.rankers import NumpyHeavy, heavy_npz

    m, x, rng = _random_heavy(40, 1, 1e9)
    mask = np.ones(30, dtype=np.float32)
    mask[10:20] = 0.0
    m.set_input_mask(mask)
    x2 = x.copy()
    x2[:, 10:20] = rng.normal(size=(40, 10)) * 5  # only masked columns differ
    ts = load_torchscript(export_torchscript(m, np.ones(6, dtype=np.float32)))
    again = heavy_from_bytes(state_bytes(m))
    nh = NumpyHeavy.from_npz(heavy_npz(m))
    with torch.no_grad():
        base = m.relevance_logits(torch.from_numpy(x)).numpy()
        assert np.allclose(m.relevance_logits(torch.from_numpy(x2)).numpy(), base, atol=1e-6)
        assert np.allclose(ts(torch.from_numpy(x2))[0].numpy(), 1 / (1 + np.exp(-base)), atol=1e-5)
        assert np.allclose(again.relevance_logits(torch.from_numpy(x2)).numpy(), base, atol=1e-6)
    assert np.allclose(nh.score(x2), base, atol=1e-4)
    # serving drops the masked columns before the first layers; an online wide layer still applies
    from models.rankers import apply_final

    upd = nh.with_final(nh.final_w, nh.final_b, rng.normal(size=nh.wide.shape) * 0.05)
    ts2 = apply_final(load_torchscript(export_torchscript(m, np.ones(6, dtype=np.float32))), upd.final_npz())
    assert ts2.keep.numel() == 20
    with torch.no_grad():
        assert np.allclose(ts2(torch.from_numpy(x2))[0].numpy(), 1 / (1 + np.exp(-upd.score(x2))), atol=1e-4)
    # an unmasked column does change the output (the test above can fail)
    x3 = x.copy()
    x3[:, 0] += 3.0
    assert not np.allclose(nh.score(x3), base, atol=1e-3)


def test_heavy_input_mask_takes_groups_and_names_and_rejects_unknown_ones():
    import pytest

    from core.schema import HEAVY_FEATURES
    from models.train import heavy_input_mask

    mask = heavy_input_mask(["post_embedding", "ann_score"])
    assert mask.sum() == len(HEAVY_FEATURES) - 1 - sum(f.group == "post_embedding" for f in HEAVY_FEATURES)
    assert mask[[f.name for f in HEAVY_FEATURES].index("ann_score")] == 0
    with pytest.raises(ValueError, match="unknown feature groups or names \\['nope'\\]"):
        heavy_input_mask(["nope"])


def test_validation_and_serving_score_the_same_rows_identically_outliers_included(tmp_path):
    """The online learner validates with NumpyHeavy, serving runs the TorchScript export with the
    learner's final layer patched in: one feature transform, clip included, so the same scores."""
    from core.schema import HEAVY_SCHEMA_HASH
    from models.rankers import heavy_npz, load_heavy_serving
    from models.store import ModelStore

    torch.manual_seed(0)
    m = HeavyRanker(30, feature_clip=3.0)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 30)).astype(np.float32)
    m.set_normalization(x.mean(0), x.std(0) + 0.1, np.full(30, -1e9), np.full(30, 1e9))
    mask = np.ones(30, dtype=np.float32)
    mask[[4, 17]] = 0.0
    m.set_input_mask(mask)
    learned = NumpyHeavy.from_npz(heavy_npz(m))
    cand = learned.with_final(learned.final_w + rng.normal(0, 0.3, learned.final_w.shape),
                              learned.final_b + 0.2, rng.normal(0, 0.2, learned.wide.shape))
    store = ModelStore("file://" + str(tmp_path / "m"), cache_dir=tmp_path / "c")
    v = store.publish("heavy", {"heavy.ts": export_torchscript(m, np.ones(6, dtype=np.float32)),
                                "heavy.npz": cand.to_npz(), "final.npz": cand.final_npz()},
                      feature_schema_hash=HEAVY_SCHEMA_HASH, promote=True).version
    serving, version = load_heavy_serving(store)
    assert version == v
    rows = x[:200].copy()
    rows[:50, 0] = 20.0 * x[:, 0].std()   # far outside the clip: the learner and serving must agree here too
    rows[50:100, 9] = -15.0
    with torch.no_grad():
        p, _ = serving(torch.from_numpy(rows))
    want = 1.0 / (1.0 + np.exp(-cand.score(rows)))
    np.testing.assert_allclose(p.numpy(), want, atol=2e-6)
    # the clip is in force: 20 sd scores as 3 sd would
    at_clip = rows[:50].copy()
    at_clip[:, 0] = x[:, 0].mean() + 3.0 * (x[:, 0].std() + 0.1)
    np.testing.assert_allclose(cand.score(rows[:50]), cand.score(at_clip), atol=1e-5)
