"""The shipped monitoring: promtool accepts the alerting rules and the example configuration; a real
Prometheus (Debian's) scrapes a running FeedService, evaluates the rules, and holds every metric the
Grafana dashboard and the rules query, including the streaming jobs' progress as the server exports it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from core.config import PROJECT_ROOT
from core.services import free_port
from serving.conftest import running_server, token, wait_for
from serving.protos import pb, rpc

pytestmark = pytest.mark.slow
RULES = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "feedrank.json"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: `make sysdeps` installs Debian's prometheus package"
    return path


def _expressions() -> list[str]:
    import yaml

    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    return exprs


def test_promtool_accepts_the_rules_and_the_example_configuration():
    for args in (["check", "rules", str(RULES)], ["check", "config", str(RULES.parent / "prometheus.yml")]):
        out = subprocess.run([_tool("promtool"), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "SUCCESS" in out.stdout + out.stderr, out.stdout + out.stderr
    assert "8 rules found" in subprocess.run([_tool("promtool"), "check", "rules", str(RULES)], capture_output=True,
                                             text=True, timeout=60).stdout


def _query(base: str, q: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_a_real_prometheus_scrapes_the_server_and_holds_every_metric_the_dashboard_and_rules_use(served_world, tmp_path):
    from features.writer import FeatureWriter

    import grpc

    with running_server(served_world) as server:
        mport = server.metrics_port
        # what the feature job and the learner write as they run (features.writer.FeatureWriter.progress)
        w = FeatureWriter(server.cfg)
        now = server.state.clock()
        w.progress("features", {"post_stats_events": 1234, "post_stats_max_ts": now - 4000,
                                "post_stats_flushed_at_ms": int(time.time() * 1000) - 2000})
        w.progress("learner", {"examples": 5000, "promoted": 2, "rejected": 3, "rolled_back": 1})
        with grpc.insecure_channel(server.address) as ch:
            stub = rpc.FeedServiceStub(ch)
            for u in range(300, 306):
                stub.GetFeed(pb.GetFeedRequest(user_id=u, feed_type=pb.HOME), metadata=token(server.cfg, u), timeout=30)
        port = free_port()
        conf = tmp_path / "prometheus.yml"
        conf.write_text(f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{RULES}]\n"
                        f"scrape_configs:\n  - job_name: feedrank\n    static_configs:\n"
                        f"      - targets: ['{server.cfg.serving.host}:{mport}']\n")
        prom = subprocess.Popen([_tool("prometheus"), f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "prometheus.log", "w"))
        base = f"http://127.0.0.1:{port}"
        try:
            def scraped() -> bool:
                try:
                    got = _query(base, 'feedrank_stream_events_total{stream="features",view="post_stats"}')
                    return bool(got) and bool(_query(base, "feedrank_learner_decisions_total"))
                except OSError:
                    return False
            try:
                wait_for("prometheus to scrape the server and its job progress", scraped, timeout=60)
            except AssertionError:
                text = urllib.request.urlopen(f"http://{server.cfg.serving.host}:{mport}/metrics", timeout=10).read().decode()
                raise AssertionError("not scraped; the server exports: " + " | ".join(
                    ln for ln in text.splitlines() if "stream" in ln or "learner" in ln) + " | prometheus: "
                    + (tmp_path / "prometheus.log").read_text()[-1500:]) from None
            assert [r["value"][1] for r in _query(base, 'up{job="feedrank"}')] == ["1"]
            ok = _query(base, 'sum(feedrank_rpcs_total{rpc="GetFeed",code="OK"})')
            assert float(ok[0]["value"][1]) >= 6
            assert float(_query(base, 'feedrank_stream_events_total{stream="features"}')[0]["value"][1]) == 1234
            fresh = float(_query(base, 'feedrank_stream_freshness_seconds{view="post_stats"}')[0]["value"][1])
            assert 4 <= fresh < 60  # the serving clock minus the newest event time the job applied
            rb = _query(base, 'feedrank_learner_decisions_total{decision="rolled_back"}')
            assert float(rb[0]["value"][1]) == 1

            # every metric the dashboard and the rules query is one the server declares
            exposition = urllib.request.urlopen(f"http://{server.cfg.serving.host}:{mport}/metrics", timeout=10).read().decode()
            declared = set(re.findall(r"^# TYPE (feedrank_\w+) ", exposition, re.M))
            used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in _expressions() for n in re.findall(r"feedrank_\w+", e)}
            assert used and used <= declared, sorted(used - declared)

            def rules_ran() -> bool:
                body = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())
                rules = [r for g in body["data"]["groups"] for r in g["rules"]]
                return len(rules) == 8 and all(r.get("lastEvaluation", "").startswith("20") for r in rules)
            wait_for("prometheus to evaluate the rules", rules_ran, timeout=30)
            body = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())
            assert all(r["health"] == "ok" for g in body["data"]["groups"] for r in g["rules"]), body
        finally:
            prom.terminate()
            prom.wait(timeout=20)
