"""Render a bird's-eye view of one frame of a native (OPV2V-layout) dataset to PNG.

PATH can be
  * one cav's frame yaml (RUN/CAV/FRAME.yaml): that frame, that cav as the ego; --out is a PNG file;
  * a run folder (RUN/ with CAV/ folders): --frame, default the middle complete frame; --out is a
    PNG file;
  * a folder of runs (a split, or a dataset root with split folders): one PNG per run, named
    after the run, written into --out as a folder; --run keeps only the run of that name.

Every cav's points of the frame are drawn in its own colour; boxes are green when the ego's LiDAR
hit them, red when only other cavs' did, grey and dashed when nobody's did.

Example:
  python tools/visualize.py data/train/town_a_000 --out bev.png --frame 12 --view ego
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from datasets.io import atomic_path
from datasets.native import (
    NativeAgentFrame,
    agent_frame_paths,
    find_runs,
    list_cavs,
    list_frames,
    read_agent_frame,
)
from sim.bev import new_bev_figure, render_bev
from sim.geometry import invert_T, transform_boxes, transform_points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="visualize.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "path", type=Path, metavar="FRAME_OR_DIR", help="a cav's frame yaml, a run folder or a folder of runs"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="PNG file (yaml or run) or output folder (folder of runs)"
    )
    parser.add_argument(
        "--frame",
        type=int,
        default=None,
        help="frame index (file number); default: the middle complete frame",
    )
    parser.add_argument("--run", default=None, help="with a folder of runs: render only the run of this name")
    parser.add_argument(
        "--ego",
        type=int,
        default=None,
        help="cav id to treat as the ego (default: the yaml's cav, else the scenario's ego, else the lowest)",
    )
    parser.add_argument(
        "--view",
        choices=("world", "ego"),
        default="world",
        help="draw in world coordinates or in the ego LiDAR's frame",
    )
    parser.add_argument(
        "--range",
        type=float,
        default=None,
        dest="view_range",
        metavar="METRES",
        help="half width of the view around the ego (default: fit everything)",
    )
    parser.add_argument("--dpi", type=int, default=110, help="resolution of the PNG")
    return parser.parse_args(argv)


def load_frame(run: Path, frame: int) -> dict[int, NativeAgentFrame]:
    """Every cav of ``run`` that has ``frame``, by cav id."""
    out = {}
    for cav in list_cavs(run):
        path = agent_frame_paths(run, cav, frame).yaml
        if path.is_file():
            out[cav] = read_agent_frame(path)
    return out


def pick_frame(run: Path, frame: int | None) -> int:
    """``frame`` if some cav has it, else the middle complete frame."""
    complete = list_frames(run)
    if frame is None:
        if not complete:
            raise SystemExit(f"visualize.py: error: {run} has no frame that every cav completed")
        return complete[len(complete) // 2]
    if not any(agent_frame_paths(run, cav, frame).yaml.is_file() for cav in list_cavs(run)):
        span = f"{complete[0]}..{complete[-1]}" if complete else "none"
        raise SystemExit(f"visualize.py: error: {run} has no frame {frame} (complete frames: {span})")
    return frame


def render_frame(
    agents: dict[int, NativeAgentFrame],
    ego_id: int,
    out: Path,
    view: str,
    view_range: float | None,
    dpi: int,
    title: str,
) -> Path:
    """Merge the cavs' boxes and visibility, move everything to the chosen frame, save the PNG."""
    if ego_id not in agents:
        raise SystemExit(
            f"visualize.py: error: ego {ego_id} has no data in this frame (cavs: {sorted(agents)})"
        )
    boxes: dict[int, np.ndarray] = {}
    for cav in sorted(agents):
        a = agents[cav]
        for vid, box in zip(a.vehicle_ids.tolist(), a.boxes_world, strict=True):
            boxes.setdefault(int(vid), box)
        own = a.agent_box_world
        if own is not None:
            boxes[cav] = own  # a cav's own pose beats how others list it
    box_ids = np.array(sorted(boxes), dtype=np.int64)
    boxes_world = np.stack([boxes[i] for i in box_ids]) if len(box_ids) else np.zeros((0, 7))
    index = {int(v): i for i, v in enumerate(box_ids)}

    num_points_by_agent = {}
    for cav, a in agents.items():
        counts = np.zeros(len(box_ids), dtype=np.int64)
        listed = [index[int(v)] for v in a.vehicle_ids]
        # without a sidecar (OPV2V data) a listed vehicle is one the cav's LiDAR hit
        counts[listed] = a.num_points if a.num_points is not None else 1
        num_points_by_agent[cav] = counts

    T_view_from_world = invert_T(agents[ego_id].T_world_from_sensor) if view == "ego" else np.eye(4)
    points = {
        cav: transform_points(T_view_from_world @ a.T_world_from_sensor, a.points)
        for cav, a in agents.items()
    }
    boxes_view = transform_boxes(T_view_from_world, boxes_world)

    fig, ax = new_bev_figure(dpi=dpi)
    render_bev(
        ax, points, boxes_view, box_ids, num_points_by_agent, ego_id, view_range_m=view_range, title=title
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # an interrupted run leaves no half-written picture
        fig.savefig(tmp, format="png")
    return out


def default_ego(agents: dict[int, NativeAgentFrame], requested: int | None) -> int:
    if requested is not None:
        return requested
    scene_egos = {a.scene_ego_id for a in agents.values() if a.scene_ego_id is not None}
    if len(scene_egos) == 1 and (ego := scene_egos.pop()) in agents:
        return ego
    return min(agents)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path: Path = args.path
    if not path.exists():
        raise SystemExit(f"visualize.py: error: no such file or folder: {path}")

    if path.is_file():
        if path.suffix != ".yaml":
            raise SystemExit(f"visualize.py: error: {path} is a file but not a frame yaml")
        run, frame = path.parent.parent, int(path.stem)
        if args.frame is not None and args.frame != frame:
            raise SystemExit(f"visualize.py: error: --frame {args.frame} contradicts {path.name}")
        agents = load_frame(run, frame)
        ego = args.ego if args.ego is not None else int(path.parent.name)
        out = render_frame(
            agents, ego, args.out, args.view, args.view_range, args.dpi, f"{run.name} frame {frame}"
        )
        print(out)
        return 0

    runs = find_runs(path)
    if not runs:
        raise SystemExit(
            f"visualize.py: error: no run folder (<run>/<cav_id>/<frame>.yaml) at or below {path}"
        )
    if runs == [path]:
        if args.run is not None and args.run != path.name:
            raise SystemExit(f"visualize.py: error: --run {args.run} but {path} is the run {path.name}")
        frame = pick_frame(path, args.frame)
        agents = load_frame(path, frame)
        ego = default_ego(agents, args.ego)
        out = render_frame(
            agents, ego, args.out, args.view, args.view_range, args.dpi, f"{path.name} frame {frame}"
        )
        print(out)
        return 0

    if args.run is not None:
        runs = [r for r in runs if r.name == args.run]
        if not runs:
            raise SystemExit(f"visualize.py: error: no run named {args.run} below {path}")
    if args.out.suffix.lower() == ".png":
        raise SystemExit(
            f"visualize.py: error: {path} holds several runs; --out must be a folder, not {args.out}"
        )
    for run in runs:
        frame = pick_frame(run, args.frame)
        agents = load_frame(run, frame)
        ego = default_ego(agents, args.ego)
        name = "_".join(run.relative_to(path).parts)  # split_run for a dataset root
        out = render_frame(
            agents,
            ego,
            args.out / f"{name}.png",
            args.view,
            args.view_range,
            args.dpi,
            f"{name} frame {frame}",
        )
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
