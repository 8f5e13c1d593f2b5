"""Evidence for a Python operator that never finishes ``open``.

PyFlink's thread mode (pemja) had an intermittent start-up hang: an operator stayed
INITIALIZING because its Python ``open`` never returned, and the JVM's stack showed only a
native ``invokeMethodNoArgs``. This module's dump found the cause (now fixed, see
``feedrank.embedded_sys_path``) and stays for any other native deadlock at start-up.

While any operator of this interpreter is inside ``open``, a C-level timer
(``faulthandler``, which needs no GIL, so it fires even if the GIL is held) is armed; if
the opens are not all done within half of ``flink.startup_timeout_s`` (the runners
restart a stuck job after all of it), every Python thread's stack is written to
``var/flink/python-stacks-<pid>.txt``. The runners (`feedrank jobs run`, `feedrank flink
submit`) and the demo print it.
"""

from __future__ import annotations

import faulthandler
import os
import threading
from pathlib import Path
from typing import IO

from core.config import Config

_lock = threading.Lock()
_opening = 0
_file: IO[str] | None = None


def stacks_path(cfg: Config) -> Path:
    return cfg.data_dir / "flink" / f"python-stacks-{os.getpid()}.txt"


def begin(cfg: Config, name: str) -> None:
    """An operator's ``open`` starts: arm the dump timer (one timer per interpreter)."""
    global _opening, _file
    with _lock:
        _opening += 1
        path = stacks_path(cfg)
        if _file is None or _file.name != str(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            _file = open(path, "a", buffering=1)  # noqa: SIM115 - stays open for the C timer
        _file.write(f"# {name}: open started; stacks follow if the opens take over {cfg.flink.startup_timeout_s / 2:.0f} s\n")
        faulthandler.dump_traceback_later(cfg.flink.startup_timeout_s / 2, repeat=False, file=_file)


def end(name: str) -> None:
    """An operator's ``open`` returned: disarm once no operator is still opening."""
    global _opening
    with _lock:
        _opening = max(_opening - 1, 0)
        if _file is not None:
            _file.write(f"# {name}: opened\n")
        if _opening == 0:
            faulthandler.cancel_dump_traceback_later()


def read_dumps(cfg: Config, since: float = 0.0) -> str:
    """The stack dumps written under this data dir after ``since`` (epoch seconds), newest last."""
    out = []
    files = [p for p in (cfg.data_dir / "flink").glob("python-stacks-*.txt") if p.stat().st_mtime >= since]
    for p in sorted(files, key=lambda p: p.stat().st_mtime):
        text = p.read_text(errors="replace")
        if "Thread 0x" in text or "Current thread" in text:
            out.append(f"--- {p}\n{text[-6000:]}")
    return "\n".join(out)
