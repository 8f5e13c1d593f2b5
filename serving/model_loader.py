"""Models in serving, hot-reloaded from the model store without dropping a request.

A poller reads the store's ``current`` pointers every ``model_store.poll_interval_s``;
when one moves it loads the new checkpoint *beside* the live one and swaps a single
reference, so a request in flight finishes on the models it started with. If the store
cannot be read the last good models keep serving and responses say so (degraded). New
posts' embeddings arrive through the index delta stream and are added to the live FAISS
index and the catalog.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from core.config import Config

log = logging.getLogger("feedrank.serving.model_loader")


@dataclass(frozen=True)
class Models:
    light: Any
    light_version: str
    heavy: Any                 # TorchScript ServingHeavy (final layer from the online learner applied)
    heavy_version: str
    towers: Any                # NumpyTowers (user tower for users without a Feast embedding)
    two_tower_version: str
    index: Any                 # RetrievalIndex
    retrieval_version: str

    def user_embedding(self, ctx: Any) -> np.ndarray:
        return user_embedding(self.towers, ctx)

    def versions(self) -> dict[str, str]:
        return {"light": self.light_version, "heavy": self.heavy_version, "two_tower": self.two_tower_version,
                "retrieval": self.retrieval_version}


def user_embedding(towers: Any, ctx: Any) -> np.ndarray:
    """The user tower's embedding of a :class:`~serving.components.UserContext` (Feast rows + follows)."""
    from models.towers import author_bucket

    nn_, nc = ctx.negatives, ctx.clicks
    dense = np.hstack([ctx.topic_clicks, ctx.topic_negative, ctx.ctype_clicks,
                       [nn_ / max(nn_ + nc, 1), np.log1p(nc) / 8.0]]).astype(np.float32)[None, :]
    f = ctx.following
    ids = author_bucket(f) if f.size else np.zeros(1, dtype=np.int64)
    return towers.user(dense, ids, np.zeros(1, dtype=np.int64))[0]


def score_heavy(model: Any, x: np.ndarray) -> np.ndarray:
    """P(head | examined) [n, 6] in one batched forward pass."""
    import torch

    with torch.inference_mode():
        p, _ = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return p.numpy()


class _DeltaSink:
    """Index-delta target: the live FAISS index (under the index lock) and the catalog's embeddings."""

    def __init__(self, loader: "ModelLoader"):
        self.loader = loader

    def remove(self, ids: np.ndarray) -> int:
        with self.loader.index_lock:
            return self.loader.models.index.remove(ids)

    def add(self, ids: np.ndarray, emb: np.ndarray, day: np.ndarray) -> None:
        with self.loader.index_lock:
            self.loader.models.index.add(ids, emb, day)
        self.loader.state.catalog.set_embeddings(ids, emb)


