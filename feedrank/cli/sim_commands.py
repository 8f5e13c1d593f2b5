"""The simulated world: `sim generate`, `sim clients`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from feedrank.cli.common import sim_app, console, load_cfg, fail, progress_bars


@sim_app.command("generate")
def sim_generate(
    scale: str = typer.Option(None, help="small | medium | large (default: sim.scale)"),
    seed: int = typer.Option(None, help="Random seed (default: sim.seed). Same seed, same tables."),
    out: Path = typer.Option(None, help="Output directory (default: var/sim/<scale>-<seed>)"),
) -> None:
    """Generate a simulated world: users, posts, follows, impressions, engagements + ground truth."""
    from sim.generate import generate

    cfg = load_cfg()
    scale = scale or cfg.sim.scale
    seed = cfg.sim.seed if seed is None else seed
    out = out or cfg.data_dir / "sim" / f"{scale}-{seed}"
    with progress_bars() as prog:
        task = prog.add_task(f"generating {scale} world", total=1.0)
        try:
            meta = generate(cfg, scale, seed, out, progress=lambda stage, f: prog.update(task, completed=f, description=f"{scale}: {stage}"))
        except ValueError as e:
            fail(str(e))
    print(json.dumps({k: meta[k] for k in ("scale", "seed", "users", "posts", "follows", "impressions", "engagements", "seconds")}))
    console.print(f"written to {out}")


@sim_app.command("clients")
def sim_clients(
    world_dir: Path = typer.Option(None, "--world", help="World directory (default: var/sim/<sim.scale>-<sim.seed>)"),
    users: int = typer.Option(200, help="Simulated users"),
    duration: float = typer.Option(1800.0, help="Seconds to run (simulated seconds for --target local)"),
    target: str = typer.Option("grpc", help="grpc = the FeedService (`feedrank serve`); local = in-process V0 feed"),
    address: str = typer.Option("", help="FeedService host:port for --target grpc (default: serving.host:port)"),
    seed: int = typer.Option(0),
) -> None:
    """Run simulated users and creators against a feed API; events go to the event log.

    With --target grpc the clients run in real time against a server started with
    `feedrank serve --world` (whose clock continues from the end of the same world)."""
    from sim.clients import Population, SimClock, WallClock
    from sim.world import World

    cfg = load_cfg()
    world_dir = world_dir or cfg.data_dir / "sim" / f"{cfg.sim.scale}-{cfg.sim.seed}"
    if not (world_dir / "ground_truth.npz").exists():
        fail(f"no world at {world_dir}: run `feedrank sim generate` first")
    if target not in ("grpc", "local"):
        fail(f"--target must be grpc or local, got {target!r}")
    world = World.load(world_dir)
    pop = Population(world, cfg.clients, users, seed=seed, page_size=cfg.funnel.page_size,
                     repost_rate=cfg.sim.repost_rate, policy_flag_rate=cfg.sim.policy_flag_rate)
    if target == "local":
        from features.eventlog import open_configured_event_log
        from sim.chronological import ChronologicalFeed

        log = open_configured_event_log(cfg)
        api: Any = ChronologicalFeed(world, log)
        clock: Any = SimClock(world.end_ms)
    else:
        import grpc

        from runtime.serve import server_offset_ms
        from serving.client import GrpcFeedApi

        address = address or f"{cfg.serving.host}:{cfg.serving.port}"
        api = GrpcFeedApi(address, cfg.serving.jwt_secret)
        try:
            grpc.channel_ready_future(api.channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            fail(f"no FeedService at {address}: start it with `feedrank serve --world {world_dir}`")
        clock = WallClock(world.end_ms + server_offset_ms(cfg))
    with progress_bars() as prog:
        task = prog.add_task("simulated clients", total=duration)
        stats = pop.run(api, clock, duration, on_tick=lambda el, st: prog.update(task, completed=el / 1000.0))
    out = {"sessions": stats.sessions, "impressions": stats.impressions, "ctr": round(stats.ctr, 4),
           "actions": dict(stats.actions), "published": stats.published, "follows": stats.follows,
           "errors": stats.errors, "utility": round(stats.utility, 2), "sources": dict(stats.sources)}
    if target == "local":
        log.close()
        out["event_log"] = log.uri
    else:
        out["grpc"] = api.stats()
        api.close()
    print(json.dumps(out))


@sim_app.command("seed-lake")
def sim_seed_lake(
    data: Path = typer.Option(None, help="Simulated world directory (default: var/sim/<scale>-<seed>)"),
    days: float = typer.Option(0.0, help="Only the last this many days of the history (0: all of it)"),
) -> None:
    """Write the world's logged history into the lake (lake.uri) in the lake job's format, with each request's
    feature rows computed point in time by the current two-tower: the batch tier can run before serving has."""
    from feedrank.cli.common import StageProgress, resolve_world
    from lab.lake_seed import seed_lake

    cfg = load_cfg()
    d = resolve_world(cfg, data)
    try:
        with progress_bars() as prog:
            res = seed_lake(cfg, d, days=days or None, progress=StageProgress(prog))
    except (FileNotFoundError, KeyError) as e:
        fail(f"cannot seed the lake from {d}: {e} (feedrank sim generate, then feedrank train two-tower)")
    print(json.dumps(res))
