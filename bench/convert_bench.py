"""Dataset conversion speed: frames per second for every (source, destination) format pair.

Generates a native run with the embedded simulator (``red_light``, ``hdl64`` LiDAR by default),
derives one source tree per format from it (OPV2V, KITTI and mmdet3d through the converter, a
nuScenes tree of ``.pcd.bin`` sweeps written here), then times :func:`datasets.convert.convert`
into a fresh folder for each pair, in one process, after a warm-up conversion that pays the
one-off imports (mmcv, mmdet3d).

A *frame* is the converter's unit: a scene frame with all its cavs for native/OPV2V sources, one
KITTI frame (one cav's sweep) otherwise; *views/s* counts sweeps for every pair, so the rows
compare.

Usage: ``python bench/convert_bench.py [--frames 10] [--lidar hdl64] [--kitti-view cav]``
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from datasets.convert import FORMATS, WRITABLE_FORMATS, convert
from datasets.native import find_runs, list_cavs, list_frames, read_agent_frame
from sim.geometry import invert_T, transform_boxes

ROOT = Path(__file__).resolve().parents[1]


def generate(out: Path, frames: int, lidar: str) -> None:
    args = ["--scenario", "red_light", "--frames", str(frames), "--lidar", lidar, "--out", str(out)]
    subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), *args], cwd=ROOT, check=True, capture_output=True)


def write_nuscenes_tree(native: Path, out: Path) -> None:
    """Each cav sweep as a nuScenes ``.pcd.bin`` (intensity 0-255, ring 0) plus an mmdet3d nuScenes
    info file with its vehicles as gravity-centre boxes."""
    sweeps = out / "samples" / "LIDAR_TOP"
    sweeps.mkdir(parents=True)
    entries = []
    for run in find_runs(native):
        for cav in list_cavs(run):
            for frame in list_frames(run):
                agent = read_agent_frame(run / str(cav) / f"{frame:06d}.yaml")
                name = f"{run.name}__{cav}__{frame:06d}.pcd.bin"
                data = np.zeros((len(agent.points), 5), np.float32)
                data[:, :4] = agent.points
                data[:, 3] *= 255.0
                data.tofile(sweeps / name)
                boxes = transform_boxes(invert_T(agent.T_world_from_sensor), agent.boxes_world)
                boxes[:, 2] += boxes[:, 5] / 2
                instances = [{"bbox_3d": b.tolist(), "bbox_label_3d": 0} for b in boxes]
                entries.append({"sample_idx": len(entries), "lidar_points": {"lidar_path": name}, "instances": instances})
    infos = {"metainfo": {"dataset": "nuscenes"}, "data_list": entries}
    (out / "nuscenes_infos_train.pkl").write_bytes(pickle.dumps(infos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=10, help="simulated frames (each with every cav's sweep)")
    parser.add_argument("--lidar", default="hdl64", help="LiDAR preset of the simulated run")
    parser.add_argument("--kitti-view", default="cav", choices=("cav", "fused"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        generate(tmp / "src" / "native", args.frames, args.lidar)
        print(f"generated {args.frames} frames ({args.lidar}) in {time.perf_counter() - t0:.1f} s")
        sources = {"native": tmp / "src" / "native"}
        warm = convert(sources["native"], "native", tmp / "warm", "mmdet3d", progress=False)  # one-off imports
        del warm
        for fmt in ("opv2v", "kitti", "mmdet3d"):
            convert(sources["native"], "native", tmp / "src" / fmt, fmt, kitti_view="cav", progress=False)
            sources[fmt] = tmp / "src" / fmt
        write_nuscenes_tree(sources["native"], tmp / "src" / "nuscenes")
        sources["nuscenes"] = tmp / "src" / "nuscenes"
        run = find_runs(sources["native"])[0]
        points = sum(len(read_agent_frame(run / str(c) / "000000.yaml").points) for c in list_cavs(run))
        print(f"{len(list_cavs(run))} cavs, {points} points per frame over all cavs\n")

        print(f"{'source':>9} -> {'destination':<12} {'frames':>6} {'views':>6} {'seconds':>8} {'frames/s':>9} {'views/s':>8}")
        for src in FORMATS:
            for dst in WRITABLE_FORMATS:
                if src == dst:
                    continue
                out = tmp / "out" / f"{src}-{dst}"
                summary = convert(sources[src], src, out, dst, kitti_view=args.kitti_view, progress=False)
                print(
                    f"{src:>9} -> {dst:<12} {summary.frames:>6} {summary.views:>6} {summary.seconds:>8.2f} "
                    f"{summary.frames / summary.seconds:>9.1f} {summary.views / summary.seconds:>8.1f}"
                )


if __name__ == "__main__":
    main()
