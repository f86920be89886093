"""Does a scenario's time limit leave room to yield? Constant-action policies on held-out seeds.

Every controlled agent presses the same meta-action for the whole episode (FASTER: as fast as the
route's speed limit and curve speeds allow; IDLE: keep the starting speed), optionally behind the
safety supervisor (``env.safety``), with ``oracle`` observations. Printed per policy: outcomes over
all agent episodes, and the completion times of the successes (mean, 90th percentile, slowest)
against the task's ``episode_s``. If the slowest FASTER success sits at the limit, an agent that
yields even once (lets another vehicle merge ahead, waits for a gap) runs out of time, and a
learned policy's timeouts measure the limit rather than the policy.

Usage: ``python bench/task_time_limits.py [--scenario merge] [--episodes 30]``
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from sim.env import EVAL_SEED_OFFSET, SCENARIO_TASKS, CoopDrivingEnv, EnvConfig
from sim.env_lanes import MetaAction

ACTIONS = ("FASTER", "IDLE")
"""the meta-actions played, by name (``sim.env_lanes.MetaAction``)"""


def play(scenario: str, action: str, safety: bool, episodes: int) -> dict[str, float]:
    """Play ``episodes`` held-out seeds with every agent pressing ``action``; outcome counts and times."""
    env = CoopDrivingEnv(EnvConfig(scenario=scenario, obs="oracle", safety=safety), seed=0)
    counts = {"success": 0, "collision": 0, "timeout": 0}
    times: list[float] = []
    index = env.meta_actions.index(MetaAction[action])  # the env's discrete action for it
    for i in tqdm(range(episodes), desc=f"{action}{' + safety' if safety else ''}", leave=False):
        env.reset(seed=EVAL_SEED_OFFSET + i)
        while env.agents:
            _, _, _, _, infos = env.step({a: index for a in env.agents})
            for info in infos.values():
                if "episode" not in info:
                    continue
                ep = info["episode"]
                outcome = "success" if ep["success"] else "collision" if ep["collision"] else "timeout"
                counts[outcome] += 1
                if ep["success"]:
                    times.append(float(ep["time_s"]))
    t = np.asarray(times) if times else np.full(1, np.nan)
    return {
        **counts,
        "mean_s": float(t.mean()),
        "p90_s": float(np.percentile(t, 90)),
        "max_s": float(t.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", default="merge", choices=sorted(SCENARIO_TASKS))
    parser.add_argument("--episodes", type=int, default=30, help="held-out seeds (default 30)")
    args = parser.parse_args()
    if args.episodes < 1:
        parser.error("--episodes must be >= 1")
    limit = SCENARIO_TASKS[args.scenario].episode_s
    print(f"{args.scenario}: time limit {limit:.1f} s, {args.episodes} held-out seeds, oracle observations\n")
    print("| policy | success | collision | timeout | success time mean / p90 / slowest s |")
    print("|---|---|---|---|---|")
    for action in ACTIONS:
        for safety in (False, True):
            r = play(args.scenario, action, safety, args.episodes)
            name = f"always {action}" + (" + safety" if safety else "")
            print(
                f"| {name} | {r['success']} | {r['collision']} | {r['timeout']} | "
                f"{r['mean_s']:.2f} / {r['p90_s']:.2f} / {r['max_s']:.2f} |"
            )


if __name__ == "__main__":
    main()
