"""Models: `train`, `eval`, the model store (`models list|promote|rollback|retention`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from feedrank.cli.common import app, models_app, console, load_cfg, fail, progress_bars, resolve_world, StageProgress


@app.command()
def train(
    what: str = typer.Argument("all", help="two-tower | light | heavy | all"),
    data: Optional[Path] = typer.Option(None, help="Simulated world directory (default: var/sim/<scale>-<seed>)"),
    heavy_rows: Optional[int] = typer.Option(None, help="Training impressions sampled for the rankers (default: training.heavy_rows)"),
    epochs: Optional[int] = typer.Option(None, help="Two-tower epochs (default: training.two_tower_epochs)"),
    from_lake: bool = typer.Option(False, "--from-lake", help="train on the served-data lake instead of the simulator: "
                                   "light | heavy on a training set (feedrank batch run training-set), the two-tower "
                                   "on the window's exposures, engagements, posts and follows"),
    window: str = typer.Option("7d", help="--from-lake: days of exposures ending with --date"),
    date: Optional[str] = typer.Option(None, help="--from-lake: the window's last day (UTC, YYYY-MM-DD; default yesterday)"),
    workers: int = typer.Option(1, help="--from-lake: Beam DirectRunner processes for the training set (see README)"),
    shadow: bool = typer.Option(False, "--shadow", help="--from-lake: publish the heavy ranker without promoting it "
                                "and shadow-score it (feedrank models shadow status decides)"),
) -> None:
    """Train models on the simulator's logs (time-based split), or with --from-lake on what serving logged,
    and publish + promote them."""
    import torch

    from models.train import train_all

    if what not in ("two-tower", "light", "heavy", "all"):
        fail(f"unknown model {what!r}: two-tower | light | heavy | all")
    cfg = load_cfg()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if from_lake:
        from feedrank.cli.batch_commands import lake_date, window_days
        from jobs.training_set import IncompleteRun, run as build_training_set
        from models.lake_training import LakeTrainingError, train_from_lake

        d, n = lake_date(date), window_days(window)
        out: dict = {}
        if what in ("two-tower", "all"):
            from models.lake_training import train_two_tower_from_lake

            console.print(f"two-tower on the lake's {n} day(s) ending {d} …")
            try:
                with progress_bars() as prog:
                    out.update(train_two_tower_from_lake(cfg, d, n, epochs=epochs, progress=StageProgress(prog)))
            except (LakeTrainingError, ValueError) as e:
                fail(str(e))
            if what == "two-tower":
                print(json.dumps(out, default=str))
                return
        console.print(f"building the training set of {n} day(s) ending {d} from {cfg.lake.uri} (Apache Beam) …")
        try:
            meta = build_training_set(cfg, d, n, workers=workers)
        except IncompleteRun as e:
            fail(str(e))
        console.print(f"  {meta['counts']['exposures']} exposures -> {meta['splits']['train']['rows']} train / "
                      f"{meta['splits']['validation']['rows']} validation rows in {meta['seconds']} s")
        from features.lake import training_set_dir

        try:
            with progress_bars() as prog:
                out.update(train_from_lake(cfg, "both" if what == "all" else what, training_set_dir(cfg, d, n),
                                           progress=StageProgress(prog), promote_heavy=not shadow))
        except LakeTrainingError as e:
            fail(str(e))
        if shadow and "heavy" in out:
            from models.shadow import start as shadow_start
            from models.store import ModelStore

            out["shadow"] = shadow_start(cfg, ModelStore.from_config(cfg), out["heavy"]["version"])
        print(json.dumps(out, default=str))
        return
    d = resolve_world(cfg, data)
    with progress_bars() as prog:
        out = train_all(cfg, str(d), what, tt_epochs=epochs, heavy_rows=heavy_rows, progress=StageProgress(prog))
    print(json.dumps({k: v for k, v in out.items() if k not in ("trained", "data")}, default=str))


@app.command("eval")
def eval_(
    what: str = typer.Argument("models", help="models (offline model evaluation) | experiments (feed variants)"),
    dataset: str = typer.Option("sim", help="models: sim | ml-100k"),
    json_out: Path = typer.Option(None, "--json", help="Metrics JSON path (report.md and PNGs go beside it)"),
    data: Optional[Path] = typer.Option(None, help="Simulated world directory"),
    users: int = typer.Option(300, help="experiments: simulated users"),
    minutes: float = typer.Option(60.0, help="experiments: simulated minutes per variant"),
    only: str = typer.Option("variants,position_bias,trend_shift,lake_retraining", help="experiments: which comparisons"),
    trend_minutes: float = typer.Option(40.0, help="experiments: simulated minutes per trend-shift arm"),
    speed: float = typer.Option(8.0, help="experiments: trend shift runs this many times faster than real time"),
) -> None:
    """Offline evaluation (trains on the time split), or `eval experiments`: feed variants (V0 chronological,
    V1 follow graph + rankers, V2 full funnel, ablations) on the simulator's ground truth."""
    from datetime import datetime, timezone

    from core.config import PROJECT_ROOT

    cfg = load_cfg()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if what == "experiments":
        from lab.bench import scratch_removed_on_success
        from lab.experiments import run_experiments

        d = resolve_world(cfg, data)
        from lab.experiments import PARTS

        parts = tuple(p.strip() for p in only.split(",") if p.strip())
        if not parts or set(parts) - set(PARTS):
            fail(f"--only takes a comma-separated subset of {', '.join(PARTS)}")
        json_out = json_out or PROJECT_ROOT / "reports" / f"experiments-{stamp}" / "experiments.json"
        with progress_bars() as prog, scratch_removed_on_success():
            res = run_experiments(cfg, d, json_out, users=users, minutes=minutes, progress=StageProgress(prog),
                                  parts=parts, trend_minutes=trend_minutes, speed=speed)
        shown = ("utility_total", "utility_per_examined", "ctr", "ndcg@20_vs_true_utility")
        print(json.dumps({"checks": res["checks"], "wall_seconds": res["wall_seconds"],
                          **{n: {k: r[k] for k in shown} for n, r in res.get("variants", {}).items()}}))
        console.print(f"report: {json_out.parent / 'report.md'}")
        return
    if what != "models":
        fail("eval what: models or experiments")
    json_out = json_out or PROJECT_ROOT / "reports" / f"eval-{dataset}-{stamp}" / "metrics.json"
    if dataset == "sim":
        from models.evaluate import evaluate_sim
        from sim.world import World

        d = resolve_world(cfg, data)
        with progress_bars() as prog:
            res = evaluate_sim(cfg, str(d), json_out, World.load(d), progress=StageProgress(prog))
        summary = {"retrieval_recall@8000": res["retrieval"]["two_tower"].get(8000), "ndcg": res["ndcg"],
                   "click_auc": res["heads"]["heavy"]["auc"]["click"],
                   "click_auc_observed": res["heads"]["heavy"]["auc_observed"]["click"],
                   "position_bias_max_rel_error": res["position_bias"]["max_rel_error_pos1_10"]}
    elif dataset == "ml-100k":
        from models.evaluate import write_ml100k_report
        from models.movielens import evaluate as ml_eval

        with progress_bars() as prog:
            stage = StageProgress(prog)
            res = ml_eval(cfg.data_dir / "cache", progress=lambda f: stage("two-tower (ml-100k)", f))
        write_ml100k_report(res, json_out)
        summary = {k: res[k] for k in ("popularity", "bpr_mf", "two_tower")}
    else:
        fail("dataset must be sim or ml-100k")
    print(json.dumps(summary))
    console.print(f"report: {json_out.parent / 'report.md'}")


