"""`feedrank experiments report` on a lake with known effects: users assigned by the real hashing, a
+10% CTR effect (and +40% negative feedback, over its guardrail) in one experiment, nothing in an A/A
one, and a third whose treatment users lost a fifth of their exposure logs (a sample-ratio mismatch)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np

EXPERIMENTS = """
[[experiments]]
name = "ctr_up"
salt = "s1"
guardrails = { ctr = -0.05, negative_rate = 0.10 }
[[experiments.variants]]
name = "control"
weight = 50
[[experiments.variants]]
name = "treatment"
weight = 50

[[experiments]]
name = "aa"
salt = "s2"
[[experiments.variants]]
name = "control"
weight = 50
[[experiments.variants]]
name = "copy"
weight = 50

[[experiments]]
name = "lossy"
salt = "s3"
[[experiments.variants]]
name = "control"
weight = 50
[[experiments.variants]]
name = "treatment"
weight = 50
"""
BASE_CTR, LIFT, NEG, NEG_LIFT = 0.10, 0.10, 0.01, 0.40


def _lake(cfg, path: Path, users: int = 6000, seed: int = 3) -> None:
    from features.lake import write_rows
    from serving.ab_tests import Experiments

    exps = Experiments.load(path)
    rng = np.random.default_rng(seed)
    t0 = 1_767_571_200_000
    ex_rows, en_rows = [], []
    for u in range(1, users + 1):
        assigned = exps.assign(u)
        if assigned["lossy"] == "treatment" and rng.random() < 0.2:
            continue  # this user's exposures never reached the lake
        ctr = BASE_CTR * (1 + LIFT if assigned["ctr_up"] == "treatment" else 1)
        neg = NEG * (1 + NEG_LIFT if assigned["ctr_up"] == "treatment" else 1)
        n = rng.poisson(40) + 1
        ts = t0 + np.sort(rng.integers(0, 3 * 86_400_000, n))
        posts = rng.choice(200_000, n, replace=False)
        exp_json = json.dumps(assigned, sort_keys=True)
        rid = uuid.uuid4().hex
        for i in range(n):
            ex_rows.append((uuid.uuid4().hex, int(ts[i]), rid, u, int(posts[i]), 1, i + 1, "home", "out_of_network",
                            "v1", exp_json, None))
            if rng.random() < ctr:
                en_rows.append((uuid.uuid4().hex, int(ts[i]) + 5000, u, int(posts[i]), "click", None, 1, i + 1, rid))
            if rng.random() < 0.03:
                en_rows.append((uuid.uuid4().hex, int(ts[i]) + 6000, u, int(posts[i]), "like", None, 1, i + 1, rid))
            if rng.random() < neg:
                en_rows.append((uuid.uuid4().hex, int(ts[i]) + 7000, u, int(posts[i]), "hide", None, 1, i + 1, rid))
    write_rows(cfg, "exposures", ex_rows)
    write_rows(cfg, "engagements", en_rows)


def test_the_report_finds_the_injected_effect_and_nothing_in_an_a_a_test(make_cfg, tmp_path):
    from lab.experiment_report import report, write

    path = tmp_path / "experiments.toml"
    path.write_text(EXPERIMENTS)
    cfg = make_cfg(FEEDRANK_SERVING_EXPERIMENTS_FILE=str(path))
    _lake(cfg, path)
    rep = report(cfg)
    by = {e["name"]: e for e in rep["experiments"]}

    up = by["ctr_up"]
    ctr = up["variants"]["treatment"]["vs_control"]["ctr"]
    assert ctr["significant"] and ctr["p_value"] < 1e-6
    assert ctr["relative_ci"][0] < LIFT < ctr["relative_ci"][1]  # the injected +10% is inside the 95% CI
    assert abs(up["variants"]["control"]["metrics"]["ctr"]["value"] - BASE_CTR) < 0.005
    assert not up["srm"]["mismatch"]
    assert [(b["variant"], b["metric"]) for b in up["guardrail_breaches"]] == [("treatment", "negative_rate")]
    assert not up["variants"]["treatment"]["vs_control"]["like_rate"]["significant"]  # no effect injected there

    aa = by["aa"]["variants"]["copy"]["vs_control"]
    assert not aa["ctr"]["significant"] and aa["ctr"]["relative_ci"][0] < 0 < aa["ctr"]["relative_ci"][1]
    assert sum(aa[m]["significant"] for m in aa) <= 1  # 7 metrics at 5%: a false positive is possible, two unlikely
    assert aa["ctr"]["mde_relative_80_power"] < 0.10  # this sample could detect the +10% effect
    assert not by["aa"]["srm"]["mismatch"] and by["aa"]["guardrail_breaches"] == []

    lossy = by["lossy"]
    assert lossy["srm"]["mismatch"] and lossy["srm"]["p_value"] < 1e-6
    users = {v: d["users"] for v, d in lossy["variants"].items()}
    assert users["treatment"] < 0.9 * users["control"]

    paths = write(rep, tmp_path / "out")
    md = paths["md"].read_text()
    assert "## ctr_up" in md and "**Breached**: treatment negative_rate" in md and "MISMATCH" in md
    assert paths["png"].stat().st_size > 10_000
    assert json.loads(paths["json"].read_text())["experiments"][0]["name"] == "ctr_up"


def test_the_cli_writes_the_report_and_refuses_an_empty_lake_in_one_line(make_cfg, tmp_path):
    from runtime.procs import child_env

    path = tmp_path / "experiments.toml"
    path.write_text(EXPERIMENTS)
    cfg = make_cfg(FEEDRANK_SERVING_EXPERIMENTS_FILE=str(path))
    cli = [sys.executable, "-m", "feedrank.cli", "experiments", "report", "--file", str(path)]
    env = {**child_env(cfg), "FEEDRANK_SERVING_EXPERIMENTS_FILE": str(path)}
    empty = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1 and len(empty.stderr.strip().splitlines()) == 1, empty.stderr
    assert "no logged exposure names an experiment" in empty.stderr
    _lake(cfg, path, users=800)
    out = tmp_path / "report"
    ok = subprocess.run(cli + ["--since", "2d", "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["window"]["since_ms"] == rep["window"]["last_exposure_ms"] - 2 * 86_400_000
    assert rep["window"]["first_exposure_ms"] >= rep["window"]["since_ms"]
    assert "# Experiment read-out" in ok.stdout and (out / "report.png").exists()
