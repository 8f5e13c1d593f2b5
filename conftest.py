"""Shared fixtures: every test gets its own data dir and free ports, so tests never touch
var/ of a developer's running stack and can run in any order."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from core.config import Config, load_config
from core.services import free_port


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., Config]:
    """Build a Config from the real defaults plus FEEDRANK_* style overrides. Every test's stack
    gets its own random JWT and cursor keys (the same for every config it builds): the shipped
    placeholders are refused by any server (serving.edge.check_secrets)."""
    from serving.edge import embedded_auth

    auth = embedded_auth()

    def make(**overrides: str) -> Config:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
        env.update(auth)
        env["FEEDRANK_PATHS_DATA_DIR"] = str(tmp_path / "var")
        env["FEEDRANK_EVENTS"] = "file://" + str(tmp_path / "var" / "events")
        env["FEEDRANK_REDIS"] = f"redis://127.0.0.1:{free_port()}/0"
        env["FEEDRANK_FLINK_REST_PORT"] = str(free_port())
        env["FEEDRANK_MODEL_STORE"] = "file://" + str(tmp_path / "var" / "models")
        env["FEEDRANK_LAKE_URI"] = "file://" + str(tmp_path / "var" / "lake")
        env.update(overrides)
        return load_config(env)

    return make


@pytest.fixture
def cfg(make_cfg: Callable[..., Config]) -> Config:
    return make_cfg()



@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MB tmpfs: a real file system that fills up (ENOSPC). Needs root or CAP_SYS_ADMIN."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({(r.stderr or r.stdout).strip()}): needs root or CAP_SYS_ADMIN")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
