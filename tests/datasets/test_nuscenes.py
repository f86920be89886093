"""nuScenes sweeps and info boxes (datasets/nuscenes.py) on the real sample sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets import mmdet3d_info as mi
from datasets import nuscenes as ns
from sim.box_ops import count_points_in_boxes

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def sweep_dir() -> Path:
    path = SHARED / "nuscenes_sweep"
    if not path.is_dir():
        pytest.fail(f"shared sample data {path} is missing (see shared/data/README.md); these tests need it")
    return path


def test_real_sweep_loads_with_five_values_a_point(sweep_dir):
    points = ns.read_sweep(sweep_dir / "sweep.pcd.bin")
    assert points.shape == (34_688, 5) and points.dtype == np.float32
    assert points.nbytes == (sweep_dir / "sweep.pcd.bin").stat().st_size
    ring = points[:, 4]
    assert np.array_equal(ring, np.round(ring)) and ring.min() == 0 and ring.max() == 31  # 32-beam LiDAR
    assert 0 <= points[:, 3].min() and points[:, 3].max() <= 255
    assert 1.0 < np.median(np.linalg.norm(points[:, :2], axis=1)) < 30.0  # metres, sensor frame
    assert ns.list_sweeps(sweep_dir) == [sweep_dir / "sweep.pcd.bin"]
    assert ns.sweep_problems(sweep_dir / "sweep.pcd.bin") == []


def test_info_boxes_hold_the_points_nuscenes_counted(sweep_dir):
    """Bottom-centre boxes hold nuScenes' own num_lidar_pts for most boxes, and nearly all the
    points overall (nuScenes counts with its own inside test, so a few boundary points differ);
    leaving z at the gravity centre would lose about half of them."""
    entry = mi.read_infos(sweep_dir / "info.pkl")["data_list"][0]
    assert Path(entry["lidar_points"]["lidar_path"]).name.endswith(".pcd.bin")
    points = ns.read_sweep(sweep_dir / "sweep.pcd.bin")
    boxes, names = ns.lidar_boxes_of_entry(entry)
    recorded = np.array([i["num_lidar_pts"] for i in entry["instances"] if i["bbox_label_3d"] >= 0])
    assert boxes.shape == (len(recorded), 7) and set(names) <= set(ns.NUSCENES_CLASSES)
    counts = count_points_in_boxes(points, boxes)
    assert np.mean(counts == recorded) >= 0.85
    assert np.abs(counts - recorded).sum() <= 0.05 * recorded.sum()
    gravity = boxes.copy()
    gravity[:, 2] += gravity[:, 5] / 2
    assert np.abs(count_points_in_boxes(points, gravity) - recorded).sum() > 10 * np.abs(counts - recorded).sum()


def test_class_tables_cover_nuscenes_classes():
    assert set(ns.NUSCENES_TO_KIND) <= set(ns.NUSCENES_CLASSES)
    assert set(ns.NUSCENES_TO_KITTI) | {"traffic_cone", "barrier"} == set(ns.NUSCENES_CLASSES)


def test_damaged_sweeps_are_named(sweep_dir, tmp_path):
    data = (sweep_dir / "sweep.pcd.bin").read_bytes()
    nested = tmp_path / "samples" / "LIDAR_TOP"
    nested.mkdir(parents=True)
    cut = nested / "cut.pcd.bin"
    cut.write_bytes(data[:-8])
    with pytest.raises(ValueError, match=r"cut\.pcd\.bin: truncated or corrupt: .* 5-float points"):
        ns.read_sweep(cut)
    points = np.frombuffer(data, dtype=np.float32).reshape(-1, 5).copy()
    points[7, 2] = np.nan
    bad = nested / "bad.pcd.bin"
    points.tofile(bad)
    assert ns.sweep_problems(bad) == ["1 points with NaN or infinity (first at row 7)"]
    with pytest.raises(ValueError, match=r"bad\.pcd\.bin"):
        ns.read_sweep(bad)
    assert ns.list_sweeps(tmp_path) == [bad, cut]
    with pytest.raises(FileNotFoundError):
        ns.list_sweeps(tmp_path / "absent")
