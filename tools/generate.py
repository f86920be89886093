"""Generate a cooperative-perception dataset with the embedded simulator or a CARLA server.

Writes the native layout (OPV2V's): ``OUT/<split>/<run>/<cav_id>/<frame:06d>.pcd`` and ``.yaml``
for every connected vehicle, a sidecar ``.npz`` with per-point labels and visibility, and
``OUT/<split>/<run>/manifest.yaml``. Every file is written atomically and a frame counts once its
yaml exists, so an interrupted run is resumed by running the same command again.

Example:
    python tools/generate.py --scenario left_turn --frames 100 --seed 0 --out data/sim --cavs 3
    python tools/generate.py --backend carla --port 2000 --scenario merge --frames 100 --out data/carla
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tqdm import tqdm

from datasets.native import (
    Manifest,
    counts_of_scene_frame,
    lidar_dict,
    start_run,
    write_manifest,
    write_scene_frame,
)
from sim.carla_world import CarlaError, make_carla_world
from sim.lidar import LIDAR_PRESETS
from sim.scenarios import SCENARIOS
from sim.world import make_world


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", required=True, help=f"one of: {', '.join(SCENARIOS)}")
    parser.add_argument("--frames", type=int, required=True, help="frames to write (10 per simulated second)")
    parser.add_argument("--seed", type=int, default=0, help="scenario seed; same seed, same bytes")
    parser.add_argument("--out", type=Path, required=True, help="dataset root")
    parser.add_argument("--cavs", type=int, default=None, help="connected vehicles (default: the scenario's)")
    parser.add_argument("--split", default="train", help="split folder (train, validate, test)")
    parser.add_argument("--lidar", default="hdl64", help=f"LiDAR preset: {', '.join(LIDAR_PRESETS)}")
    parser.add_argument(
        "--traffic-density", type=float, default=1.0, help="background vehicles per 100 m of lane"
    )
    parser.add_argument("--run-name", default=None, help="run folder name (default: <scenario>_s<seed:06d>)")
    parser.add_argument("--backend", choices=("embedded", "carla"), default="embedded", help="simulator")
    parser.add_argument("--host", default="127.0.0.1", help="CARLA server host (--backend carla)")
    parser.add_argument("--port", type=int, default=2000, help="CARLA server port (--backend carla)")
    parser.add_argument("--timeout", type=float, default=10.0, help="CARLA timeout, seconds (--backend carla)")
    # testing hook: the module imported as `carla` (the test suite passes its recorded stand-in)
    parser.add_argument("--carla-module", default="carla", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scenario not in SCENARIOS:
        parser.error(f"unknown scenario {args.scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
    if args.lidar not in LIDAR_PRESETS:
        parser.error(f"unknown LiDAR preset {args.lidar!r}; valid presets: {', '.join(LIDAR_PRESETS)}")
    if args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_name = args.run_name or f"{args.scenario}_s{args.seed:06d}"
    params = {"cavs": args.cavs, "traffic_density": args.traffic_density}
    try:
        if args.backend == "carla":
            world = make_carla_world(
                args.scenario, lidar=args.lidar, host=args.host, port=args.port, timeout_s=args.timeout,
                carla_module=args.carla_module, **params,
            )
        else:
            world = make_world(args.scenario, lidar=args.lidar, **params)
        frame = world.reset(args.seed)  # a CarlaWorld that fails here has already closed itself
    except (ValueError, CarlaError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _write(args, run_name, world, frame)
    finally:
        world.close()  # CARLA: actors destroyed and server settings restored, also on Ctrl-C


def _write(args: argparse.Namespace, run_name: str, world, frame) -> int:
    manifest = Manifest(
        scenario=args.scenario,
        seed=args.seed,
        frames=args.frames,
        cavs=frame.connected_ids,
        lidar=lidar_dict(world.lidar),
        dt=world.dt,
        params={**dataclasses.asdict(world.params), "backend": args.backend},
    )
    try:
        manifest, done = start_run(args.out, args.split, run_name, manifest)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    done_set = set(done)
    if done_set:
        print(f"resuming {run_name}: {len(done_set)} of {args.frames} frames already complete")
    bar = tqdm(range(args.frames), desc=run_name, unit="frame")
    for index in bar:
        if index > 0:
            # frames already on disk are simulated again (the World is deterministic) but not sensed
            world.sensors_enabled = index not in done_set
            frame = world.step()
        if index in done_set:
            continue
        write_scene_frame(args.out, args.split, run_name, frame)
        manifest.counts.add(counts_of_scene_frame(frame))
        write_manifest(Path(args.out) / args.split / run_name, manifest)
        if frame.collisions:
            bar.write(f"frame {index}: collision between {frame.collisions}")
    counts = manifest.counts
    print(
        f"{run_name}: {counts.frames_written} frames, {len(manifest.cavs)} connected vehicles, "
        f"{counts.points} points, boxes {counts.boxes} -> {Path(args.out) / args.split / run_name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
