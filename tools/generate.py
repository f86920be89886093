"""Generate a cooperative-perception dataset with the embedded simulator or a CARLA server.

Writes the native layout (OPV2V's): ``OUT/<split>/<run>/<cav_id>/<frame:06d>.pcd`` and ``.yaml``
for every connected vehicle, a sidecar ``.npz`` with per-point labels and visibility, and
``OUT/<split>/<run>/manifest.yaml``. Every file is written atomically and a frame counts once its
yaml exists, so an interrupted run is resumed by running the same command again.

One call writes one run per scenario and seed: ``--scenario`` may be repeated (or ``all``) and
``--seeds`` takes a list or range (``0-9``, ``0,3,5``, ``0-4,10``); the runs are the product.
``--workers N`` spreads the runs over N Ray workers (a local cluster, or ``--ray-address`` for an
existing one); the World is deterministic per seed, so the files are the same bytes as a serial
run's. A run that fails is retried (and resumes where it stopped); the retry is reported.

Example:
    python tools/generate.py --scenario left_turn --frames 100 --seed 0 --out data/sim --cavs 3
    python tools/generate.py --scenario all --seeds 0-9 --frames 100 --out data/sim --workers 4
    python tools/generate.py --backend carla --port 2000 --scenario merge --frames 100 --out data/carla
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
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
from sim.workers import Job, JobFailed, exit_status_of, run_jobs
from sim.world import make_world

# errors of the settings (a retry would fail the same way): reported with exit status 2
_SETTINGS_ERRORS = (ValueError, CarlaError, ImportError)


@dataclass(frozen=True)
class RunSpec:
    """One run to write: everything :func:`generate_run` needs, picklable for a Ray worker."""

    scenario: str
    seed: int
    frames: int
    out: Path
    split: str
    run_name: str
    lidar: str
    cavs: int | None
    traffic_density: float
    backend: str = "embedded"
    host: str = "127.0.0.1"
    port: int = 2000
    timeout_s: float = 10.0
    carla_module: str = "carla"
    show_frames: bool = False
    """a progress bar over frames (serial runs only)"""


@dataclass(frozen=True)
class RunSummary:
    """What :func:`generate_run` did, for the summary line the driver prints."""

    run_name: str
    path: Path
    frames_written: int
    already_complete: int
    """frames found complete on disk at the start (a resumed run)"""
    cavs: int
    points: int
    boxes: dict[str, int]
    collisions: tuple[str, ...]
    """one line per frame with a collision"""

    def line(self) -> str:
        return (
            f"{self.run_name}: {self.frames_written} frames, {self.cavs} connected vehicles, "
            f"{self.points} points, boxes {self.boxes} -> {self.path}"
        )


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]`` (ranges inclusive, order kept, repeats dropped)."""
    seeds: list[int] = []
    for part in text.split(","):
        try:
            if "-" in part:
                first, last = part.split("-", 1)  # "-3" (a negative seed) fails int("")
                lo, hi = int(first), int(last)
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad seed list {text!r}: use seeds >= 0 and ranges, like 0-9,12"
            ) from None
    return list(dict.fromkeys(seeds))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenario",
        action="append",
        required=True,
        help=f"one of: {', '.join(SCENARIOS)}, or all (repeat for several)",
    )
    parser.add_argument("--frames", type=int, required=True, help="frames to write (10 per simulated second)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed", type=int, default=None, help="scenario seed (default 0); same seed, same bytes"
    )
    seeds.add_argument("--seeds", type=parse_seeds, default=None, help="several seeds: 0-9, 0,3,5 or 0-4,10")
    parser.add_argument("--out", type=Path, required=True, help="dataset root")
    parser.add_argument("--cavs", type=int, default=None, help="connected vehicles (default: the scenario's)")
    parser.add_argument("--split", default="train", help="split folder (train, validate, test)")
    parser.add_argument("--lidar", default="hdl64", help=f"LiDAR preset: {', '.join(LIDAR_PRESETS)}")
    parser.add_argument(
        "--traffic-density", type=float, default=1.0, help="background vehicles per 100 m of lane"
    )
    parser.add_argument(
        "--run-name", default=None, help="run folder name, one run only (default: <scenario>_s<seed:06d>)"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="Ray workers (0: serial in this process; N: N Ray workers)"
    )
    parser.add_argument(
        "--ray-address", default=None, help="an existing Ray cluster (with --workers N: N runs at a time)"
    )
    parser.add_argument("--max-retries", type=int, default=2, help="further attempts of a failed run")
    parser.add_argument("--backend", choices=("embedded", "carla"), default="embedded", help="simulator")
    parser.add_argument("--host", default="127.0.0.1", help="CARLA server host (--backend carla)")
    parser.add_argument("--port", type=int, default=2000, help="CARLA server port (--backend carla)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="CARLA timeout, seconds (--backend carla)"
    )
    # testing hook: the module imported as `carla` (the test suite passes its recorded stand-in)
    parser.add_argument("--carla-module", default="carla", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    scenarios: list[str] = []
    for name in args.scenario:
        if name == "all":
            scenarios.extend(SCENARIOS)
        elif name in SCENARIOS:
            scenarios.append(name)
        else:
            parser.error(f"unknown scenario {name!r}; valid scenarios: {', '.join(SCENARIOS)}, all")
    args.scenarios = list(dict.fromkeys(scenarios))
    args.seed_list = args.seeds if args.seeds is not None else [0 if args.seed is None else args.seed]
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.lidar not in LIDAR_PRESETS:
        parser.error(f"unknown LiDAR preset {args.lidar!r}; valid presets: {', '.join(LIDAR_PRESETS)}")
    if args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")
    if args.run_name is not None and len(args.scenarios) * len(args.seed_list) != 1:
        parser.error("--run-name names a single run; leave it out with several scenarios or seeds")
    if args.workers < 0 or args.max_retries < 0:
        parser.error("--workers and --max-retries must be >= 0")
    if args.ray_address is not None and args.workers < 1:
        parser.error("--ray-address needs --workers N >= 1 (how many runs at a time)")
    if args.backend == "carla" and (args.workers > 0 or args.ray_address is not None):
        parser.error(
            "a CARLA server runs one world at a time: --backend carla runs serially, without --workers"
        )
    return args


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """One :class:`RunSpec` per scenario and seed, scenario-major."""
    return [
        RunSpec(
            scenario=scenario,
            seed=seed,
            frames=args.frames,
            out=args.out,
            split=args.split,
            run_name=args.run_name or f"{scenario}_s{seed:06d}",
            lidar=args.lidar,
            cavs=args.cavs,
            traffic_density=args.traffic_density,
            backend=args.backend,
            host=args.host,
            port=args.port,
            timeout_s=args.timeout,
            carla_module=args.carla_module,
            show_frames=args.workers == 0 and args.ray_address is None,
        )
        for scenario in args.scenarios
        for seed in args.seed_list
    ]


def generate_run(spec: RunSpec) -> RunSummary:
    """Write (or complete) one run; raises ``ValueError``/``CarlaError``/``ImportError`` for bad settings."""
    params = {"cavs": spec.cavs, "traffic_density": spec.traffic_density}
    if spec.backend == "carla":
        world = make_carla_world(
            spec.scenario,
            lidar=spec.lidar,
            host=spec.host,
            port=spec.port,
            timeout_s=spec.timeout_s,
            carla_module=spec.carla_module,
            **params,
        )
    else:
        world = make_world(spec.scenario, lidar=spec.lidar, **params)
    frame = world.reset(spec.seed)  # a CarlaWorld that fails here has already closed itself
    try:
        return _write(spec, world, frame)
    finally:
        world.close()  # CARLA: actors destroyed and server settings restored, also on Ctrl-C


def _write(spec: RunSpec, world, frame) -> RunSummary:
    manifest = Manifest(
        scenario=spec.scenario,
        seed=spec.seed,
        frames=spec.frames,
        cavs=frame.connected_ids,
        lidar=lidar_dict(world.lidar),
        dt=world.dt,
        params={**dataclasses.asdict(world.params), "backend": spec.backend},
    )
    manifest, done = start_run(spec.out, spec.split, spec.run_name, manifest)
    done_set = set(done)
    collisions = []
    frames = tqdm(
        range(spec.frames), desc=spec.run_name, unit="frame", leave=False, disable=not spec.show_frames
    )
    for index in frames:
        if index > 0:
            # frames already on disk are simulated again (the World is deterministic) but not sensed
            world.sensors_enabled = index not in done_set
            frame = world.step()
        if index in done_set:
            continue
        write_scene_frame(spec.out, spec.split, spec.run_name, frame)
        manifest.counts.add(counts_of_scene_frame(frame))
        write_manifest(Path(spec.out) / spec.split / spec.run_name, manifest)
        if frame.collisions:
            collisions.append(f"{spec.run_name} frame {index}: collision between {frame.collisions}")
    counts = manifest.counts
    return RunSummary(
        run_name=spec.run_name,
        path=Path(spec.out) / spec.split / spec.run_name,
        frames_written=counts.frames_written,
        already_complete=len(done_set),
        cavs=len(manifest.cavs),
        points=counts.points,
        boxes=dict(counts.boxes),
        collisions=tuple(collisions),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    specs = run_specs(args)
    jobs = [Job(spec.run_name, generate_run, (spec,)) for spec in specs]
    bar = tqdm(total=len(jobs), desc="runs", unit="run", disable=len(jobs) == 1 and args.workers == 0)
    try:
        results = run_jobs(
            jobs,
            workers=args.workers,
            ray_address=args.ray_address,
            max_retries=args.max_retries,
            fatal=_SETTINGS_ERRORS,
            on_retry=lambda event: bar.write(f"warning: {event}", file=sys.stderr),
        )
        for result in results:
            summary: RunSummary = result.value
            if summary.already_complete:
                bar.write(
                    f"resuming {summary.run_name}: {summary.already_complete} of {args.frames} frames were already complete"
                )
            for line in summary.collisions:
                bar.write(line)
            bar.write(summary.line())
            bar.update(1)
    except JobFailed as err:
        bar.close()
        return exit_status_of(err, _SETTINGS_ERRORS)
    bar.close()
    print(f"{len(jobs)} run(s) complete under {args.out / args.split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
