"""Conversion between every pair of formats, resuming, interruption, and the tree validator
(datasets/convert.py), on simulated runs and the real KITTI sample."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import datasets.kitti as kt
from datasets import mmdet3d_info as mi
from datasets import nuscenes as ns
from datasets import opv2v as ov
from datasets.convert import (
    FORMATS,
    WRITABLE_FORMATS,
    Problem,
    check_tree,
    convert,
    detect_format,
    kitti_frame_of_fused,
)
from datasets.io import TEMP_MARKER
from datasets.native import find_runs, list_cavs, list_frames, read_agent_frame, write_pcd
from sim.box_ops import count_points_in_boxes
from sim.geometry import invert_T, transform_boxes, transform_points, wrap_angle

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
RUN = "red_light_s000000"
KITTI_POS = 0.005 * np.sqrt(3) + 1e-6  # 2-decimal label text, after a rotation into the world frame
KITTI_ANGLE = 0.005 + 1e-6


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.fail(f"shared sample data {path} is missing (see shared/data/README.md); these tests need it")
    return path


def make_nuscenes_tree(native: Path, out: Path) -> None:
    """Each cav sweep of a native tree as a nuScenes ``.pcd.bin`` (intensity 0-255, ring 0) with an
    mmdet3d nuScenes info file holding its vehicles as gravity-centre boxes."""
    sweeps = out / "samples" / "LIDAR_TOP"
    sweeps.mkdir(parents=True)
    entries = []
    for run in find_runs(native):
        for cav in list_cavs(run):
            for frame in list_frames(run):
                agent = read_agent_frame(run / str(cav) / f"{frame:06d}.yaml")
                name = f"{run.name}__{cav}__{frame:06d}.pcd.bin"
                data = np.zeros((len(agent.points), 5), np.float32)
                data[:, :3] = agent.points[:, :3]
                data[:, 3] = np.round(agent.points[:, 3] * 255)
                data.tofile(sweeps / name)
                boxes = transform_boxes(invert_T(agent.T_world_from_sensor), agent.boxes_world)
                boxes[:, 2] += boxes[:, 5] / 2
                instances = [{"bbox_3d": b.tolist(), "bbox_label_3d": 0, "bbox_label": 0} for b in boxes]
                entries.append({"sample_idx": len(entries), "lidar_points": {"lidar_path": name}, "instances": instances})
    infos = {"metainfo": {"dataset": "nuscenes", "categories": {c: i for i, c in enumerate(ns.NUSCENES_CLASSES)}}}
    infos["data_list"] = entries
    (out / "nuscenes_infos_train.pkl").write_bytes(pickle.dumps(infos))


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """One source tree per format, all holding the same simulated sweeps (2 frames, 2 cavs)."""
    base = tmp_path_factory.mktemp("trees")
    args = ["--scenario", "red_light", "--frames", "2", "--lidar", "tiny", "--out", str(base / "native")]
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    out = {"native": base / "native"}
    for fmt in ("opv2v", "kitti", "mmdet3d"):
        convert(out["native"], "native", base / fmt, fmt, progress=False)
        out[fmt] = base / fmt
    make_nuscenes_tree(out["native"], base / "nuscenes")
    out["nuscenes"] = base / "nuscenes"
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# every pair
# --------------------------------------------------------------------------------------------------


def views(tree: Path, fmt: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every sweep of a tree, keyed by a hash of its xyz: (points (N, 4), boxes (M, 7) sensor frame)."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    if fmt in ("native", "opv2v"):
        for run in find_runs(tree):
            for cav in list_cavs(run):
                for frame in list_frames(run):
                    a = ov.read_agent(run / str(cav) / f"{frame:06d}.yaml")
                    out.append((a.points, transform_boxes(invert_T(a.T_world_from_sensor), a.boxes_world)))
    elif fmt == "kitti":
        split = kt.kitti_split_dirs(tree)[0]
        for index in kt.list_kitti_frames(split):
            frame = kt.read_kitti_frame(split, index)
            out.append((frame.points, frame.boxes_lidar()[0]))
    elif fmt == "mmdet3d":
        for info in sorted(tree.glob("*infos*.pkl")):
            for entry in mi.read_infos(info)["data_list"]:
                path = mi.resolve_lidar_path(entry["lidar_points"]["lidar_path"], tree, info)
                frame = mi.frame_of_entry(entry, path)
                out.append((frame.points, frame.boxes_lidar()[0]))
    else:
        infos = mi.read_infos(tree / "nuscenes_infos_train.pkl")["data_list"]
        by_name = {e["lidar_points"]["lidar_path"]: e for e in infos}
        for sweep in ns.list_sweeps(tree):
            points = ns.read_sweep(sweep)[:, :4]
            out.append((points, ns.lidar_boxes_of_entry(by_name[sweep.name])[0]))
    keyed = {hashlib.sha1(np.ascontiguousarray(p[:, :3]).tobytes()).hexdigest(): (p, b) for p, b in out}
    assert len(keyed) == len(out)
    return keyed


def assert_same_sweeps(src: dict, dst: dict, src_fmt: str) -> None:
    """Every sweep survives with exact xyz; every box of the destination is a box of the source
    (within the label text's precision); boxes hit by points are not lost."""
    assert src.keys() == dst.keys()
    for key, (src_points, src_boxes) in src.items():
        dst_points, dst_boxes = dst[key]
        np.testing.assert_array_equal(dst_points[:, :3], src_points[:, :3])
        scale = 255.0 if src_fmt == "nuscenes" else 1.0
        np.testing.assert_allclose(dst_points[:, 3], np.clip(src_points[:, 3] / scale, 0, 1), atol=0.5 / 255 + 1e-6)
        for box in dst_boxes:
            d = np.abs(src_boxes - box)
            match = (
                (np.linalg.norm(d[:, :3], axis=1) <= KITTI_POS)
                & (d[:, 3:6].max(axis=1) <= 0.005 + 1e-6)
                & (np.abs(wrap_angle(src_boxes[:, 6] - box[6])) <= KITTI_ANGLE)
            )
            assert match.any(), f"box {box} is not in the source"
        hit = count_points_in_boxes(src_points, src_boxes) >= 3 if len(src_boxes) else np.zeros(0, bool)
        assert len(dst_boxes) >= hit.sum() * 0.8  # KITTI keeps vehicles with points (sidecar or geometric count)


PAIRS = [(s, d) for s in FORMATS for d in WRITABLE_FORMATS if s != d]


@pytest.mark.parametrize(("src_fmt", "dst_fmt"), PAIRS, ids=[f"{s}-{d}" for s, d in PAIRS])
def test_every_pair_converts_and_round_trips(trees, tmp_path, src_fmt, dst_fmt):
    src = trees[src_fmt]
    assert detect_format(src) == src_fmt
    summary = convert(src, src_fmt, tmp_path / "dst", dst_fmt, progress=False)
    assert summary.frames > 0 and summary.frames_skipped == 0
    assert check_tree(tmp_path / "dst", dst_fmt) == []
    assert detect_format(tmp_path / "dst") == dst_fmt
    src_views = views(src, src_fmt)
    assert_same_sweeps(src_views, views(tmp_path / "dst", dst_fmt), src_fmt)
    if src_fmt in WRITABLE_FORMATS:
        convert(tmp_path / "dst", dst_fmt, tmp_path / "back", src_fmt, progress=False)
        assert check_tree(tmp_path / "back", src_fmt) == []
        assert_same_sweeps(src_views, views(tmp_path / "back", src_fmt), src_fmt)
    # a second run finds everything complete and changes nothing
    before = tree_bytes(tmp_path / "dst")
    again = convert(src, src_fmt, tmp_path / "dst", dst_fmt, progress=False)
    assert again.frames == 0 and again.frames_skipped == summary.frames
    assert tree_bytes(tmp_path / "dst") == before


# --------------------------------------------------------------------------------------------------
# exact round trips of particular pairs
# --------------------------------------------------------------------------------------------------


def agents_of(tree: Path) -> dict[tuple[int, int], object]:
    run = tree / "train" / RUN
    return {(c, f): read_agent_frame(run / str(c) / f"{f:06d}.yaml") for c in list_cavs(run) for f in list_frames(run)}


def test_native_to_opv2v_to_native_is_exact_for_what_opv2v_holds(trees, tmp_path):
    convert(trees["opv2v"], "opv2v", tmp_path / "native", "native", progress=False)
    assert not any((trees["opv2v"] / "train" / RUN).glob("*/*.npz"))  # plain OPV2V: no sidecars
    original, back = agents_of(trees["native"]), agents_of(tmp_path / "native")
    assert original.keys() == back.keys() and len(original) == 4
    for key, a in original.items():
        b = back[key]
        np.testing.assert_array_equal(b.points[:, :3], a.points[:, :3])
        np.testing.assert_allclose(b.points[:, 3], np.round(a.points[:, 3] * 255) / 255, atol=1e-7)
        for name in ("T_world_from_sensor", "T_world_from_agent", "T_world_from_agent_predicted"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=1e-9)
        np.testing.assert_array_equal(b.vehicle_ids, a.vehicle_ids)
        np.testing.assert_allclose(b.boxes_world[:, :6], a.boxes_world[:, :6], atol=1e-9)
        np.testing.assert_allclose(wrap_angle(b.boxes_world[:, 6] - a.boxes_world[:, 6]), 0, atol=1e-12)
        np.testing.assert_allclose(b.vehicle_speed_mps, a.vehicle_speed_mps, atol=1e-9)
        assert b.ego_speed_mps == pytest.approx(a.ego_speed_mps, abs=1e-9)
        np.testing.assert_array_equal(b.agent_extent, a.agent_extent)  # from the other cav's listing
        # derived, not copied: points-in-boxes counts; points exactly on a box face may fall outside
        boxes_sensor = transform_boxes(invert_T(b.T_world_from_sensor), b.boxes_world)
        np.testing.assert_array_equal(b.num_points, count_points_in_boxes(b.points, boxes_sensor))
        assert np.all(b.num_points <= a.num_points + 2) and b.kinds == ["car"] * len(b.kinds)
        assert b.scene_ego_id == ov.opencood_ego_id([0, 1])


def test_native_to_kitti_and_back_restores_runs(trees, tmp_path):
    original = agents_of(trees["native"])
    entries = kt.read_frames_index(trees["kitti"])
    assert [(e.index, e.cav, e.frame) for e in entries] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert (trees["kitti"] / "ImageSets" / "train.txt").read_text() == "000000\n000001\n000002\n000003\n"
    split = trees["kitti"] / "training"
    for e in entries:
        a = original[(e.cav, e.frame)]
        frame = kt.read_kitti_frame(split, e.index)
        np.testing.assert_array_equal(frame.points, a.points)  # float32 velodyne: exact
        labelled = a.num_points >= 1
        np.testing.assert_array_equal(frame.meta.object_ids, a.vehicle_ids[labelled])
        boxes, types = frame.boxes_lidar()
        expected = transform_boxes(invert_T(a.T_world_from_sensor), a.boxes_world[labelled])
        assert np.abs(boxes[:, :3] - expected[:, :3]).max() <= 0.005 + 1e-6  # synthetic calib: per axis
        assert np.abs(boxes[:, 3:6] - expected[:, 3:6]).max() <= 0.005 + 1e-6
        assert np.abs(wrap_angle(boxes[:, 6] - expected[:, 6])).max() <= KITTI_ANGLE
        assert types.tolist() == [kt.KIND_TO_KITTI[k] for k in np.array(a.kinds)[labelled]]
    convert(trees["kitti"], "kitti", tmp_path / "native", "native", progress=False)
    back = agents_of(tmp_path / "native")
    assert back.keys() == original.keys()
    for key, a in original.items():
        b = back[key]
        labelled = a.num_points >= 1
        np.testing.assert_array_equal(b.points, a.points)
        np.testing.assert_array_equal(b.vehicle_ids, a.vehicle_ids[labelled])
        assert b.kinds == [k for k, keep in zip(a.kinds, labelled, strict=True) if keep]  # bus survives Truck
        assert b.roles == [r for r, keep in zip(a.roles, labelled, strict=True) if keep]
        np.testing.assert_array_equal(b.T_world_from_sensor, a.T_world_from_sensor)
        np.testing.assert_array_equal(b.vehicle_speed_mps, a.vehicle_speed_mps[labelled])
        assert np.linalg.norm(b.boxes_world[:, :3] - a.boxes_world[labelled, :3], axis=1).max() <= KITTI_POS
        assert (b.time_s, b.scene_ego_id, b.agent_kind) == (a.time_s, a.scene_ego_id, a.agent_kind)


def test_real_kitti_to_native_and_back(tmp_path):
    sample = shared("kitti_sample")
    summary = convert(sample, "kitti", tmp_path / "native", "native", progress=False)
    assert summary.dropped == {"Cyclist": 1, "Misc": 1, "Pedestrian": 1}
    assert summary.boxes == {"car": 2, "truck": 1}
    run = tmp_path / "native" / "train" / "kitti"
    assert list_cavs(run) == [0] and list_frames(run) == [0, 1, 2]
    convert(tmp_path / "native", "native", tmp_path / "kitti", "kitti", progress=False)
    for index in (0, 1, 2):
        original = kt.read_kitti_frame(sample, index)
        back = kt.read_kitti_frame(tmp_path / "kitti" / "training", index)
        np.testing.assert_array_equal(back.points, original.points)
        boxes, types = original.boxes_lidar()
        vehicles = np.isin(types, list(kt.KITTI_TO_KIND))
        got, got_types = back.boxes_lidar()
        assert got_types.tolist() == types[vehicles].tolist()
        assert np.linalg.norm(got[:, :3] - boxes[vehicles, :3], axis=1).max(initial=0) <= KITTI_POS
        assert np.abs(got[:, 3:6] - boxes[vehicles, 3:6]).max(initial=0) <= 0.005 + 1e-6


def test_kitti_to_mmdet3d_to_kitti_is_byte_identical(tmp_path):
    convert(shared("kitti_sample"), "kitti", tmp_path / "mm", "mmdet3d", progress=False)
    convert(tmp_path / "mm", "mmdet3d", tmp_path / "again", "kitti", progress=False)
    first, second = tree_bytes(tmp_path / "mm" / "training"), tree_bytes(tmp_path / "again" / "training")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_fused_view_holds_every_cav_in_the_ego_frame(trees, tmp_path):
    summary = convert(trees["native"], "native", tmp_path / "fused", "kitti", kitti_view="fused", progress=False)
    assert summary.frames == 2 and summary.views == 2
    entries = kt.read_frames_index(tmp_path / "fused")
    agents = agents_of(trees["native"])
    for e in entries:
        assert e.view == "fused" and e.cav == agents[(0, e.frame)].scene_ego_id
        frame = kt.read_kitti_frame(tmp_path / "fused" / "training", e.index)
        ego, other = agents[(e.cav, e.frame)], agents[(1 - e.cav, e.frame)]
        assert len(frame.points) == len(ego.points) + len(other.points)
        np.testing.assert_array_equal(frame.points[: len(ego.points)], ego.points)
        world = transform_points(ego.T_world_from_sensor, frame.points[len(ego.points) :].astype(np.float64))
        np.testing.assert_allclose(world[:, :3], transform_points(other.T_world_from_sensor, other.points.astype(np.float64))[:, :3], atol=1e-4)
        # labelled: every vehicle any cav lists (the other cav included) that a fused point hits
        world = {int(v): b for a in (other, ego) for v, b in zip(a.vehicle_ids, a.boxes_world, strict=True)}
        ids = np.array(sorted(world))
        exact = transform_boxes(invert_T(ego.T_world_from_sensor), np.array([world[v] for v in ids]))
        hit = count_points_in_boxes(frame.points, exact) >= 1
        assert sorted(frame.meta.object_ids.tolist()) == ids[hit].tolist()
        # and the fusion matters: some labelled vehicles are hit by the other cav's points only
        ego_hit = count_points_in_boxes(frame.points[: len(ego.points)], exact) >= 1
        assert np.any(hit & ~ego_hit)
        boxes, _ = frame.boxes_lidar()
        order = np.searchsorted(ids, frame.meta.object_ids)
        assert np.abs(boxes[:, :3] - exact[order, :3]).max() <= 0.005 + 1e-6
    direct = kitti_frame_of_fused({0: agents[(0, 0)], 1: agents[(1, 0)]}, 0, 0)
    np.testing.assert_array_equal(direct.points, kt.read_kitti_frame(tmp_path / "fused" / "training", 0).points)


# --------------------------------------------------------------------------------------------------
# resuming and interruption
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dst_fmt", ["kitti", "native"])
def test_interrupted_conversion_leaves_only_whole_files_and_resumes(trees, tmp_path, monkeypatch, dst_fmt):
    src_fmt = "native" if dst_fmt == "kitti" else "kitti"
    src = trees[src_fmt]
    convert(src, src_fmt, tmp_path / "reference", dst_fmt, progress=False)
    reference = tree_bytes(tmp_path / "reference")

    # the third frame fails half-way: after its first file, before its completion mark
    calls = {"n": 0}
    if dst_fmt == "kitti":
        target, name = kt, "write_calib"
    else:
        import datasets.opv2v as target

        name = "write_npz_deterministic"
    original = getattr(target, name)

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("power cut")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    with pytest.raises(KeyboardInterrupt):
        convert(src, src_fmt, tmp_path / "dst", dst_fmt, progress=False)
    monkeypatch.setattr(target, name, original)
    partial = tree_bytes(tmp_path / "dst")
    assert partial and all(reference[k] == v for k, v in partial.items() if k in reference)  # whole files only
    assert not any(TEMP_MARKER in k for k in partial)
    problems = check_tree(tmp_path / "dst", dst_fmt)
    assert problems and all("incomplete frame" in p.message or "not finished" in p.message for p in problems)
    # a hard kill also leaves a temporary file behind; the validator names it
    stray = next(p for p in (tmp_path / "dst").rglob("*") if p.is_file()).parent / f".x.bin{TEMP_MARKER}abc"
    stray.write_bytes(b"half")
    assert any(p.path == stray and "temporary" in p.message for p in check_tree(tmp_path / "dst", dst_fmt))
    stray.unlink()

    summary = convert(src, src_fmt, tmp_path / "dst", dst_fmt, progress=False)
    assert summary.frames_skipped == 2 and summary.frames == 2
    assert tree_bytes(tmp_path / "dst") == reference
    assert check_tree(tmp_path / "dst", dst_fmt) == []


def test_bad_arguments_and_foreign_destinations(trees, tmp_path):
    with pytest.raises(ValueError, match="both native"):
        convert(trees["native"], "native", tmp_path / "x", "native")
    with pytest.raises(ValueError, match="cannot write 'nuscenes'"):
        convert(trees["native"], "native", tmp_path / "x", "nuscenes")
    with pytest.raises(ValueError, match="unknown source format"):
        convert(trees["native"], "waymo", tmp_path / "x", "kitti")
    with pytest.raises(ValueError, match="kitti_view"):
        convert(trees["native"], "native", tmp_path / "x", "kitti", kitti_view="bev")
    with pytest.raises(ValueError, match="must not contain one another"):
        convert(trees["native"], "native", trees["native"] / "out", "kitti")
    with pytest.raises(ValueError, match="must not contain one another"):
        convert(trees["native"] / "train" / RUN, "native", trees["native"], "opv2v")
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "absent", "native", tmp_path / "x", "kitti")
    convert(shared("kitti_sample"), "kitti", tmp_path / "k", "mmdet3d", progress=False)
    with pytest.raises(ValueError, match=r"frames\.yaml describes another conversion"):
        convert(trees["native"], "native", tmp_path / "k", "kitti", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# the validator: every problem, with its file
# --------------------------------------------------------------------------------------------------


def writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def messages(problems: list[Problem], path: Path) -> list[str]:
    return [p.message for p in problems if p.path == path]


def test_check_lists_every_problem_of_a_native_tree(trees, tmp_path):
    root = writable_copy(trees["native"], tmp_path / "native")
    run = root / "train" / RUN
    assert check_tree(root) == []
    (run / "0" / "000000.pcd").unlink()  # missing file
    data = (run / "1" / "000000.pcd").read_bytes()
    (run / "1" / "000000.pcd").write_bytes(data[: len(data) // 2])  # truncated
    agent = read_agent_frame(run / "0" / "000001.yaml")
    xyz = agent.points[:, :3].copy()
    xyz[3] = np.nan
    write_pcd(run / "0" / "000001.pcd", xyz, agent.points[:, 3])  # NaN point
    (run / "1" / "000001.yaml").write_text((run / "1" / "000001.yaml").read_text().replace("vehicles:", "vehicles: [\n"))
    yaml0 = (run / "1" / "000000.yaml").read_text()
    (run / "1" / "000000.yaml").write_text(yaml0.replace("extent:\n    - ", "extent:\n    - -", 1))  # negative size
    (run / "1" / "000000.npz").write_bytes(b"PK\x03\x04 broken")  # corrupt sidecar
    (run / "0" / "000002.pcd").write_bytes(data)  # a frame without its yaml
    problems = check_tree(root)
    assert detect_format(root) == "native"
    assert messages(problems, run / "0" / "000000.pcd") == ["missing point cloud"]
    assert messages(problems, run / "1" / "000000.pcd")[0].startswith("truncated")
    assert messages(problems, run / "0" / "000001.pcd") == ["1 points with NaN or infinity (first at row 3)"]
    assert messages(problems, run / "1" / "000001.yaml")[0].startswith("bad yaml")
    assert any("non-positive size" in m for m in messages(problems, run / "1" / "000000.yaml"))
    assert messages(problems, run / "1" / "000000.npz")[0].startswith("corrupt or truncated sidecar")
    assert messages(problems, run / "0" / "000002.yaml")[0].startswith("missing: incomplete frame")
    assert messages(problems, run / "1" / "000002.yaml") == []  # only frames some cav completed are expected
    # and converting stops at the first bad file, naming it
    with pytest.raises(FileNotFoundError, match=r"no point cloud file .*0/000000\.pcd"):
        convert(root, "native", tmp_path / "out", "opv2v", progress=False)
    with pytest.raises(ValueError, match=r"1/000000\.pcd: truncated"):
        ov.read_agent(run / "1" / "000000.yaml")
    with pytest.raises(ValueError, match=r"000001\.pcd: 1 points with NaN"):
        ov.read_agent(run / "0" / "000001.yaml")


def test_check_lists_every_problem_of_a_kitti_tree(trees, tmp_path):
    root = writable_copy(trees["kitti"], tmp_path / "kitti")
    split = root / "training"
    assert check_tree(root) == []
    p = kt.kitti_frame_paths
    p(split, 0).velodyne.write_bytes(p(split, 0).velodyne.read_bytes()[:-4])
    points = kt.read_velodyne(p(split, 1).velodyne)
    points[0, 0] = np.inf
    points.tofile(p(split, 1).velodyne)
    p(split, 2).calib.write_text("P0: 1 2 3\n")
    label = p(split, 3).label.read_text().splitlines()
    fields = label[0].split()
    fields[9] = "0.00"  # width
    p(split, 3).label.write_text("\n".join([" ".join(fields), *label[1:]]) + "\n")
    p(split, 2).label.unlink()
    problems = check_tree(root)
    assert messages(problems, p(split, 0).velodyne)[0].startswith("truncated or corrupt: ")
    assert messages(problems, p(split, 1).velodyne) == ["1 points with NaN or infinity (first at row 0)"]
    assert messages(problems, p(split, 2).calib) == [
        "line 1: P0 needs 12 numbers, got 3",
        "missing P0, P1, P2, P3, R0_rect, Tr_velo_to_cam, Tr_imu_to_velo",
    ]
    assert messages(problems, p(split, 2).label)[0].startswith("missing label file")
    assert messages(problems, p(split, 3).label)[0].startswith("line 1: ")
    assert "non-positive size" in messages(problems, p(split, 3).label)[0]
    with pytest.raises(ValueError, match=r"000000\.bin: truncated"):
        convert(root, "kitti", tmp_path / "out", "native", progress=False)


def test_check_lists_problems_of_mmdet3d_and_nuscenes_trees(trees, tmp_path):
    root = writable_copy(trees["mmdet3d"], tmp_path / "mm")
    info_path = root / mi.info_file_name("train")
    infos = mi.read_infos(info_path)
    infos["data_list"][1]["lidar_points"]["lidar_path"] = "999999.bin"
    car = next(i for i, inst in enumerate(infos["data_list"][0]["instances"]) if inst["bbox_label_3d"] >= 0)
    infos["data_list"][0]["instances"][car]["bbox_3d"][3] = -1.0
    mi.write_infos(info_path, infos)
    problems = check_tree(root)
    assert detect_format(root) == "mmdet3d"
    assert messages(problems, info_path) == [f"data_list[0].instances[{car}]: box with non-positive size "
                                             f"{infos['data_list'][0]['instances'][car]['bbox_3d'][3:6]}"]
    assert messages(problems, root / "training" / "velodyne" / "999999.bin")[0].startswith("missing point file")
    info_path.write_bytes(info_path.read_bytes()[:100])
    assert messages(check_tree(root), info_path)[0].startswith("not a readable info pickle")

    nu = writable_copy(trees["nuscenes"], tmp_path / "nu")
    sweep = ns.list_sweeps(nu)[0]
    sweep.write_bytes(sweep.read_bytes()[:-12])
    assert detect_format(nu) == "nuscenes"
    assert messages(check_tree(nu), sweep)[0].startswith("truncated or corrupt")
    with pytest.raises(ValueError, match=sweep.name.replace(".", r"\.")):
        convert(nu, "nuscenes", tmp_path / "out", "kitti", progress=False)
    assert check_tree(tmp_path / "nothing") == [Problem(tmp_path / "nothing", "no such file or folder")]
