"""The serving bench's per-world index cache keeps only the current towers' indexes (of every kind)."""

from pathlib import Path

from lab.bench_serve import index_cache_dir, prune_index_caches


def test_only_the_current_towers_index_and_the_feast_export_stay_cached(make_cfg):
    cfg = make_cfg()
    world = Path("/worlds/large-42")
    dirs = {v: index_cache_dir(cfg, world, v) for v in ("v1", "v2", "v3", "feast")}
    other_world = index_cache_dir(cfg, Path("/worlds/small-42"), "v1")
    for d in [*dirs.values(), other_world]:
        d.mkdir(parents=True)
        (d / "index.faiss").write_bytes(b"x")
    sq8 = index_cache_dir(make_cfg(FEEDRANK_RETRIEVAL_INDEX="ivf_sq8"), world, "v3")  # another kind, same towers
    sq8.mkdir(parents=True)
    assert sq8 != dirs["v3"] and dirs["feast"].name == "large-42-feast"
    removed = prune_index_caches(cfg, world, dirs["v3"])
    assert removed == [dirs["v1"], dirs["v2"]]
    assert dirs["v3"].exists() and sq8.exists() and dirs["feast"].exists() and other_world.exists()
    assert not dirs["v1"].exists() and not dirs["v2"].exists()
