"""Ground truth of the simulated world: who likes what, and how people scroll.

Every behaviour the simulator logs is drawn from these formulas, and every offline
metric (NDCG vs true utility, the position-bias curve) is scored against them:

    z(u, p, t) = BIAS + TOPIC_W * topic_pref[u, topic_p] + CTYPE_W * ctype_pref[u, ctype_p]
                 + creator_quality[author_p] + post_quality[p] + FOLLOW_W * follows(u, author_p)
                 + trend(topic_p, t) + BAIT * flagged_p - AGE_W * age_days(p, t)
    P(examine | position k) = (1 / k) ** eta
    P(click | examined)     = sigmoid(z)
    P(like | click) = sigmoid(z + LIKE_B)   (comment, share likewise)
    dwell_ms | click  ~ LogNormal(log(DWELL_BASE[ctype]) + DWELL_Z * z, DWELL_SIGMA)
    P(negative | examined, no click) = sigmoid(-z + NEG_B + FLAG_NEG * flagged_p)

Policy-flagged posts are engagement bait: a little more clickable, much more often hidden.
The logged history was served by a previous production ranker (``LOG_*`` below) that used
only observable signals (recency, follow graph, author popularity, content type), so
positions in the logs correlate with those features, as they do in real logs.
"""

from __future__ import annotations

import numpy as np

BIAS = -1.6
TOPIC_W = 2.2
CTYPE_W = 0.8
FOLLOW_W = 0.6
BAIT = 0.3
AGE_W = 0.35
LIKE_B = -0.9
COMMENT_B = -2.4
SHARE_B = -2.8
NEG_B = -2.6
FLAG_NEG = 1.5
DWELL_BASE = np.array([9_000.0, 12_000.0, 25_000.0])  # text, image, video (ms)
DWELL_Z = 0.35
DWELL_SIGMA = 0.8
NEG_SPLIT = np.array([0.4, 0.4, 0.2])  # hide, not_interested, see_less
SESSION_STEP_MS = 1_500  # time between two positions while scrolling
# Logging policy of the history: the previous production ranker (EdgeRank-like). It sees
# only what a server could see — never the latent z — or the logs would leak the truth:
#   score = LOG_RECENCY * exp(-age_h / 12) + LOG_IN_NETWORK * follows
#           + LOG_POPULARITY * log1p(author followers) / log1p(max followers)
#           + LOG_CTYPE[content type] + N(0, LOG_NOISE)
LOG_RECENCY = 1.0
LOG_IN_NETWORK = 0.5
LOG_POPULARITY = 0.5
LOG_CTYPE = np.array([0.0, 0.1, 0.2])
LOG_NOISE = 0.7


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7)."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * np.exp(-a * a)
    return s * y


def p_dwell_above(z: np.ndarray, ctype: np.ndarray, threshold_ms: float) -> np.ndarray:
    """P(dwell > threshold | click) under the log-normal dwell model."""
    mu = np.log(DWELL_BASE[ctype]) + DWELL_Z * z
    return 0.5 * (1.0 - erf((np.log(threshold_ms) - mu) / (DWELL_SIGMA * np.sqrt(2.0))))


def examination(positions: np.ndarray, eta: float) -> np.ndarray:
    """True P(examine) at 1-based positions."""
    return (1.0 / np.asarray(positions, dtype=np.float64)) ** eta


def head_probs(z: np.ndarray, ctype: np.ndarray, flagged: np.ndarray, long_dwell_ms: float) -> dict[str, np.ndarray]:
    """Per-head probabilities given the post is examined (the heavy ranker's targets)."""
    pc = sigmoid(z)
    return {
        "click": pc,
        "like": pc * sigmoid(z + LIKE_B),
        "comment": pc * sigmoid(z + COMMENT_B),
        "share": pc * sigmoid(z + SHARE_B),
        "long_dwell": pc * p_dwell_above(z, ctype, long_dwell_ms),
        "negative": (1.0 - pc) * sigmoid(-z + NEG_B + FLAG_NEG * flagged),
    }


NEG_KINDS = np.array(["hide", "not_interested", "see_less"])


def sample_behaviour(z: np.ndarray, ctype: np.ndarray, flagged: np.ndarray, examined: np.ndarray,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw what users do with examined posts (the one behaviour model of the simulator)."""
    n = z.shape[0]
    click = examined & (rng.random(n) < sigmoid(z))
    dwell_draw = rng.lognormal(np.log(DWELL_BASE[ctype]) + DWELL_Z * z, DWELL_SIGMA)
    return {
        "click": click,
        "like": click & (rng.random(n) < sigmoid(z + LIKE_B)),
        "comment": click & (rng.random(n) < sigmoid(z + COMMENT_B)),
        "share": click & (rng.random(n) < sigmoid(z + SHARE_B)),
        "dwell_ms": np.where(click, dwell_draw, 0).astype(np.int64),
        "negative": examined & ~click & (rng.random(n) < sigmoid(-z + NEG_B + FLAG_NEG * flagged)),
        "negative_kind": NEG_KINDS[rng.choice(3, size=n, p=NEG_SPLIT)],
    }
