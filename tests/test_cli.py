"""The `feedrank` console script as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = [[], ["up"], ["down"], ["status"], ["demo"], ["flink"], ["flink", "up"], ["flink", "down"],
            ["flink", "status"], ["flink", "submit"], ["sim"], ["sim", "generate"], ["sim", "clients"],
            ["config"], ["config", "check"], ["config", "show"], ["jobs"], ["jobs", "run"], ["events"],
            ["events", "stats"]]


def _feedrank() -> list[str]:
    exe = shutil.which("feedrank", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "feedrank.cli"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env["FEEDRANK_PATHS_DATA_DIR"] = str(tmp_path / "var")
    env.update(extra)
    return env


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "feedrank")
def test_every_command_has_help(cmd, tmp_path):
    r = subprocess.run(_feedrank() + cmd + ["--help"], capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


def test_sim_generate_through_the_cli(tmp_path):
    env = _env(tmp_path, FEEDRANK_SIM_SCALES_SMALL_USERS="500", FEEDRANK_SIM_SCALES_SMALL_CREATORS="100",
               FEEDRANK_SIM_SCALES_SMALL_POSTS="3000", FEEDRANK_SIM_SCALES_SMALL_IMPRESSIONS="20000")
    out = tmp_path / "w"
    r = subprocess.run(_feedrank() + ["sim", "generate", "--scale", "small", "--seed", "3", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout.strip().splitlines()[-1])
    assert meta["users"] == 500 and meta["posts"] == 3000 and meta["impressions"] == 20000
    assert {p.name for p in out.iterdir()} >= {"users.parquet", "posts.parquet", "follows.parquet",
                                                "impressions.parquet", "engagements.parquet", "ground_truth.npz"}
    bad = subprocess.run(_feedrank() + ["sim", "generate", "--scale", "galactic", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and "unknown scale 'galactic'" in bad.stderr


@pytest.mark.parametrize("columns", ["20", "200"])
def test_sim_clients_requires_a_world(tmp_path, columns):
    """An error is one unwrapped line, whatever the terminal's width."""
    missing = tmp_path / "a-long-directory-name-that-would-wrap" / "none"
    r = subprocess.run(_feedrank() + ["sim", "clients", "--world", str(missing)], capture_output=True,
                       text=True, env=_env(tmp_path, COLUMNS=columns), timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "feedrank sim generate" in lines[0] and str(missing) in lines[0], r.stderr


@pytest.mark.parametrize("columns", ["40", "200"])
def test_models_list_shows_whole_version_ids_and_json(tmp_path, columns):
    from models.store import ModelStore

    store = ModelStore("file://" + str(tmp_path / "models"), cache_dir=tmp_path / "cache")
    a = store.publish("heavy", {"w.bin": b"1"}, metrics={"auc": 0.7}, promote=True).version
    b = store.publish("heavy", {"w.bin": b"2"}, parent=a).version
    env = _env(tmp_path, FEEDRANK_MODEL_STORE="file://" + str(tmp_path / "models"), COLUMNS=columns)
    r = subprocess.run(_feedrank() + ["models", "list", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert {(x["version"], x["current"], x["parent"]) for x in rows} == {(a, True, ""), (b, False, a)}
    assert [x["metrics"] for x in rows if x["version"] == a] == [{"auc": 0.7}]
    table = subprocess.run(_feedrank() + ["models", "list", "heavy"], capture_output=True, text=True, env=env,
                           timeout=60)
    assert table.returncode == 0 and a in table.stdout and b in table.stdout, table.stdout
