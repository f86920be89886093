"""Simulator speed: embedded World ticks per second against highway-env ``merge-v0`` steps.

Measures, in one process on this machine:

- ticks/s of the embedded World with five connected vehicles, each carrying a 64-channel LiDAR of
  2048 columns (``hdl64`` preset, 131,072 rays per vehicle per tick), in dense traffic
  (``random_traffic``), split into LiDAR time and everything else;
- steps/s of highway-env's ``merge-v0`` (no rendering, random actions), which has no sensors;
- the ratio, both per step and per simulated second (a highway-env step covers
  1 / policy_frequency seconds, ours 0.1 s).

Usage: ``python bench/sim_bench.py [--ticks 40] [--cavs 5] [--lidar hdl64]``
"""

from __future__ import annotations

import argparse
import time

from highway_env_baseline import bench_highway_env

import sim.world as world_module
from sim.world import make_world


def bench_embedded(ticks: int, cavs: int, lidar: str, scenario: str) -> dict[str, float]:
    world = make_world(scenario, lidar=lidar, cavs=cavs)
    world.reset(0)
    world.step()  # warm up caches (ray directions, mmcv import)
    lidar_time = 0.0
    original = world_module.cast_lidar

    def timed_cast(*args, **kwargs):
        nonlocal lidar_time
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        lidar_time += time.perf_counter() - t0
        return out

    world_module.cast_lidar = timed_cast
    points = 0
    try:
        t0 = time.perf_counter()
        for _ in range(ticks):
            frame = world.step()
            points += sum(len(s.points) for s in frame.scans.values())
        elapsed = time.perf_counter() - t0
    finally:
        world_module.cast_lidar = original
    return {
        "ticks_per_s": ticks / elapsed,
        "lidar_share": lidar_time / elapsed,
        "agents": len(frame.agents),
        "cavs": len(frame.scans),
        "points_per_tick": points / ticks,
        "sim_seconds_per_s": ticks * world.dt / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ticks", type=int, default=40, help="embedded ticks to time")
    parser.add_argument("--cavs", type=int, default=5, help="connected vehicles (each with a LiDAR)")
    parser.add_argument("--lidar", default="hdl64", help="LiDAR preset")
    parser.add_argument("--scenario", default="random_traffic")
    parser.add_argument("--highway-steps", type=int, default=300, help="highway-env steps to time")
    args = parser.parse_args()

    ours = bench_embedded(args.ticks, args.cavs, args.lidar, args.scenario)
    print(
        f"embedded World, {args.scenario}, {ours['cavs']} CAVs x {args.lidar} LiDAR, {ours['agents']} vehicles: "
        f"{ours['ticks_per_s']:.1f} ticks/s ({ours['sim_seconds_per_s']:.2f} simulated s per s), "
        f"LiDAR {100 * ours['lidar_share']:.0f}% of the time, {ours['points_per_tick']:.0f} points per tick"
    )
    theirs = bench_highway_env(args.highway_steps)
    if theirs is not None:
        print(
            f"highway-env merge-v0 (no sensors): {theirs['steps_per_s']:.1f} steps/s "
            f"({theirs['sim_seconds_per_s']:.2f} simulated s per s)"
        )
        print(
            f"ratio embedded / highway-env: {ours['ticks_per_s'] / theirs['steps_per_s']:.2f} per step, "
            f"{ours['sim_seconds_per_s'] / theirs['sim_seconds_per_s']:.2f} per simulated second"
        )


if __name__ == "__main__":
    main()