@models_app.command("list")
def models_list(model: Optional[str] = typer.Argument(None),
                as_json: bool = typer.Option(False, "--json", help="One JSON object per version instead of a table")) -> None:
    """Versions per model, with the current one marked (version ids are never cut)."""
    from datetime import datetime

    from models.store import ModelStore

    store = ModelStore.from_config(load_cfg())
    rows: list[dict[str, Any]] = []
    for m in [model] if model else store.models():
        cur = store.current(m)
        for v in store.versions(m):
            try:
                ck = store.meta(m, v)
            except Exception as e:  # noqa: BLE001 - show unreadable versions rather than hide them
                rows.append({"model": m, "version": v, "current": v == cur, "error": str(e)})
                continue
            rows.append({"model": m, "version": v, "current": v == cur,
                         "created": datetime.fromtimestamp(ck.created_at).strftime("%Y-%m-%d %H:%M:%S"),
                         "parent": ck.parent or "",
                         "metrics": {k: x for k, x in ck.metrics.items() if not isinstance(x, (list, dict))}})
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    t = Table("model", "version", "current", "created", "parent", "metrics")
    for r in rows:
        t.add_row(r["model"], r["version"], "*" if r["current"] else "", r.get("created", ""), r.get("parent", ""),
                  f"[red]{r['error']}[/red]" if "error" in r else json.dumps(r["metrics"])[:60])
    for col in t.columns[:2] + t.columns[4:5]:
        col.no_wrap = True  # ids stay whole: a narrow terminal cuts the metrics column instead
    Console(width=max(Console().width, 160)).print(t)


