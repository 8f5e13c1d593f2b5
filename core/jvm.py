"""The JVM artifacts feedrank runs: declared in ``core/jvm/pom.xml``, fetched from Maven Central.

``make jvm`` (a step of ``make test`` and ``make demo``) and, on first use, :func:`ensure` run
``mvn package`` on that pom, which copies the jars through the local ``~/.m2`` cache into
``jvm.dir`` (``kafka/``: the broker and its tools; ``flink/``: jars added to Flink jobs). A stamp
file records the pom it was fetched for, so a second call downloads nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from core.config import PROJECT_ROOT, Config
from core.services import ServiceError

POM = PROJECT_ROOT / "core" / "jvm" / "pom.xml"
STAMP = ".fetched"


class JvmArtifactsMissing(ServiceError):
    """The JVM artifacts are not fetched and cannot be (no Maven, no network)."""


def jvm_dir(cfg: Config) -> Path:
    return cfg.path(cfg.jvm.dir)


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def fetched(cfg: Config) -> bool:
    stamp = jvm_dir(cfg) / STAMP
    return stamp.is_file() and stamp.read_text().strip() == _pom_digest()


def ensure(cfg: Config) -> Path:
    """Fetch the artifacts unless the stamp says this pom's are there; returns ``jvm.dir``."""
    out = jvm_dir(cfg)
    if fetched(cfg):
        return out
    mvn = shutil.which(cfg.jvm.maven)
    if not mvn:
        raise JvmArtifactsMissing("feedrank fetches its JVM artifacts (Kafka, Flink connectors) with Maven and no "
                                  f"`{cfg.jvm.maven}` was found: apt-get install -y maven")
    for sub in ("kafka", "flink"):  # a changed pom must not leave old versions beside the new ones
        shutil.rmtree(out / sub, ignore_errors=True)
    r = subprocess.run([mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(POM), "package", f"-Djvm.out={out}"], capture_output=True,
                       text=True)
    if r.returncode != 0:
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-8:])
        raise JvmArtifactsMissing(f"mvn could not fetch the JVM artifacts of {POM}: {tail}")
    (out / STAMP).write_text(_pom_digest() + "\n")
    return out


def classpath(cfg: Config, group: str) -> str:
    """``<jvm.dir>/<group>/*`` (a JVM classpath wildcard), fetching first if needed."""
    d = ensure(cfg) / group
    if not any(d.glob("*.jar")):
        raise JvmArtifactsMissing(f"no jars in {d}: run `make jvm`")
    return str(d / "*")


def jar(cfg: Config, prefix: str) -> Path:
    """The one fetched Flink-side jar whose name starts with ``prefix``."""
    found = sorted((ensure(cfg) / "flink").glob(f"{prefix}-[0-9]*.jar"))
    if not found:
        raise JvmArtifactsMissing(f"no {prefix} jar in {jvm_dir(cfg) / 'flink'}: is it declared in {POM}?")
    return found[-1]
