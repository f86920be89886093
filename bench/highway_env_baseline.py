"""The highway-env baseline both simulator benchmarks compare against: ``merge-v0`` steps per second."""

from __future__ import annotations

import time

import numpy as np


def bench_highway_env(steps: int) -> dict[str, float] | None:
    try:
        import gymnasium as gym
        import highway_env  # noqa: F401  (registers the environments)
    except ImportError as exc:
        print(f"highway-env not available ({exc}); install it with: pip install highway-env")
        return None
    env = gym.make("merge-v0")
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    done_steps = 0
    t0 = time.perf_counter()
    while done_steps < steps:
        _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        done_steps += 1
        if terminated or truncated:
            env.reset(seed=int(rng.integers(1 << 31)))
    elapsed = time.perf_counter() - t0
    policy_frequency = env.unwrapped.config["policy_frequency"]
    env.close()
    return {"steps_per_s": steps / elapsed, "sim_seconds_per_s": steps / policy_frequency / elapsed}
