"""Driving-env speed: steps/s of ``CoopDrivingEnv`` on ``merge`` against highway-env ``merge-v0``.

Measures, in one process on this machine, with random actions and no rendering:

- steps/s of the multi-agent env on ``merge`` (3 connected vehicles, each an agent) with
  ``visible`` observations (coarse-LiDAR visibility + DETECTIONS messages over the DSRC bus), at
  one World tick per decision (the finest) and at the configs' two ticks; ``oracle`` for
  reference; and where the time goes: ``EmbeddedWorld.step``, the visibility cast, the rest of
  the communication (encoding, the bus, decoding and matching the messages) and the env's own
  Python (controls, rewards, observations);
- steps/s of highway-env's ``merge-v0`` (one agent, 15 simulation ticks per 1 Hz decision);
- the ratios per env step and per simulated second.

The two envs take turns: each of ``--rounds`` rounds times highway-env and then every
configuration of ours, and the figures printed are medians over the rounds, the ratios taken
within each round. On a shared machine the speed drifts by tens of percent from one minute to the
next, so two back-to-back measurements can put the ratio anywhere between 3x and 7x; the median of
interleaved rounds is the figure to quote (the spread over the rounds is printed with it).

Usage: ``python bench/env_bench.py [--steps 400] [--highway-steps 200] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from highway_env_baseline import bench_highway_env
from tqdm import tqdm

import sim.env_visibility as visibility_module
from sim.env import CoopDrivingEnv, EnvConfig
from sim.world import EmbeddedWorld


class _Timer:
    """Wraps a method to add up the time spent in it."""

    def __init__(self, owner, name: str) -> None:
        self.owner, self.name = owner, name
        self.original = getattr(owner, name)
        self.seconds = 0.0

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(owner, name, timed)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.original)


def bench_ours(steps: int, obs: str, decision_ticks: int, seed: int = 0) -> dict[str, float]:
    env = CoopDrivingEnv(EnvConfig(scenario="merge", obs=obs, decision_ticks=decision_ticks), seed=seed)
    rng = np.random.default_rng(seed)
    env.reset()
    env.step({a: int(rng.integers(5)) for a in env.agents})  # warm caches
    world_timer = _Timer(EmbeddedWorld, "step")
    vis_timer = _Timer(visibility_module.VisibilityCaster, "points_on_boxes")
    comm_timer = _Timer(CoopDrivingEnv, "_communicate")  # sensing, messages and the bus
    done = 0
    try:
        t0 = time.perf_counter()
        while done < steps:
            if not env.agents:
                env.reset()
            env.step({a: int(rng.integers(5)) for a in env.agents})
            done += 1
        elapsed = time.perf_counter() - t0
    finally:
        world_timer.restore()
        vis_timer.restore()
        comm_timer.restore()
    return {
        "steps_per_s": steps / elapsed,
        "sim_seconds_per_s": steps * decision_ticks * env.dt / elapsed,
        "world_share": world_timer.seconds / elapsed,
        "visibility_share": vis_timer.seconds / elapsed,
        "messages_share": (comm_timer.seconds - vis_timer.seconds) / elapsed,
        "agents": len(env.possible_agents),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400, help="env steps to time per configuration and round")
    parser.add_argument("--highway-steps", type=int, default=200, help="highway-env steps to time per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are printed)")
    args = parser.parse_args()
    if args.steps < 1 or args.highway_steps < 1 or args.rounds < 1:
        parser.error("--steps, --highway-steps and --rounds must be >= 1")

    configs = (("visible", 1), ("visible", 2), ("oracle", 1))
    theirs_rounds: list[dict[str, float]] = []
    ours_rounds: dict[tuple[str, int], list[dict[str, float]]] = {c: [] for c in configs}
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
        theirs = bench_highway_env(args.highway_steps)
        if theirs is not None:
            theirs_rounds.append(theirs)
        for obs, ticks in configs:
            ours_rounds[(obs, ticks)].append(bench_ours(args.steps, obs, ticks))

    def median(values) -> float:
        return float(np.median(list(values)))

    if theirs_rounds:
        print(
            f"highway-env merge-v0: {median(t['steps_per_s'] for t in theirs_rounds):.1f} steps/s "
            f"({median(t['sim_seconds_per_s'] for t in theirs_rounds):.1f} simulated s per s); "
            f"median of {len(theirs_rounds)} rounds"
        )
    for (obs, ticks), rounds in ours_rounds.items():
        shares = {k: median(r[k] for r in rounds) for k in ("world_share", "visibility_share", "messages_share")}
        line = (
            f"CoopDrivingEnv merge, obs={obs}, {ticks} tick(s) per step, {rounds[0]['agents']} agents: "
            f"{median(r['steps_per_s'] for r in rounds):.1f} steps/s "
            f"({median(r['sim_seconds_per_s'] for r in rounds):.1f} simulated s per s); "
            f"World.step {100 * shares['world_share']:.0f}% of the time, "
            f"visibility {100 * shares['visibility_share']:.0f}%, "
            f"messages {100 * shares['messages_share']:.0f}%, "
            f"env {100 * (1.0 - sum(shares.values())):.0f}%"
        )
        if theirs_rounds:
            per_step = [o["steps_per_s"] / t["steps_per_s"] for o, t in zip(rounds, theirs_rounds, strict=True)]
            per_sim = [
                o["sim_seconds_per_s"] / t["sim_seconds_per_s"] for o, t in zip(rounds, theirs_rounds, strict=True)
            ]
            line += (
                f"; ratio to highway-env: {median(per_step):.2f}x per step "
                f"(rounds {min(per_step):.2f}-{max(per_step):.2f}), {median(per_sim):.2f}x per simulated second"
            )
        print(line)


if __name__ == "__main__":
    main()
