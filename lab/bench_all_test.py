"""The `feedrank bench` summary quotes the figures of the results it is given, and says what failed."""

from __future__ import annotations

from lab.bench_all import plot, headline, markdown


def _serve(p50: float, p99: float) -> dict:
    return {"posts": 50_000, "levels": [
        {"offered_rps": rps, "requests": 600, "codes": {"OK": 600}, "server_rss_mb": 900.0,
         "latency_ms": {"p50": p50 * k, "p90": p99 * k, "p99": p99 * k, "max": 2 * p99 * k}}
        for k, rps in ((1, 20.0), (2, 50.0))]}


def test_headline_and_markdown_quote_the_given_results(tmp_path):
    results = {"serve-small": _serve(7.5, 21.0),
               "retrieval": {"posts": 1_000_000, "k": 8000, "recall_vs_exact": 0.984, "latency_ms": {"p50": 3.1}},
               "features": {"events_per_s": 6116.5, "post_operator_events_per_s_10_90": 7712.5},
               "model-delay": {"error": "RuntimeError: the PyFlink jobs did not start in 300 s", "trace": ""}}
    h = headline(results)
    assert h["serve-small"]["20 rps"]["p99_ms"] == 21.0 and h["serve-small"]["50 rps"]["p50_ms"] == 15.0
    assert h["retrieval"]["recall_vs_exact"] == 0.984 and h["features"]["events_per_s"] == 6116.5
    assert "model-delay" not in h
    png = plot(results, tmp_path / "s.png")
    assert png == "s.png" and (tmp_path / "s.png").stat().st_size > 1000
    summary = {"at": "20261121-000000", "results": {k: f"/x/{k}.json" for k in results if "error" not in results[k]},
               "machine": {"cpus": 2, "memory_gb": 23.5, "platform": "Linux", "python": "3.11.7"},
               "errors": {"model-delay": results["model-delay"]["error"]}}
    md = markdown(summary, results, png)
    assert "2 cores, 23.5 GB" in md and "serve-small.json" in md and "6116.5" in md
    assert "| 20 rps | 7.5 | 21.0 | 600 | 600 | 0 | 900.0 |" in md
    assert "## model-delay: FAILED" in md and "did not start" in md
