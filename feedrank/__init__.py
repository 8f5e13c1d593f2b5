"""feedrank: production-grade feed ranking (two-tower retrieval, 4-stage funnel, streaming features)."""

from __future__ import annotations

import sys

__version__ = "0.1.0"


def embedded_sys_path(path: list[str], prefix: str, base_prefix: str, base_sites: list[str]) -> list[str]:
    """``sys.path`` without the base interpreter's site-packages, when this is the base interpreter
    running from a virtualenv's site-packages on PYTHONPATH (PyFlink's thread mode: pemja embeds the
    base Python's libpython in the JVM).

    Why: the base's site-packages are importable there too, after the venv's, so a module only the
    base has gets picked up. Measured: dask (imported by Feast) found the base's scipy, whose pybind11
    extension, imported in a task thread that holds a second Python thread state, deadlocks in
    ``PyGILState_Ensure`` (pybind11 calls it on import); the operator's ``open`` never returned —
    the intermittent start-up hang, caught by jobs/startup_stacks.py. A job sees the venv only.
    """
    from pathlib import Path

    if prefix != base_prefix:  # a virtualenv's own interpreter: nothing of the base leaks in
        return path
    venv = [p for p in path if p.endswith("site-packages") and (Path(p).parents[2] / "pyvenv.cfg").exists()]
    if not venv:
        return path
    drop = {str(Path(s)) for s in base_sites} - {str(Path(v)) for v in venv}
    return [p for p in path if str(Path(p)) not in drop]


def _isolate() -> None:
    import site

    sites = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    sys.path[:] = embedded_sys_path(list(sys.path), sys.prefix, sys.base_prefix, sites)


_isolate()
