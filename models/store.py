"""Versioned model store on any fsspec filesystem (a local directory by default).

Layout under the store URI::

    <model>/versions/<version>/   files + meta.json (with a sha256 per file) + _COMPLETE
    <model>/staging/<tmp>/        a checkpoint being written (never loaded)
    <model>/current.json          {"version": ..., "history": [previous current versions]}

Publishing writes into staging, records checksums, marks ``_COMPLETE`` and then moves the
directory into ``versions/``. ``promote`` re-verifies every checksum before it rewrites
the pointer (write temp + rename), so a corrupt or half-written checkpoint can never
become ``current``. ``promote(..., expect=v)`` is a compare-and-set: it moves the pointer
only if it still names ``v`` (a publisher never overwrites an operator's rollback or a newer
model it did not start from); on a local store pointer changes hold a file lock, on a remote
one the check and the write are two requests. ``rollback`` points back at the previous
current version. Retention runs after every publish: it keeps the newest
``retention_versions`` and anything younger than ``retention_hours``, of the online
learner's checkpoints (``extra.online``) only the newest ``retention_online_versions``, and
never deletes the current version or the one a rollback would return to.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

META = "meta.json"
COMPLETE = "_COMPLETE"


class ModelStoreError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or an operation is not allowed."""


class PointerMoved(ModelStoreError):
    """A compare-and-set promotion found ``current`` no longer at the version it expected."""

    def __init__(self, model: str, expected: str | None, found: str | None):
        super().__init__(f"{model}: current is {found}, not {expected}: not promoted")
        self.expected, self.found = expected, found


class SchemaMismatch(ModelStoreError):
    """A checkpoint was trained on other feature columns than the ones this code serves."""


ANY = object()  # promote(expect=ANY): no compare-and-set


def require_schema(ck: "Checkpoint", serving_hash: str) -> "Checkpoint":
    """``ck`` if it was trained on the serving feature schema, else :class:`SchemaMismatch`: feature
    rows are positional, so a model of another schema would score every column as a different feature."""
    if ck.feature_schema_hash != serving_hash:
        raise SchemaMismatch(f"{ck.model}@{ck.version}: feature schema {ck.feature_schema_hash or '(none recorded)'} "
                             f"does not match the serving schema {serving_hash}: refused (retrain it on this schema)")
    return ck


@dataclass
class Checkpoint:
    model: str
    version: str
    created_at: float
    parent: str | None = None
    data_window: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    feature_schema_hash: str = ""
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_last_us = 0


