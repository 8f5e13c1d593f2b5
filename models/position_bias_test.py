import numpy as np

from models.position_bias import regression_em


def test_regression_em_recovers_a_known_examination_curve():
    """Relevance depends on features only and positions are shuffled: EM must find theta."""
    rng = np.random.default_rng(0)
    n, k = 200_000, 10
    x = rng.normal(size=(n, 4)).astype(np.float32)
    gamma = 1 / (1 + np.exp(-(x @ np.array([1.0, -0.5, 0.3, 0.0]) - 0.5)))
    pos = rng.integers(1, k + 1, n)
    theta = (1.0 / pos) ** 0.8
    clicks = rng.random(n) < theta * gamma
    est = regression_em(pos, clicks.astype(np.float32), x, n_positions=k, iters=10, epochs_per_iter=2)
    true_rel = (1.0 / np.arange(1, k + 1)) ** 0.8
    err = np.abs(np.array(est["relative"]) - true_rel) / true_rel
    assert err.max() < 0.05, err