@models_app.command("promote")
def models_promote(model: str, version: str) -> None:
    """Make VERSION current (after verifying every checksum)."""
    from models.store import ModelStore, ModelStoreError

    try:
        ModelStore.from_config(load_cfg()).promote(model, version)
    except ModelStoreError as e:
        fail(str(e))
    console.print(f"{model}: current = {version}")


@models_app.command("rollback")
def models_rollback(model: str) -> None:
    """Point current back at the previous current version."""
    from models.store import ModelStore, ModelStoreError

    try:
        v = ModelStore.from_config(load_cfg()).rollback(model)
    except ModelStoreError as e:
        fail(str(e))
    console.print(f"{model}: rolled back to {v}")


@models_app.command("retention")
def models_retention(model: str) -> None:
    """Delete versions outside the retention policy (model_store.retention_*)."""
    from models.store import ModelStore

    deleted = ModelStore.from_config(load_cfg()).apply_retention(model)
    console.print(f"{model}: deleted {len(deleted)} versions")


shadow_app = typer.Typer(help="Shadow scoring of a heavy candidate before promotion (models.shadow).", no_args_is_help=True)
models_app.add_typer(shadow_app, name="shadow")


@shadow_app.command("start")
def shadow_start_cmd(version: str = typer.Argument(..., help="A heavy version in the store (feedrank models list)")) -> None:
    """Score every served HOME page with VERSION too, beside the serving model; nothing served changes."""
    from models.shadow import ShadowError, start
    from models.store import ModelStore

    cfg = load_cfg()
    try:
        print(json.dumps(start(cfg, ModelStore.from_config(cfg), version)))
    except ShadowError as e:
        fail(str(e))


@shadow_app.command("status")
def shadow_status_cmd(decide: bool = typer.Option(True, "--decide/--no-decide", help="Once shadow.window_s has "
                                                   "passed, promote or reject the candidate (and stop shadowing)")) -> None:
    """The candidate vs the serving model on the pages both scored (AUC per head, NDCG), and the decision."""
    from models.shadow import ShadowError, status
    from models.store import ModelStore

    cfg = load_cfg()
    try:
        print(json.dumps(status(cfg, ModelStore.from_config(cfg), decide=decide), default=str))
    except ShadowError as e:
        fail(str(e))


@shadow_app.command("stop")
def shadow_stop_cmd() -> None:
    """Stop shadow scoring without a decision."""
    from models.shadow import stop

    was = stop(load_cfg())
    if was is None:
        fail("no shadow is running")
    print(json.dumps({"stopped": was}))