def new_version() -> str:
    """Sortable and unique: <epoch microseconds, strictly increasing in-process>-<random>."""
    global _last_us
    _last_us = max(_last_us + 1, time.time_ns() // 1000)
    return f"{_last_us:016d}-{uuid.uuid4().hex[:6]}"


class ModelStore:
    def __init__(self, uri: str, retention_hours: float = 48.0, retention_versions: int = 50,
                 cache_dir: str | Path | None = None, retention_online_versions: int = 20):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.fs.makedirs(self.root, exist_ok=True)
        self.retention_s = retention_hours * 3600.0
        self.retention_versions = retention_versions
        self.retention_online_versions = retention_online_versions
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "feedrank-model-cache"

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelStore":
        ms = cfg.model_store
        return cls(cfg.resolve_uri(ms.uri), ms.retention_hours, ms.retention_versions, cfg.data_dir / "model-cache",
                   ms.retention_online_versions)

    @property
    def local(self) -> bool:
        """On this machine's filesystem (files are read in place; pointer changes can take a file lock)."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "file" in protocols or "local" in protocols

    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # ------------------------------------------------------------------ write
    def publish(self, model: str, files: dict[str, bytes | Path], *, parent: str | None = None,
                data_window: dict | None = None, metrics: dict | None = None, feature_schema_hash: str = "",
                extra: dict | None = None, promote: bool = False, expect: Any = ANY) -> Checkpoint:
        """Write a new version atomically, optionally make it current (only if the pointer is still at
        ``expect`` when that is given: else :class:`PointerMoved`, the version stays published), then apply
        retention."""
        if not files:
            raise ModelStoreError("a checkpoint needs at least one file")
        version = new_version()
        stage = self._p(model, "staging", f"{version}-{uuid.uuid4().hex[:6]}")
        self.fs.makedirs(stage, exist_ok=True)
        sums = {}
        for name, content in files.items():
            if "/" in name or name in (META, COMPLETE):
                raise ModelStoreError(f"invalid checkpoint file name {name!r}")
            data = content.read_bytes() if isinstance(content, Path) else content
            with self.fs.open(f"{stage}/{name}", "wb") as f:
                f.write(data)
            sums[name] = _sha256(data)
        ck = Checkpoint(model, version, time.time(), parent, data_window or {}, metrics or {}, feature_schema_hash,
                        sums, extra or {})
        with self.fs.open(f"{stage}/{META}", "w") as f:
            f.write(ck.to_json())
        with self.fs.open(f"{stage}/{COMPLETE}", "w") as f:
            f.write(version)
        self.fs.makedirs(self._p(model, "versions"), exist_ok=True)
        self.fs.mv(stage, self._p(model, "versions", version), recursive=True)
        try:
            if promote:
                self.promote(model, version, expect=expect)
        finally:
            self.apply_retention(model)
        return ck

    # ------------------------------------------------------------------ read
    def models(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(Path(p).name for p in self.fs.ls(self.root, detail=False) if self.fs.isdir(p))

    def versions(self, model: str) -> list[str]:
        d = self._p(model, "versions")
        if not self.fs.exists(d):
            return []
        return sorted(Path(p).name for p in self.fs.ls(d, detail=False))

    def meta(self, model: str, version: str) -> Checkpoint:
        path = self._p(model, "versions", version, META)
        try:
            with self.fs.open(path, "r") as f:
                return Checkpoint(**json.load(f))
        except FileNotFoundError:
            raise ModelStoreError(f"{model}@{version}: no such version") from None
        except (ValueError, TypeError) as e:
            raise ModelStoreError(f"{model}@{version}: unreadable metadata: {e}") from None

    def verify(self, model: str, version: str) -> Checkpoint:
        """Raise ModelStoreError unless the version is complete and every checksum matches."""
        ck = self.meta(model, version)
        base = self._p(model, "versions", version)
        if not self.fs.exists(f"{base}/{COMPLETE}"):
            raise ModelStoreError(f"{model}@{version}: incomplete (no {COMPLETE} marker)")
        for name, want in ck.files.items():
            try:
                with self.fs.open(f"{base}/{name}", "rb") as f:
                    got = _sha256(f.read())
            except FileNotFoundError:
                raise ModelStoreError(f"{model}@{version}: file {name} is missing") from None
            if got != want:
                raise ModelStoreError(f"{model}@{version}: file {name} is corrupt (sha256 mismatch)")
        return ck

    def pointer(self, model: str) -> dict:
        try:
            with self.fs.open(self._p(model, "current.json"), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return {"version": None, "history": []}

    def current(self, model: str) -> str | None:
        return self.pointer(model)["version"]

    def fetch(self, model: str, version: str | None = None) -> tuple[Checkpoint, Path]:
        """Verify a version (default: current) and return a local directory with its files."""
        version = version or self.current(model)
        if version is None:
            raise ModelStoreError(f"{model}: no current version (train and promote one first)")
        ck = self.verify(model, version)
        base = self._p(model, "versions", version)
        if self.local:
            return ck, Path(base)
        local = self.cache_dir / model / version
        if not (local / COMPLETE).exists():
            tmp = local.with_name(local.name + f".tmp{uuid.uuid4().hex[:6]}")
            self.fs.get(base, str(tmp), recursive=True)
            os.replace(tmp, local)
        return ck, local

    def copy_current(self, dst: "ModelStore", models: list[str] | None = None) -> dict[str, str]:
        """Copy each model's current version (files, metadata, version id) into ``dst`` and make it
        current there: experiments and benchmarks learn and promote in their own store, never in this one."""
        out = {}
        for model in models or self.models():
            version = self.current(model)
            if version is None:
                continue
            ck = self.verify(model, version)
            src = self._p(model, "versions", version)
            stage = dst._p(model, "staging", f"{version}-{uuid.uuid4().hex[:6]}")
            dst.fs.makedirs(stage, exist_ok=True)
            for name in [*ck.files, META, COMPLETE]:
                with self.fs.open(f"{src}/{name}", "rb") as f, dst.fs.open(f"{stage}/{name}", "wb") as g:
                    g.write(f.read())
            dst.fs.makedirs(dst._p(model, "versions"), exist_ok=True)
            if not dst.fs.exists(dst._p(model, "versions", version)):
                dst.fs.mv(stage, dst._p(model, "versions", version), recursive=True)
            else:
                dst.fs.rm(stage, recursive=True)
            dst.promote(model, version)
            out[model] = version
        return out

    # ------------------------------------------------------------------ pointer ops
    def _write_pointer(self, model: str, data: dict) -> None:
        path = self._p(model, "current.json")
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:6]}"
        with self.fs.open(tmp, "w") as f:
            f.write(json.dumps(data))
        self.fs.mv(tmp, path)  # rename: readers see the old or the new pointer, never half

    @contextlib.contextmanager
    def _pointer_lock(self, model: str):
        """Serialises pointer changes of one model between processes (local stores only)."""
        if not self.local:
            yield
            return
        self.fs.makedirs(self._p(model), exist_ok=True)
        with open(self._p(model, ".pointer.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def promote(self, model: str, version: str, expect: Any = ANY) -> Checkpoint:
        """Make ``version`` current; with ``expect``, only if current is still that version."""
        ck = self.verify(model, version)  # a corrupt checkpoint never becomes current
        with self._pointer_lock(model):
            ptr = self.pointer(model)
            if expect is not ANY and ptr["version"] != expect:
                raise PointerMoved(model, expect, ptr["version"])
            if ptr["version"] == version:
                return ck
            history = ([ptr["version"]] if ptr["version"] else []) + ptr["history"]
            self._write_pointer(model, {"version": version, "history": history[:100], "updated_at": time.time()})
        return ck

    def rollback(self, model: str, expect: Any = ANY) -> str:
        """Point `current` back at the previous current version that still verifies (with ``expect``: only
        if current is still that version)."""
        with self._pointer_lock(model):
            ptr = self.pointer(model)
            if expect is not ANY and ptr["version"] != expect:
                raise PointerMoved(model, expect, ptr["version"])
            history = list(ptr["history"])
            while history:
                prev = history.pop(0)
                try:
                    self.verify(model, prev)
                except ModelStoreError:
                    continue
                self._write_pointer(model, {"version": prev, "history": history, "updated_at": time.time(),
                                            "rolled_back_from": ptr["version"]})
                return prev
        raise ModelStoreError(f"{model}: nothing to roll back to")

    def apply_retention(self, model: str, now: float | None = None) -> list[str]:
        """Delete old versions; returns what was deleted."""
        now = time.time() if now is None else now
        ptr = self.pointer(model)
        protected = {ptr["version"], *(ptr["history"][:1])}
        versions = self.versions(model)
        keep_newest = set(versions[-self.retention_versions:])
        metas: dict[str, Checkpoint | None] = {}
        for v in versions:
            try:
                metas[v] = self.meta(model, v)
            except ModelStoreError:
                metas[v] = None  # unreadable (or deleted meanwhile): treat as old
        online = [v for v in versions if metas[v] is not None and metas[v].extra.get("online")]
        online_surplus = set(online[:-self.retention_online_versions])
        deleted = []
        for v in versions:
            if v in protected:
                continue
            created = metas[v].created_at if metas[v] is not None else 0.0
            if v in online_surplus or (v not in keep_newest and now - created > self.retention_s):
                self.fs.rm(self._p(model, "versions", v), recursive=True)
                deleted.append(v)
        # abandoned staging dirs older than an hour are debris from crashed writers
        stage = self._p(model, "staging")
        if self.fs.exists(stage):
            for p in self.fs.ls(stage, detail=False):
                try:
                    age = now - float(Path(p).name.split("-")[0]) / 1e6
                except ValueError:
                    age = float("inf")
                if age > 3600:
                    self.fs.rm(p, recursive=True)
        return deleted
