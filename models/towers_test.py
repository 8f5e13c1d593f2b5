from __future__ import annotations

import numpy as np
import torch

from features.offline import USER_DENSE_DIM
from models.towers import (PostFeaturizer, TextHasher, TwoTower, UserInputs, embed_posts, embed_users, follows_bag,
                           subset_posts, train_two_tower)


def test_text_hasher_is_stable_and_adds_bigrams():
    h = TextHasher(1 << 10)
    ids, offs = h(["a b c", "b"])
    assert offs.tolist() == [0, 5]  # 3 unigrams + 2 bigrams, then 1 unigram
    again, _ = TextHasher(1 << 10)(["a b c", "b"])
    assert np.array_equal(ids, again)  # crc32, not Python's salted hash
    assert ids[1] == ids[5]


def test_follows_bag_lists_each_users_authors():
    src = np.array([0, 0, 2, 2, 2])
    dst = np.array([5, 6, 7, 8, 9])
    ids, offs = follows_bag(src, dst, np.array([2, 1, 0]), n_users=3)
    assert offs.tolist() == [0, 3, 4]  # user 1 follows nobody: one padding id
    assert ids.numel() == 6


def _toy(n_users=400, n_posts=600, topics=6, seed=0):
    rng = np.random.default_rng(seed)
    fav = rng.integers(0, topics, n_users)
    post_topic = rng.integers(0, topics, n_posts)
    words = [[f"t{t}w{i}" for i in range(10)] for t in range(topics)]
    text = [" ".join(rng.choice(words[t], 6)) for t in post_topic]
    dense = np.zeros((n_users, USER_DENSE_DIM), dtype=np.float32)
    dense[np.arange(n_users), fav] = 1.0
    return rng, fav, post_topic, text, dense


def test_two_tower_learns_tastes_and_embeds_unseen_posts_by_content():
    rng, fav, post_topic, text, dense = _toy()
    feat = PostFeaturizer()
    posts = feat(text, np.arange(len(text)) % 50, post_topic, np.zeros(len(text), dtype=np.int64))
    users = rng.integers(0, len(fav), 6000)
    chosen = np.array([rng.choice(np.flatnonzero(post_topic[:500] == fav[u])) for u in users])  # posts 500+ unseen
    ids, offs = follows_bag(np.array([0]), np.array([1]), users, len(fav))
    ui = UserInputs(torch.from_numpy(dense[users]), ids, offs)
    model = TwoTower(n_topics=6, hidden=64)
    zeros = np.zeros(users.size)
    losses = train_two_tower(model, ui, subset_posts(posts, chosen), chosen, zeros, zeros, epochs=3, batch=256)
    assert losses[-1] < losses[0]
    pe = embed_posts(model, posts)
    q_ids, q_offs = follows_bag(np.array([0]), np.array([1]), np.arange(len(fav)), len(fav))
    ue = embed_users(model, UserInputs(torch.from_numpy(dense), q_ids, q_offs))
    assert np.allclose(np.linalg.norm(pe, axis=1), 1, atol=1e-5)
    # cold start: among never-trained posts 500..599, each user's top-5 is mostly their topic
    top = np.argsort(-(ue @ pe[500:].T), axis=1)[:, :5]
    hit = (post_topic[500:][top] == fav[:, None]).mean()
    assert hit > 0.8, hit


def test_numpy_towers_match_torch():
    from models.towers import NumpyTowers, PostFeaturizer, TwoTower, UserInputs

    torch.manual_seed(3)
    model = TwoTower().eval()
    rng = np.random.default_rng(0)
    args = (["a b c", "", "red fox jumps over"], rng.integers(0, 99, 3), np.array([1, 2, 3]), np.array([0, 1, 2]))
    nt = NumpyTowers.from_npz(NumpyTowers.npz(model))
    with torch.no_grad():
        want = model.post(PostFeaturizer()(*args)).numpy()
    assert np.allclose(nt.post(PostFeaturizer().arrays(*args)), want, atol=1e-5)
    dense = rng.random((2, USER_DENSE_DIM)).astype(np.float32)
    ids, offs = np.array([5, 9, 0], dtype=np.int64), np.array([0, 2], dtype=np.int64)
    with torch.no_grad():
        want_u = model.user(UserInputs(torch.from_numpy(dense), torch.from_numpy(ids), torch.from_numpy(offs))).numpy()
    assert np.allclose(nt.user(dense, ids, offs), want_u, atol=1e-5)