class ModelLoader:
    def __init__(self, cfg: Config, state: Any):
        from models.store import ModelStore

        self.cfg, self.state = cfg, state
        self.store = ModelStore.from_config(cfg)
        self.models: Models | None = None
        self.index_lock = threading.Lock()
        self.store_ok = True
        self.reloads = 0
        self._pinned: OrderedDict[str, Any] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.delta: Any = None
        self.shadow_version: str | None = None  # a heavy candidate every HOME page is also scored by
        self.refused: dict[str, dict[str, str]] = {}  # model -> version -> why (feature schema): never retried

    # ------------------------------------------------------------------ loading
    def _load_light(self, version: str | None = None) -> tuple[Any, str]:
        from models.rankers import LightRanker

        from core.schema import LIGHT_SCHEMA_HASH
        from models.store import require_schema

        ck, path = self.store.fetch("light", version)
        require_schema(ck, LIGHT_SCHEMA_HASH)
        return LightRanker.from_bytes((path / "light.npz").read_bytes()), ck.version

    def _load_retrieval(self, version: str | None = None) -> tuple[Any, str, np.ndarray]:
        from models.train import load_retrieval

        index, v = load_retrieval(self.store, version)
        index.set_nprobe(self.cfg.retrieval.nprobe)
        _, path = self.store.fetch("retrieval", v)
        emb = np.load(path / "post_emb.npy").astype(np.float32)
        return index, v, emb

    def load(self) -> Models:
        """Load every current model (start-up): fails with the reason when one is missing."""
        from models.rankers import load_heavy_serving
        from models.train import load_numpy_towers

        light, lv = self._load_light()
        heavy, hv = load_heavy_serving(self.store)
        towers = load_numpy_towers(self.store)
        tv = self.store.current("two_tower") or ""
        index, rv, emb = self._load_retrieval()
        self.state.catalog.set_embeddings(np.arange(emb.shape[0]), emb)
        self.models = Models(light, lv, heavy, hv, towers, tv, index, rv)
        self.state.models = self.models
        self._start_delta(rv)
        return self.models

    def _start_delta(self, version: str) -> None:
        from features.change_streams import IndexDeltaFollower

        self.delta = IndexDeltaFollower(self.cfg, _DeltaSink(self), version)

    def poll(self) -> list[str]:
        """Reload what moved; returns the models reloaded."""
        from models.rankers import load_heavy_serving
        from models.store import SchemaMismatch
        from models.train import load_numpy_towers

        m = self.models
        assert m is not None
        changed: list[str] = []
        try:
            cur = {name: self.store.current(name) for name in ("light", "heavy", "two_tower", "retrieval")}
            missing = [name for name, v in cur.items() if v is None]
            if missing:  # we serve these models, so the store has them: it is unreachable or damaged
                raise RuntimeError(f"no current version readable for {missing}")
            new = m
            if self._wanted("light", cur["light"], m.light_version):
                try:
                    light, lv = self._load_light(cur["light"])
                    new = replace(new, light=light, light_version=lv)
                    changed.append("light")
                except SchemaMismatch as e:
                    self._refuse("light", cur["light"], e)
            if self._wanted("heavy", cur["heavy"], m.heavy_version):
                try:
                    heavy, hv = load_heavy_serving(self.store, cur["heavy"])
                    new = replace(new, heavy=heavy, heavy_version=hv)
                    changed.append("heavy")
                except SchemaMismatch as e:
                    self._refuse("heavy", cur["heavy"], e)
            if cur["two_tower"] and cur["two_tower"] != m.two_tower_version:
                new = replace(new, towers=load_numpy_towers(self.store, cur["two_tower"]), two_tower_version=cur["two_tower"])
                changed.append("two_tower")
            if cur["retrieval"] and cur["retrieval"] != m.retrieval_version:
                index, rv, emb = self._load_retrieval(cur["retrieval"])
                self.state.catalog.set_embeddings(np.arange(emb.shape[0]), emb)
                new = replace(new, index=index, retrieval_version=rv)
                changed.append("retrieval")
            self.store_ok = True
        except Exception as e:  # noqa: BLE001 - keep the last good models
            if self.store_ok:
                log.warning("model store unavailable, serving the last good models: %s", e)
            self.store_ok = False
            return []
        if changed:
            with self.index_lock:
                self.models = new
                self.state.models = new
            if "retrieval" in changed:
                self._start_delta(new.retrieval_version)
            self.reloads += 1
            log.info("hot reload: %s -> %s", changed, new.versions())
        return changed

    def _wanted(self, model: str, current: str | None, live: str) -> bool:
        return bool(current) and current != live and current not in self.refused.get(model, {})

    def _refuse(self, model: str, version: str, e: Exception) -> None:
        """The store's current version cannot serve here: the live one keeps serving (said once per version,
        counted in ``feedrank_models_refused``)."""
        self.refused.setdefault(model, {})[version] = str(e)
        log.error("%s; %s %s keeps serving", e, model, getattr(self.models, f"{model}_version"))

    def poll_shadow(self) -> str | None:
        """The shadow candidate named in Redis (models.shadow), loaded beside the live model; None if none or
        it cannot be loaded (said once)."""
        from models.shadow import SHADOW_KEY

        try:
            raw = self.state.redis.run(lambda r: r.hget(SHADOW_KEY, "version"))
            version = raw.decode() if raw else None
            if version is not None and version != self.shadow_version:
                self.heavy_for(version)  # load it now, off the request path
                log.info("shadow scoring with heavy %s", version)
        except Exception as e:  # noqa: BLE001 - shadowing never affects serving
            if self.shadow_version is not None:
                log.warning("shadow scoring stopped: %s", e)
            version = None
        self.shadow_version = version
        return version

    def poll_delta(self) -> int:
        try:
            return self.delta.poll(block_ms=None) if self.delta else 0
        except Exception as e:  # noqa: BLE001
            log.debug("index delta unavailable: %s", e)
            return 0

    def heavy_for(self, version: str) -> Any:
        """A pinned heavy version (experiments); a small LRU of loaded versions."""
        from models.rankers import load_heavy_serving

        if self.models and version == self.models.heavy_version:
            return self.models.heavy
        if version not in self._pinned:
            self._pinned[version] = load_heavy_serving(self.store, version)[0]
            while len(self._pinned) > 4:
                self._pinned.popitem(last=False)
        self._pinned.move_to_end(version)
        return self._pinned[version]

    def search(self, user_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self.index_lock:
            return self.models.index.search(user_emb[None, :], k)

    # ------------------------------------------------------------------ background
    def start(self) -> "ModelLoader":
        def loop() -> None:
            tick = 0.0
            while not self._stop.wait(0.2):
                self.poll_delta()
                tick += 0.2
                if tick >= self.cfg.model_store.poll_interval_s:
                    tick = 0.0
                    self.poll()
                    self.poll_shadow()

        self._thread = threading.Thread(target=loop, name="model-loader", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=3)
