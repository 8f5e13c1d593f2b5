"""feedrank core: configuration, domain constants, the event and feature schemas, JVM artifacts.

Imported first by everything (it imports nothing of ours), so the interpreter guards below run
before any third-party import: in PyFlink's embedded interpreter and under Feast.
"""

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

    venv = _venv_sites(path) if prefix == base_prefix else []  # a venv's own interpreter: nothing leaks in
    if not venv:
        return path
    drop = {str(Path(s)) for s in base_sites} - {str(Path(v)) for v in venv}
    return [p for p in path if str(Path(p)) not in drop]


def _venv_sites(path: list[str]) -> list[str]:
    from pathlib import Path

    return [p for p in path if p.endswith("site-packages") and (Path(p).parents[2] / "pyvenv.cfg").exists()]


def is_embedded(path: list[str], prefix: str, base_prefix: str) -> bool:
    """The base Python with a virtualenv's site-packages on its path: PyFlink's thread mode (pemja)."""
    return prefix == base_prefix and bool(_venv_sites(path))


def _isolate() -> None:
    import site

    sites = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    if is_embedded(sys.path, sys.prefix, sys.base_prefix):
        sys.path[:] = embedded_sys_path(list(sys.path), sys.prefix, sys.base_prefix, sites)
        # torch is another pybind11 extension whose import in a task thread can hang the same way, and
        # Feast 0.67 imports it whenever it is installed (feast/torch_wrapper.py). The jobs run their
        # models in numpy, so the embedded interpreter has none: `import torch` raises ImportError
        # there and Feast carries on without it.
        sys.modules.setdefault("torch", None)  # type: ignore[assignment]


_isolate()


def _single_process_metrics() -> None:
    """Keep prometheus_client's metrics in process memory, as each serving worker exports its own.

    ``import feast`` sets PROMETHEUS_MULTIPROC_DIR to a temp dir of its own (for its Gunicorn
    feature server) before prometheus_client is imported, which switched every metric of ours to
    multi-process files: values shared by every server in one process, and Gauge.remove() not
    implemented, so `feedrank_model_version_info` kept reporting replaced model versions. An
    inherited Feast directory is dropped and the value class is fixed now; a directory the operator
    set stays in force."""
    import os
    import tempfile
    from pathlib import Path

    for var in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"):
        d = os.environ.get(var, "")
        if d and Path(d).name.startswith("feast_metrics_") and Path(d).parent == Path(tempfile.gettempdir()):
            del os.environ[var]
    import prometheus_client.values  # noqa: F401 - reads the environment once, at import


_single_process_metrics()
