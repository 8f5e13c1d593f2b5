"""Stage cost estimates and admission by queued work (the logic; serving/server_test.py runs them in a server)."""

from __future__ import annotations

import numpy as np

from serving.deadlines import WARM_RUNS, Admission, StageCosts


def test_a_stage_estimate_is_a_high_quantile_of_its_recent_durations_once_warm():
    c = StageCosts()
    rng = np.random.default_rng(0)
    runs = rng.normal(10.0, 1.0, 400)
    for ms in runs[:WARM_RUNS - 1]:
        c.observe("heavy", float(ms))
    assert c.expected_ms("heavy") == 0.0  # not trusted yet: the stage always runs
    for ms in runs[WARM_RUNS - 1:]:
        c.observe("heavy", float(ms))
    est = c.expected_ms("heavy")
    assert np.mean(runs[-100:] > est) < 0.03 and est < 16.0, est  # above ~99% of runs, not far above
    for _ in range(200):  # the stage got slower: the estimate follows
        c.observe("heavy", 30.0)
    assert 29.0 < c.expected_ms("heavy") < 32.0


def test_admission_refuses_when_the_queued_work_exceeds_its_budget_and_recovers():
    a = Admission(max_queued_ms=50)
    cold = [a.enter() for _ in range(WARM_RUNS)]
    assert all(n is not None for n in cold)  # the first requests after start are never refused
    for n in cold:
        a.leave(20.0 * n, n)  # each took 20 ms x the requests it shared the worker with: 20 ms alone
    assert abs(a.alone_ms - 20.0) < 1e-9 and a.in_flight == 0
    admitted = [a.enter() is not None for _ in range(5)]
    assert admitted == [True, True, True, False, False]  # 3 in flight x 20 ms = 60 ms > 50: shed
    assert a.shed == 2 and a.queued_ms == 60.0
    for _ in range(3):
        a.leave(60.0, 3)  # 3 sharing the worker: 20 ms each alone
    assert a.in_flight == 0 and abs(a.alone_ms - 20.0) < 1e-9 and a.enter() is not None
    assert Admission(max_queued_ms=0).enter() is not None  # 0 = off
