"""The start-up stack dump: written when an open outlasts half the start-up timeout, not otherwise."""

from __future__ import annotations

import time

from jobs import startup_stacks


def test_a_slow_open_leaves_every_threads_stack_and_a_quick_one_leaves_none(make_cfg):
    cfg = make_cfg(FEEDRANK_FLINK_STARTUP_TIMEOUT_S="1")
    startup_stacks.begin(cfg, "quick operator")
    startup_stacks.end("quick operator")
    time.sleep(0.8)
    assert startup_stacks.read_dumps(cfg) == ""  # opened in time: the timer was cancelled

    since = time.time()
    startup_stacks.begin(cfg, "slow operator")
    startup_stacks.begin(cfg, "other operator")
    startup_stacks.end("other operator")  # one operator done does not disarm while another is opening
    time.sleep(0.9)
    startup_stacks.end("slow operator")
    dump = startup_stacks.read_dumps(cfg, since=since)
    assert "slow operator: open started" in dump
    assert "startup_stacks_test.py" in dump and "test_a_slow_open" in dump  # this thread's frames
    assert startup_stacks.read_dumps(cfg, since=time.time() + 5) == ""
