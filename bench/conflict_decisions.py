"""What a crossing policy does at the start: the first decisions of a planner on held-out seeds,
split by whether going first is possible.

In ``red_light`` (and the other crossings) a hidden vehicle is drawn *early* (the ego has to let it
pass) or *late* (the ego has to go at once, at full speed; waiting makes it time out behind it).
Which one an episode holds shows in the first observation's *go first* margin
(:mod:`sim.env_conflict`): about -0.7 to -0.5 s for an early runner, -0.05 to +0.13 s for a late
one, with ``visible`` or ``oracle`` observations (with ``ego_only`` the runner is not known yet
and the margin reads "no conflict"). This script plays the checkpoint's deterministic policy on
the held-out seeds, classifies each episode by that first margin (``--threshold``), and prints
per class: how often the first action is IDLE / FASTER / SLOWER, the FASTERs among the first
``--first`` decisions, and the outcomes. A policy that has learned the go-first rule presses
FASTER from the first decision when going first is possible; one that yields to every runner
brakes there as well.

Usage: ``python bench/conflict_decisions.py --checkpoint RUN/checkpoint.pt [--episodes 100]
[--scenario red_light] [--obs visible] [--threshold -0.3] [--first 5] [--json OUT.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from tqdm import tqdm

from datasets.io import atomic_write_text
from models.planning.experiment import Policy, env_config_for_eval, eval_seeds, load_checkpoint
from models.threads import set_cpu_threads
from sim.env import EGO_FEATURES, CoopDrivingEnv
from sim.env_conflict import CONFLICT_FEATURES, MARGIN_NORM_S
from sim.env_lanes import MetaAction

CLASSES = ("go first possible", "must yield", "no conflict known")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a tools/train_planner.py checkpoint")
    parser.add_argument("--episodes", type=int, default=100, help="held-out seeds to play")
    parser.add_argument("--scenario", default=None, help="default: the checkpoint's")
    parser.add_argument("--obs", default=None, choices=("ego_only", "visible", "oracle"), help="default: the checkpoint's")
    parser.add_argument(
        "--threshold", type=float, default=-0.3,
        help="first go-first margin (s) above which going first counts as possible (default -0.3)",
    )
    parser.add_argument("--first", type=int, default=5, help="decisions counted at the start (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.first < 1:
        parser.error("--episodes and --first must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_cpu_threads(1)
    try:
        checkpoint, config = load_checkpoint(args.checkpoint)
        env_config = env_config_for_eval(config, args.scenario, args.obs)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not env_config.conflict_features:
        print("error: the checkpoint's env has no conflict features (env.conflict_features)", file=sys.stderr)
        return 2
    env = CoopDrivingEnv(env_config, seed=0)
    ego = env.possible_agents[0]
    if not isinstance(env.action_space(ego), spaces.Discrete):
        env.close()
        print("error: needs discrete meta-actions (env.action=discrete)", file=sys.stderr)
        return 2
    names = [MetaAction(a).name for a in env.meta_actions]
    conflict = len(EGO_FEATURES) + CONFLICT_FEATURES.index("conflict")
    go_first = len(EGO_FEATURES) + CONFLICT_FEATURES.index("conflict_go_first_margin")
    policy = Policy(checkpoint, config, env.action_space(ego), env.possible_agents, deterministic=True)
    rows: dict[str, list[dict]] = {c: [] for c in CLASSES}
    for seed in tqdm(eval_seeds(args.episodes), desc="episodes", unit="episode"):
        policy.reset()
        obs, _ = env.reset(seed=seed)
        first_obs = obs[ego]
        if first_obs[conflict] > 0:
            margin_s = float(first_obs[go_first]) * MARGIN_NORM_S
            kind = CLASSES[0] if margin_s > args.threshold else CLASSES[1]
        else:
            kind = CLASSES[2]
        actions: list[str] = []
        episode: dict = {}
        while env.agents:
            act = policy.act(obs, generator=torch.Generator().manual_seed(seed))
            if ego in act and len(actions) < args.first:
                actions.append(names[int(act[ego])])
            obs, _, _, _, infos = env.step(act)
            if "episode" in infos.get(ego, {}):
                episode = infos[ego]["episode"]
        rows[kind].append(
            {
                "seed": seed,
                "actions": actions,
                "success": bool(episode.get("success", 0)),
                "collision": bool(episode.get("collision", 0)),
            }
        )
    env.close()

    table = {}
    for kind, episodes in rows.items():
        if not episodes:
            continue
        first = [e["actions"][0] for e in episodes if e["actions"]]
        table[kind] = {
            "episodes": len(episodes),
            **{f"first_{n}": float(np.mean([a == n for a in first])) if first else 0.0 for n in names},
            "faster_in_first": float(np.mean([e["actions"].count("FASTER") for e in episodes])),
            "success": float(np.mean([e["success"] for e in episodes])),
            "collision": float(np.mean([e["collision"] for e in episodes])),
            "timeout": float(np.mean([not e["success"] and not e["collision"] for e in episodes])),
        }
    print(f"{args.checkpoint} on {args.episodes} held-out {env_config.scenario} seeds ({env_config.obs})\n")
    header = " | ".join(f"first {n}" for n in names)
    print(f"| first go-first margin | episodes | {header} | FASTERs in first {args.first} | success | collision | timeout |")
    print("|---" * (len(names) + 6) + "|")
    for kind, t in table.items():
        shares = " | ".join(f"{t[f'first_{n}']:.2f}" for n in names)
        print(
            f"| {kind} | {t['episodes']} | {shares} | {t['faster_in_first']:.1f} | {t['success']:.2f} | "
            f"{t['collision']:.2f} | {t['timeout']:.2f} |"
        )
    if args.json is not None:
        atomic_write_text(args.json, json.dumps({"checkpoint": str(args.checkpoint), "table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
