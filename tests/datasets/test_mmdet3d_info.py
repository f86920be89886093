"""mmdet3d v2 info export (datasets/mmdet3d_info.py): the real demo frame, and our exports loaded by
mmdet3d 1.4's own KittiDataset."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasets import kitti as kt
from datasets import mmdet3d_info as mi
from datasets.convert import convert
from sim.box_ops import count_points_in_boxes

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.fail(f"shared sample data {path} is missing (see shared/data/README.md); these tests need it")
    return path


@pytest.fixture(scope="module")
def demo() -> tuple[dict, Path]:
    """mmdet3d's KITTI demo frame 000008: its info entry and its (camera-cropped) velodyne file."""
    folder = shared("kitti_000008")
    infos = mi.read_infos(folder / "000008.pkl")
    return infos["data_list"][0], folder / "000008.bin"


@pytest.fixture(scope="module")
def sim_native(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    args = ["--scenario", "red_light", "--frames", "2", "--lidar", "tiny", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out


def kitti_dataset(root: Path, split: str = "train"):
    from mmdet3d.datasets import KittiDataset
    from mmdet3d.utils import register_all_modules

    register_all_modules()
    return KittiDataset(
        data_root=str(root),
        ann_file=mi.info_file_name(split),
        data_prefix={"pts": "training/velodyne"},
        pipeline=[{"type": "LoadPointsFromFile", "coord_type": "LIDAR", "load_dim": 4, "use_dim": 4}],
        filter_empty_gt=False,
    )


def test_demo_frame_point_counts_equal_the_info_file(demo):
    """LiDAR boxes made the way KittiDataset makes them hold, by mmcv's points-in-boxes, exactly the
    num_lidar_pts mmdet3d's converter recorded; so do the boxes of our KITTI route (calibration
    rebuilt from Tr_velo_to_cam and R0_rect, labels through KittiFrame)."""
    entry, points_path = demo
    points = kt.read_velodyne(points_path)
    assert points.shape == (17_238, 4)
    boxes, names, recorded = mi.lidar_boxes_of_entry(entry)
    assert names == ["Car"] * 6 and recorded.tolist() == [1325, 1900, 881, 659, 55, 162]
    np.testing.assert_array_equal(count_points_in_boxes(points, boxes), recorded)
    frame = mi.frame_of_entry(entry, points_path)
    boxes_kitti, types = frame.boxes_lidar()
    assert types.tolist() == names
    np.testing.assert_array_equal(count_points_in_boxes(frame.points, boxes_kitti), recorded)
    np.testing.assert_allclose(boxes_kitti, boxes, atol=1e-5)


def test_info_entry_reproduces_mmdet3d_converter_output(demo):
    """Our entry for the demo frame equals the one mmdet3d's own converter wrote, field by field."""
    entry, points_path = demo
    frame = mi.frame_of_entry(entry, points_path)
    assert len(frame.labels) == 10 and int(np.sum(~frame.labels.care)) == 4  # DontCare regions kept
    ours = mi.build_info_entry(frame, "000008.bin")
    assert ours["sample_idx"] == 8 and ours["lidar_points"]["lidar_path"] == "000008.bin"
    assert len(ours["instances"]) == len(entry["instances"])
    for theirs, mine in zip(entry["instances"], ours["instances"], strict=True):
        assert set(theirs) == set(mine)
        for key in ("bbox_label", "bbox_label_3d", "num_lidar_pts", "difficulty", "occluded", "index", "group_id"):
            assert mine[key] == theirs[key], key
        for key in ("bbox", "bbox_3d", "truncated", "alpha", "score"):
            np.testing.assert_allclose(mine[key], theirs[key], atol=1e-9, err_msg=key)
        np.testing.assert_allclose(mine["center_2d"], theirs["center_2d"], atol=1e-3)
        np.testing.assert_allclose(mine["depth"], theirs["depth"], atol=1e-5)
    for cam in ("CAM0", "CAM1", "CAM2", "CAM3"):
        for key, value in entry["images"][cam].items():
            if key not in ("img_path", "height", "width"):
                np.testing.assert_allclose(ours["images"][cam][key], value, atol=1e-4, err_msg=f"{cam} {key}")
    np.testing.assert_allclose(ours["images"]["R0_rect"], entry["images"]["R0_rect"], atol=1e-12)
    for key in ("Tr_velo_to_cam", "Tr_imu_to_velo"):
        np.testing.assert_allclose(ours["lidar_points"][key], entry["lidar_points"][key], atol=1e-12)


def test_kitti_classes_are_mmdet3d_kitti_classes():
    from mmdet3d.datasets import KittiDataset

    assert tuple(KittiDataset.METAINFO["classes"]) == mi.KITTI_CLASSES


def check_loaded_by_mmdet3d(root: Path, split: str = "train") -> int:
    """Load an export with KittiDataset and compare every frame with our KITTI reader."""
    dataset = kitti_dataset(root, split)
    split_dir = root / "training"
    indices = [int(i) for i in (root / "ImageSets" / f"{split}.txt").read_text().split()]
    assert len(dataset) == len(indices)
    n_boxes = 0
    for i, index in enumerate(indices):
        frame = kt.read_kitti_frame(split_dir, index)
        boxes, types = frame.boxes_lidar()
        info = dataset.get_data_info(i)
        assert info["lidar_path"] == str(split_dir / "velodyne" / f"{index:06d}.bin")
        ann = info["ann_info"]
        np.testing.assert_allclose(ann["gt_bboxes_3d"].tensor.numpy(), boxes, atol=1e-4)
        assert ann["gt_labels_3d"].tolist() == [mi.KITTI_CLASSES.index(t) for t in types]
        counts = [inst["num_lidar_pts"] for inst in info["instances"] if inst["bbox_label_3d"] >= 0]
        assert counts == count_points_in_boxes(frame.points, boxes).tolist()
        sample = dataset[i]
        np.testing.assert_array_equal(sample["points"].tensor.numpy(), frame.points)
        n_boxes += len(boxes)
    return n_boxes


def test_export_of_real_kitti_frames_loads_in_mmdet3d(tmp_path):
    summary = convert(shared("kitti_sample"), "kitti", tmp_path / "mm", "mmdet3d", progress=False)
    assert summary.frames == 3
    assert check_loaded_by_mmdet3d(tmp_path / "mm") == 6


def test_export_of_simulated_frames_loads_in_mmdet3d(tmp_path, sim_native):
    for view in ("cav", "fused"):
        convert(sim_native, "native", tmp_path / view, "mmdet3d", kitti_view=view, progress=False)
        assert check_loaded_by_mmdet3d(tmp_path / view) > 0


def test_demo_frame_exported_again_keeps_its_counts(tmp_path, demo):
    """mmdet3d -> KITTI -> mmdet3d: the new info file records the counts of the original one."""
    entry, _ = demo
    convert(shared("kitti_000008"), "mmdet3d", tmp_path / "kitti", "kitti", progress=False)
    convert(tmp_path / "kitti", "kitti", tmp_path / "mm", "mmdet3d", progress=False)
    infos = mi.read_infos(tmp_path / "mm" / mi.info_file_name("train"))
    assert infos["metainfo"]["categories"]["Car"] == 2 and infos["metainfo"]["info_version"] == "1.1"
    got = [inst["num_lidar_pts"] for inst in infos["data_list"][0]["instances"]]
    assert got == [inst["num_lidar_pts"] for inst in entry["instances"]]
    check_loaded_by_mmdet3d(tmp_path / "mm")


def test_difficulty_follows_kitti_thresholds():
    bbox = np.array([[0, 0, 10, 50], [0, 0, 10, 30], [0, 0, 10, 30], [0, 0, 10, 20], [0, 0, 10, 50]], float)
    occluded = np.array([0, 1, 2, 0, 0])
    truncated = np.array([0.1, 0.2, 0.45, 0.0, 0.6])
    assert mi.kitti_difficulty(bbox, occluded, truncated).tolist() == [0, 1, 2, -1, -1]


def test_info_files_with_objects_or_damage_are_refused(tmp_path):
    evil = tmp_path / "evil_infos.pkl"
    evil.write_bytes(pickle.dumps({"data_list": [], "metainfo": {}, "x": subprocess.Popen}))
    with pytest.raises(ValueError, match=r"evil_infos\.pkl: not a readable info pickle.*subprocess\.Popen"):
        mi.read_infos(evil)
    good = tmp_path / "kitti_infos_train.pkl"
    mi.write_infos(good, mi.make_infos([]))
    assert mi.read_infos(good)["data_list"] == []
    cut = tmp_path / "cut_infos.pkl"
    cut.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"cut_infos\.pkl"):
        mi.read_infos(cut)
    plain = tmp_path / "plain_infos.pkl"
    plain.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="no data_list"):
        mi.read_infos(plain)


def test_entry_problems_name_bad_boxes(demo):
    entry, _ = demo
    assert mi.entry_problems(entry, 0) == []
    bad = {**entry, "instances": [dict(inst) for inst in entry["instances"]]}
    bad["instances"][1]["bbox_3d"] = [1.0, 1.0, 8.0, 3.0, 0.0, 1.5, 0.0]
    bad["instances"][2]["bbox_3d"] = [1.0, 1.0]
    bad["instances"][3]["bbox_3d"] = [1.0, 1.0, float("nan"), 3.0, 1.5, 1.5, 0.0]
    assert mi.entry_problems(bad, 4) == [
        "data_list[4].instances[1]: box with non-positive size [3.0, 0.0, 1.5]",
        "data_list[4].instances[2]: bbox_3d must be 7 numbers, got (2,)",
        "data_list[4].instances[3]: bbox_3d holds NaN or infinity",
    ]
