"""OPV2V / V2XSet trees (datasets/opv2v.py): PCD encodings and damage, foreign yaml fields passed
through, derived sidecars, OpenCOOD's ego rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import open3d as o3d
import pytest

from datasets import opv2v as ov
from datasets.native import (
    PCD_ENCODINGS,
    NativeAgentFrame,
    agent_frame_paths,
    read_agent_frame,
    write_pcd,
)
from sim.box_ops import points_in_boxes
from sim.geometry import S_MIRROR_Y, T_from_xyz_yaw, carla_matrix, invert_T, transform_boxes, transform_points
from sim.types import Semantic


def cloud(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    xyz = rng.normal(0, 15, (n, 3)).astype(np.float32)
    return xyz, rng.random(n, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# PCD
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", PCD_ENCODINGS)
def test_every_encoding_reads_back(tmp_path, encoding):
    xyz, red = cloud(np.random.default_rng(1))
    path = write_pcd(tmp_path / "a.pcd", xyz, red, encoding=encoding)
    header = ov.read_pcd_header(path)
    assert header.data == encoding and header.points == len(xyz) and header.fields == ("x", "y", "z", "rgb")
    got_xyz, got_red = ov.read_pcd_points(path)
    if encoding == "ascii":  # Open3D prints 10 significant digits: float32 survives
        np.testing.assert_allclose(got_xyz, xyz, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got_xyz, xyz)
    np.testing.assert_allclose(got_red, np.round(red * 255) / 255, atol=1e-7)
    assert ov.pcd_problems(path) == []
    with pytest.raises(ValueError, match="encoding"):
        write_pcd(tmp_path / "b.pcd", xyz, red, encoding="lzf")


@pytest.mark.parametrize("encoding", PCD_ENCODINGS)
def test_truncated_pcd_is_caught_for_every_encoding(tmp_path, encoding):
    """Open3D reads a truncated ASCII file as the full count (padding it) and a truncated binary
    one as nothing; the header check catches both."""
    xyz, red = cloud(np.random.default_rng(2))
    path = write_pcd(tmp_path / "a.pcd", xyz, red, encoding=encoding)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data) // 3])
    problems = ov.pcd_problems(path)
    assert len(problems) >= 1 and all("truncated" in p for p in problems), problems
    with pytest.raises(ValueError, match=r"a\.pcd: truncated"):
        ov.read_pcd_points(path)


def test_non_finite_points_and_non_pcd_files_are_named(tmp_path):
    xyz, red = cloud(np.random.default_rng(3))
    xyz[5] = [np.nan, 0.0, 1.0]
    xyz[9, 2] = np.inf
    path = write_pcd(tmp_path / "nan.pcd", xyz, red, encoding="binary")
    assert ov.pcd_problems(path) == ["2 points with NaN or infinity (first at row 5)"]
    with pytest.raises(ValueError, match=r"nan\.pcd: 2 points with NaN"):
        ov.read_pcd_points(path)
    junk = tmp_path / "junk.pcd"
    junk.write_bytes(b"\x00\x01 not a point cloud\n" * 5)
    assert ov.pcd_problems(junk) == [f"{junk}: not a PCD file (no DATA line in the header)".removeprefix(f"{junk}: ")]
    with pytest.raises(ValueError, match=r"junk\.pcd: not a PCD file"):
        ov.read_pcd_points(junk)
    lying = tmp_path / "lying.pcd"
    text = write_pcd(tmp_path / "ok.pcd", xyz[:3] * 0, red[:3], encoding="ascii").read_text()
    lying.write_text(text.replace("POINTS 3", "POINTS 4").replace("WIDTH 3", "WIDTH 4"))
    assert ov.pcd_problems(lying) == ["truncated or corrupt: header says 4 points, the file has 3 lines"]


def test_pcd_with_an_intensity_field(tmp_path):
    """Other cooperative datasets store ``x y z intensity``; the intensity is read as stored."""
    xyz, intensity = cloud(np.random.default_rng(4), 50)
    pcd = o3d.t.geometry.PointCloud(o3d.core.Tensor(xyz))
    pcd.point["intensity"] = o3d.core.Tensor(intensity.reshape(-1, 1))
    path = tmp_path / "i.pcd"
    assert o3d.t.io.write_point_cloud(str(path), pcd, write_ascii=False)
    assert "intensity" in ov.read_pcd_header(path).fields
    got_xyz, got_intensity = ov.read_pcd_points(path)
    np.testing.assert_array_equal(got_xyz, xyz)
    np.testing.assert_array_equal(got_intensity, intensity)


# --------------------------------------------------------------------------------------------------
# a foreign OPV2V frame
# --------------------------------------------------------------------------------------------------

OPV2V_YAML = """\
camera0:
  cords: [141.35, -388.0, 1.03, 0.0, -179.6, 0.0]
  extrinsic: [[1.0, 0.0, 0.0, 2.5], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
  intrinsic: [[335.64, 0.0, 400.0], [0.0, 335.64, 300.0], [0.0, 0.0, 1.0]]
ego_speed: 18.13
lidar_pose: [143.85, -388.04, 1.93, 0.02, -179.6, 0.3]
plan_trajectory:
- [141.2, -388.1, 18.1]
- [139.4, -388.1, 18.2]
predicted_ego_pos: [143.9, -387.9, 0.03, 0.0, -179.5, 0.0]
true_ego_pos: [143.85, -388.04, 0.03, 0.0, -179.6, 0.0]
vehicles:
  650:
    angle: [0.0, 90.5, 0.0]
    center: [0.02, 0.0, 0.71]
    extent: [2.45, 1.06, 0.75]
    location: [150.2, -380.7, 0.03]
    speed: 32.4
  1045:
    angle: [0.1, -0.2, -0.3]
    center: [0.0, 0.0, 0.76]
    extent: [2.7, 1.2, 0.78]
    location: [120.9, -391.5, 0.02]
    speed: 0.0
"""


@pytest.fixture
def foreign_run(tmp_path):
    """An OPV2V-like run: cav 1020 with an ASCII pcd written by Open3D's legacy writer (as OpenCDA
    does), camera entries, a trajectory and a noisy predicted pose; no sidecar."""
    run = tmp_path / "train" / "2021_08_18_19_48_05"
    cav_dir = run / "1020"
    cav_dir.mkdir(parents=True)
    (cav_dir / "000068.yaml").write_text(OPV2V_YAML)
    rng = np.random.default_rng(5)
    xyz = rng.normal(0, 10, (300, 3))
    legacy = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    colors = np.zeros((300, 3))
    colors[:, 0] = rng.integers(0, 256, 300) / 255.0
    legacy.colors = o3d.utility.Vector3dVector(colors)
    assert o3d.io.write_point_cloud(str(cav_dir / "000068.pcd"), legacy, write_ascii=True)
    (run / ov.DATA_PROTOCOL_NAME).write_text("world:\n  sync_mode: true\n  fixed_delta_seconds: 0.05\n")
    return run, xyz, colors[:, 0]


def test_foreign_frame_reads_with_opencood_meaning(foreign_run):
    run, xyz, red = foreign_run
    agent = ov.read_agent(run / "1020" / "000068.yaml")
    assert agent.instance_id is None and agent.kinds is None  # no sidecar
    # points: CARLA's left-handed sensor frame mirrored into ours
    np.testing.assert_allclose(agent.points[:, :3], xyz * [1, -1, 1], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(agent.points[:, 3], red, atol=1e-6)
    # x_to_world of OpenCOOD, seen through the mirror
    np.testing.assert_allclose(
        S_MIRROR_Y @ agent.T_world_from_sensor @ S_MIRROR_Y, carla_matrix(143.85, -388.04, 1.93, 0.02, -179.6, 0.3), atol=1e-9
    )
    np.testing.assert_allclose(
        S_MIRROR_Y @ agent.T_world_from_agent_predicted @ S_MIRROR_Y, carla_matrix(143.9, -387.9, 0.03, 0.0, -179.5, 0.0), atol=1e-9
    )
    assert agent.vehicle_ids.tolist() == [650, 1045]
    # a box at location + center: vehicle 650's centre (150.22, -380.7, 0.74) -> ours (y flipped), bottom at 0.74 - 0.75
    np.testing.assert_allclose(agent.boxes_world[0, :6], [150.22, 380.7, -0.01, 4.9, 2.12, 1.5], atol=1e-9)
    assert agent.boxes_world[0, 6] == pytest.approx(np.radians(-90.5))
    assert agent.vehicle_speed_mps[0] == pytest.approx(9.0)
    assert set(agent.extra_yaml) == {"camera0", "plan_trajectory"}
    assert ov.read_data_protocol(run) == {"world": {"sync_mode": True, "fixed_delta_seconds": 0.05}}


def test_foreign_frame_written_again_keeps_what_opv2v_holds(foreign_run, tmp_path):
    run, _, _ = foreign_run
    agent = ov.read_agent(run / "1020" / "000068.yaml")
    out_run = tmp_path / "out" / "train" / run.name
    written = ov.write_agent_frame(out_run, agent, sidecar=False, pcd_encoding="binary_compressed")
    assert [p.suffix for p in written] == [".pcd", ".yaml"]
    assert ov.copy_data_protocol(run, out_run).read_bytes() == (run / ov.DATA_PROTOCOL_NAME).read_bytes()
    back = read_agent_frame(out_run / "1020" / "000068.yaml")
    np.testing.assert_array_equal(back.points, agent.points)  # float32 xyz, 8-bit intensity: both exact
    for name in ("T_world_from_sensor", "T_world_from_agent", "T_world_from_agent_predicted"):
        np.testing.assert_allclose(getattr(back, name), getattr(agent, name), atol=1e-9)
    np.testing.assert_allclose(back.boxes_world, agent.boxes_world, atol=1e-9)
    np.testing.assert_allclose(back.vehicle_speed_mps, agent.vehicle_speed_mps, atol=1e-12)
    assert back.extra_yaml == agent.extra_yaml and back.ego_speed_mps == pytest.approx(agent.ego_speed_mps)
    # with a sidecar: the derived fields come back
    full = ov.complete_agent(agent, [1020])
    ov.write_agent_frame(out_run, full, sidecar=True)
    again = read_agent_frame(out_run / "1020" / "000068.yaml")
    np.testing.assert_array_equal(again.num_points, full.num_points)
    assert again.kinds == ["car", "car"] and again.roles == ["unknown", "unknown"] and np.isnan(again.time_s)
    # and rewriting as plain OPV2V withdraws the sidecar, which would no longer match
    ov.write_agent_frame(out_run, agent, sidecar=False)
    assert not agent_frame_paths(out_run, 1020, 68).sidecar.exists()


def test_bad_yaml_and_bad_pcd_are_named(foreign_run):
    run, _, _ = foreign_run
    yaml_path = run / "1020" / "000068.yaml"
    pcd_path = yaml_path.with_suffix(".pcd")
    data = pcd_path.read_bytes()
    pcd_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"1020/000068\.pcd: truncated"):
        ov.read_agent(yaml_path)
    pcd_path.write_bytes(data)
    yaml_path.write_text(OPV2V_YAML.replace("  650:\n    angle: [0.0, 90.5, 0.0]", "  650:\n    angle: 7"))
    with pytest.raises(ValueError, match=r"000068\.yaml: vehicle 650 has bad fields"):
        ov.read_agent(yaml_path)
    pcd_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"000068\.pcd"):
        ov.read_agent(yaml_path)
    (run / ov.DATA_PROTOCOL_NAME).write_text("world: [unclosed\n")
    with pytest.raises(ValueError, match=r"data_protocol\.yaml: bad yaml"):
        ov.read_data_protocol(run)


# --------------------------------------------------------------------------------------------------
# derived sidecars and ids
# --------------------------------------------------------------------------------------------------


def two_cav_frame() -> dict[int, NativeAgentFrame]:
    """Cavs 3 and -1 (a road-side unit); vehicles 3, 7 and 9 with points inside 7 and 9 for cav 3."""
    boxes_world = {3: [5.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0], 7: [20.0, 5.0, 0.0, 4.0, 2.0, 1.5, 0.5], 9: [10.0, -8.0, 0.0, 10.0, 2.5, 3.0, 0.0]}
    T_sensor = {3: T_from_xyz_yaw(5.0, 0.0, 1.8, 0.0), -1: T_from_xyz_yaw(0.0, 0.0, 5.0, 0.3)}
    frames = {}
    for cav, others in ((3, [7, 9]), (-1, [3, 7, 9])):
        boxes = np.array([boxes_world[v] for v in others])
        sensor_boxes = transform_boxes(invert_T(T_sensor[cav]), boxes)
        centres = sensor_boxes[:, :3] + [0, 0, 0.5]  # inside each box, above its bottom
        far = np.array([[0.0, 40.0, -1.0], [-30.0, 0.0, -1.7]])
        xyz = np.concatenate([centres, centres + 0.1, far])
        points = np.column_stack([xyz, np.linspace(0, 1, len(xyz))]).astype(np.float32)
        frames[cav] = NativeAgentFrame(
            cav_id=cav,
            frame=0,
            points=points,
            instance_id=None,
            semantic=None,
            T_world_from_sensor=T_sensor[cav],
            T_world_from_agent=T_sensor[cav] @ T_from_xyz_yaw(0.0, 0.0, -1.8, 0.0),
            ego_speed_mps=2.0,
            vehicle_ids=np.array(others, dtype=np.int64),
            boxes_world=boxes,
            vehicle_speed_mps=np.zeros(len(others)),
        )
    return frames


def test_complete_agent_derives_labels_from_boxes():
    frames = two_cav_frame()
    cav = ov.complete_agent(frames[3], [3, -1], frames)
    assert cav.num_points.tolist() == [2, 2]
    assert cav.instance_id.tolist() == [7, 9, 7, 9, -1, -1]
    boxes_sensor = transform_boxes(invert_T(cav.T_world_from_sensor), cav.boxes_world)
    inside = points_in_boxes(cav.points, boxes_sensor)
    np.testing.assert_array_equal(cav.instance_id >= 0, inside.any(axis=1))  # same rule as mmcv's
    assert cav.semantic.tolist() == [Semantic.CAR] * 4 + [Semantic.NONE] * 2
    assert cav.kinds == ["car", "car"] and cav.roles == ["unknown", "unknown"]
    np.testing.assert_array_equal(cav.agent_extent, [4.0, 2.0, 1.5])  # from the RSU's listing of cav 3
    assert cav.agent_kind == "car" and cav.scene_ego_id == 3 and np.isnan(cav.time_s)
    rsu = ov.complete_agent(frames[-1], [3, -1], frames)
    assert rsu.agent_kind == ov.RSU_KIND and np.all(np.isnan(rsu.agent_extent))
    assert rsu.roles == ["connected", "unknown", "unknown"]
    # what is known is kept
    known = dataclasses.replace(frames[3], kinds=["bus", "van"], num_points=np.array([5, 0], np.int32))
    kept = ov.complete_agent(known, [3])
    assert kept.kinds == ["bus", "van"] and kept.num_points.tolist() == [5, 0]
    assert kept.semantic.tolist()[:2] == [Semantic.BUS, Semantic.CAR]  # a van is a car to CARLA
    assert list(ov.sidecar_arrays(kept)) == list(ov.SIDECAR_KEYS)
    with pytest.raises(ValueError, match="no instance_id"):
        ov.sidecar_arrays(frames[3])


def test_opencood_ego_is_the_first_folder_name_and_never_a_road_side_unit():
    assert ov.opencood_ego_id([650, 1045, 2000]) == 1045  # "1045" < "2000" < "650"
    assert ov.opencood_ego_id([-1, 641, -2]) == 641
    assert ov.opencood_ego_id([-5, -1]) == -1
    with pytest.raises(ValueError):
        ov.opencood_ego_id([])


def test_points_go_through_the_mirror_once(tmp_path):
    frames = two_cav_frame()
    full = ov.complete_agent(frames[3], [3, -1], frames)
    ov.write_agent_frame(tmp_path, full, sidecar=True, pcd_encoding="binary")
    pcd = o3d.io.read_point_cloud(str(agent_frame_paths(tmp_path, 3, 0).pcd))
    np.testing.assert_array_equal(np.asarray(pcd.points, dtype=np.float32), transform_points(S_MIRROR_Y, full.points)[:, :3])
    back = read_agent_frame(agent_frame_paths(tmp_path, 3, 0).yaml)
    np.testing.assert_array_equal(back.points, full.points)  # intensity from the sidecar: exact
    np.testing.assert_array_equal(back.instance_id, full.instance_id)
