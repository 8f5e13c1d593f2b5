"""`feast apply`, `feast materialize` and online reads against the embedded Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from features.feast_repo import configure, export
from runtime import stack
from sim.generate import generate

pytestmark = pytest.mark.slow


def _feast(args: list[str], repo: Path, env: dict) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "feast"
    return subprocess.run([str(exe), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def test_apply_materialize_and_read_online(make_cfg, tmp_path):
    overrides = {"FEEDRANK_SIM_SCALES_SMALL_USERS": "600", "FEEDRANK_SIM_SCALES_SMALL_CREATORS": "100",
                 "FEEDRANK_SIM_SCALES_SMALL_POSTS": "3000", "FEEDRANK_SIM_SCALES_SMALL_IMPRESSIONS": "40000"}
    cfg = make_cfg(**overrides)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env.update(overrides, FEEDRANK_PATHS_DATA_DIR=str(cfg.data_dir), FEEDRANK_REDIS=cfg.redis.uri)
    generate(cfg, "small", 4, tmp_path / "w")
    repo = tmp_path / "repo"
    configure(cfg, repo)
    counts = export(cfg, tmp_path / "w")
    assert counts["post_stats"] == 3000 and counts["user_topic"] == 600
    try:
        stack.up(cfg)
        r = _feast(["apply"], repo, env)
        assert r.returncode == 0, r.stdout + r.stderr
        views = ["user_profile", "user_topic", "post_content", "post_stats", "author_stats"]
        r = _feast(["materialize", "2020-01-01T00:00:00", "2030-01-01T00:00:00", *sum((["--views", v] for v in views), [])],
                   repo, env)
        assert r.returncode == 0, r.stdout + r.stderr
        r = _feast(["feature-views", "list"], repo, env)
        assert r.returncode == 0 and all(v in r.stdout for v in views + ["user_embedding", "post_embedding"])
        # read back through Feast: exactly what was exported
        from feast import FeatureStore

        os.environ["FEEDRANK_PATHS_DATA_DIR"] = str(cfg.data_dir)  # definitions.py resolves the data dir
        try:
            store = FeatureStore(repo_path=str(repo))
            want = pd.read_parquet(cfg.data_dir / "feast" / "post_stats.parquet").set_index("post_id")
            busiest = int(want.clicks.idxmax())
            got = store.get_online_features(["post_stats:clicks", "post_stats:impressions", "post_content:topic"],
                                            entity_rows=[{"post_id": busiest}, {"post_id": 7}]).to_dict()
        finally:
            del os.environ["FEEDRANK_PATHS_DATA_DIR"]
        assert got["clicks"] == [int(want.clicks[busiest]), int(want.clicks[7])]
        assert got["impressions"][0] == int(want.impressions[busiest]) > 0
    finally:
        stack.down(cfg)
