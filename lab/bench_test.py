"""`feedrank bench features` turns the job's progress samples into rates that leave start-up out."""

import pytest

from lab.bench import feature_job_rates, isolated_config, scratch_removed_on_success


def _samples(points: list[tuple[float, int, int]]) -> list[tuple[float, dict]]:
    return [(t, {"post_events": p, "user_events": u}) for t, p, u in points]


def test_rates_start_at_the_first_flush_and_end_when_the_user_operator_has_everything():
    # submitted long before t=100 (start-up is not in the samples' window); 1,000 events were done by then
    s = _samples([(95.0, 0, 0), (100.0, 1_000, 0), (101.0, 10_000, 2_000), (109.0, 90_000, 30_000),
                  (110.0, 100_000, 33_000), (110.5, 100_000, 34_000), (111.0, 100_000, 34_000)])
    r = feature_job_rates(s, n=100_000, forwarded=34_000)
    assert r["seconds"] == 10.5
    assert r["events_per_s"] == round(99_000 / 10.5, 1)
    assert r["post_operator_events_per_s_10_90"] == round(80_000 / 8.0, 1)


def test_a_slow_last_operator_lowers_the_end_to_end_rate():
    fast = _samples([(0.0, 500, 0), (5.0, 10_000, 4_000), (10.0, 100_000, 34_000)])
    slow = _samples([(0.0, 500, 0), (5.0, 10_000, 4_000), (10.0, 100_000, 20_000), (20.0, 100_000, 34_000)])
    assert feature_job_rates(slow, 100_000, 34_000)["events_per_s"] < feature_job_rates(fast, 100_000, 34_000)["events_per_s"] / 1.9


def test_a_benchmark_s_data_dir_is_removed_when_it_succeeds_and_kept_when_it_fails(make_cfg, capsys):
    cfg = make_cfg()
    with scratch_removed_on_success():
        ok = isolated_config(cfg, "ok").data_dir
        (ok / "events").mkdir(parents=True)
        (ok / "events" / "seg").write_text("x")
    assert not ok.exists()
    with pytest.raises(RuntimeError), scratch_removed_on_success():
        bad = isolated_config(cfg, "bad").data_dir
        bad.mkdir(parents=True)
        raise RuntimeError("bench failed")
    assert bad.exists()
    assert f"benchmark data kept for diagnosis: {bad}" in capsys.readouterr().err
    with scratch_removed_on_success():  # a later success leaves an earlier failure's data alone
        isolated_config(cfg, "later").data_dir.mkdir(parents=True)
    assert bad.exists()
