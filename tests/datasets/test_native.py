"""The native OPV2V-layout format (datasets/native.py): round trips, OPV2V meaning, atomicity."""

from __future__ import annotations

import dataclasses

import numpy as np
import open3d as o3d
import pytest
import yaml

import datasets.native as native
from datasets.io import is_temporary
from datasets.native import (
    Manifest,
    counts_of_scene_frame,
    find_runs,
    frame_complete,
    lidar_dict,
    list_cavs,
    list_frames,
    list_runs,
    list_splits,
    read_agent_frame,
    read_manifest,
    run_path,
    start_run,
    write_manifest,
    write_scene_frame,
)
from sim.geometry import (
    S_MIRROR_Y,
    T_from_xyz_rpy,
    T_from_xyz_yaw,
    box_corners,
    carla_matrix,
    wrap_angle,
)
from sim.types import ActorKind, AgentState, LidarConfig, LidarScan, Role, SceneFrame, Semantic

CAV_IDS = (1, 4, 9)


def make_scene_frame(rng: np.random.Generator, frame: int = 7, n_points: int = 500) -> SceneFrame:
    """A hand-built frame: three connected vehicles (tilted, to exercise roll and pitch) and four
    other vehicles of every kind, random points and labels."""
    agents = []
    specs = [
        (1, ActorKind.CAR, Role.CONNECTED),
        (2, ActorKind.VAN, Role.HUMAN),
        (4, ActorKind.CAR, Role.CONNECTED),
        (5, ActorKind.TRUCK, Role.PARKED),
        (6, ActorKind.BUS, Role.HUMAN),
        (8, ActorKind.CAR, Role.HUMAN),
        (9, ActorKind.VAN, Role.CONNECTED),
    ]
    for agent_id, kind, role in specs:
        x, y = rng.uniform(-60, 60, 2)
        yaw = rng.uniform(-np.pi, np.pi)
        if role is Role.CONNECTED:
            roll, pitch = rng.uniform(-0.05, 0.05, 2)
            T = T_from_xyz_rpy(x, y, rng.uniform(0, 0.5), roll, pitch, yaw)
        else:
            T = T_from_xyz_yaw(x, y, rng.uniform(0, 0.5), yaw)
        extent = {
            "car": [4.5, 1.9, 1.5],
            "van": [5.2, 2.0, 2.2],
            "truck": [8.0, 2.5, 3.4],
            "bus": [12.0, 2.6, 3.2],
        }
        agents.append(
            AgentState(
                id=agent_id,
                kind=kind,
                role=role,
                T_world_from_agent=T,
                velocity=rng.normal(0, 5, 3) * (role is not Role.PARKED),
                extent=np.array(extent[kind.value]) * rng.uniform(0.9, 1.1),
            )
        )
    scans, points_in_box = {}, {}
    ids = np.array([a.id for a in agents])
    semantic_values = np.array([s.value for s in Semantic], dtype=np.uint8)
    for agent in agents:
        if not agent.connected:
            continue
        n = n_points + int(rng.integers(0, 50))
        points = np.empty((n, 4), dtype=np.float32)
        points[:, :3] = rng.normal(0, 20, (n, 3)).astype(np.float32)
        points[:, 3] = rng.random(n, dtype=np.float32)
        T_agent_from_sensor = T_from_xyz_rpy(0.2, 0.0, agent.extent[2] + 0.3, 0.0, 0.0, 0.0)
        scans[agent.id] = LidarScan(
            agent_id=agent.id,
            points=points,
            instance_id=rng.choice(np.append(ids, -1), n).astype(np.int32),
            semantic=rng.choice(semantic_values, n),
            T_world_from_sensor=agent.T_world_from_agent @ T_agent_from_sensor,
            config=LidarConfig(),
        )
        counts = rng.integers(0, 40, len(agents)).astype(np.int32)
        counts[rng.random(len(agents)) < 0.3] = 0
        counts[ids == agent.id] = 0
        points_in_box[agent.id] = counts
    scene = SceneFrame(
        frame=frame,
        time_s=frame * 0.1,
        agents=agents,
        scans=scans,
        points_in_box=points_in_box,
        scenario="hand_built",
        ego_id=4,
    )
    scene.validate()
    return scene


@pytest.fixture
def scene():
    return make_scene_frame(np.random.default_rng(42))


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------------


def test_round_trip(tmp_path, scene):
    written = write_scene_frame(tmp_path, "train", "run_a", scene)
    assert len(written) == 3 * len(CAV_IDS)
    assert [p.suffix for p in written[:3]] == [".pcd", ".npz", ".yaml"]  # the yaml last
    run = run_path(tmp_path, "train", "run_a")
    boxes_all = scene.boxes_world
    for cav_id in CAV_IDS:
        agent, scan = scene.agent(cav_id), scene.scans[cav_id]
        got = read_agent_frame(run / str(cav_id) / "000007.yaml")
        assert (got.cav_id, got.frame) == (cav_id, 7)
        np.testing.assert_allclose(got.T_world_from_sensor, scan.T_world_from_sensor, atol=1e-9, rtol=0)
        np.testing.assert_allclose(got.T_world_from_agent, agent.T_world_from_agent, atol=1e-9, rtol=0)
        assert got.ego_speed_mps == pytest.approx(agent.speed, abs=1e-12)
        assert got.points.dtype == np.float32
        np.testing.assert_array_equal(got.points, scan.points)
        np.testing.assert_array_equal(got.instance_id, scan.instance_id)
        np.testing.assert_array_equal(got.semantic, scan.semantic)
        others = [i for i, a in enumerate(scene.agents) if a.id != cav_id]
        np.testing.assert_array_equal(got.vehicle_ids, scene.agent_ids[others])
        expected = boxes_all[others]
        np.testing.assert_allclose(got.boxes_world[:, :6], expected[:, :6], atol=1e-5, rtol=0)
        np.testing.assert_allclose(wrap_angle(got.boxes_world[:, 6] - expected[:, 6]), 0.0, atol=1e-6)
        np.testing.assert_allclose(got.vehicle_speed_mps, [scene.agents[i].speed for i in others], atol=1e-9)
        np.testing.assert_array_equal(got.num_points, scene.points_in_box[cav_id][others])
        assert got.kinds == [scene.agents[i].kind.value for i in others]
        assert got.roles == [scene.agents[i].role.value for i in others]
        assert got.agent_kind == agent.kind.value
        np.testing.assert_array_equal(got.agent_extent, agent.extent)
        np.testing.assert_allclose(got.agent_box_world, agent.box, atol=1e-9)
        assert got.time_s == scene.time_s and got.scene_ego_id == scene.ego_id
        assert got.extra_yaml == {}


def test_yaml_has_opv2v_meaning(tmp_path, scene):
    """Check the OPV2V fields with OpenCOOD's own recipe (carla_matrix = x_to_world, location +
    center, create_bbx corners) against our right-handed values mirrored in y."""
    write_scene_frame(tmp_path, "train", "run_a", scene)
    cav_id = 4
    cav_dir = run_path(tmp_path, "train", "run_a") / str(cav_id)
    with open(cav_dir / "000007.yaml") as f:
        doc = yaml.safe_load(f)  # plain PyYAML reads every number as a float
    assert set(doc) == {"ego_speed", "lidar_pose", "predicted_ego_pos", "true_ego_pos", "vehicles"}
    for key in ("lidar_pose", "true_ego_pos", "predicted_ego_pos"):
        assert len(doc[key]) == 6 and all(type(v) is float for v in doc[key])
    agent, scan = scene.agent(cav_id), scene.scans[cav_id]

    # Points: OpenCOOD's pcd_to_np, then x_to_world(lidar_pose), lands where our pose puts them.
    pcd = o3d.io.read_point_cloud(str(cav_dir / "000007.pcd"))
    xyz_pcd = np.asarray(pcd.points)
    world_opv2v = (
        xyz_pcd @ carla_matrix(*doc["lidar_pose"])[:3, :3].T + carla_matrix(*doc["lidar_pose"])[:3, 3]
    )
    world_ours = scan.points[:, :3].astype(np.float64) @ scan.T_world_from_sensor[:3, :3].T
    world_ours += scan.T_world_from_sensor[:3, 3]
    np.testing.assert_allclose(world_opv2v, world_ours @ S_MIRROR_Y[:3, :3], atol=1e-4)
    intensity_8bit = np.asarray(pcd.colors)[:, 0]
    np.testing.assert_allclose(intensity_8bit, scan.points[:, 3], atol=1.0 / 255 + 1e-6)
    assert np.all(np.asarray(pcd.colors)[:, 1:] == 0)

    # Vehicle pose: x_to_world(true_ego_pos) is our pose seen through the mirror.
    np.testing.assert_allclose(
        carla_matrix(*doc["true_ego_pos"]), S_MIRROR_Y @ agent.T_world_from_agent @ S_MIRROR_Y, atol=1e-9
    )
    assert doc["ego_speed"] == pytest.approx(3.6 * np.linalg.norm(agent.velocity[:2]))

    # Vehicles: every other vehicle, the cav itself excluded, other cavs included.
    assert sorted(doc["vehicles"]) == [a.id for a in scene.agents if a.id != cav_id]
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    for other in scene.agents:
        if other.id == cav_id:
            continue
        v = doc["vehicles"][other.id]
        assert v["speed"] == pytest.approx(3.6 * np.linalg.norm(other.velocity[:2]))
        np.testing.assert_allclose(v["extent"], other.extent / 2, atol=1e-12)
        pose = [*(np.add(v["location"], v["center"])), *v["angle"]]
        corners_carla = (signs * v["extent"]) @ carla_matrix(*pose)[:3, :3].T + carla_matrix(*pose)[:3, 3]
        corners_ours = box_corners(other.box[None])[0] @ S_MIRROR_Y[:3, :3]  # (8, 3) mirrored
        d = np.linalg.norm(corners_carla[:, None] - corners_ours[None], axis=-1)
        assert d.min(axis=1).max() < 1e-9  # the same 8 corners
        # the actor origin (``location``) is the bottom centre, on the ground
        np.testing.assert_allclose(v["location"], other.T_world_from_agent[:3, 3] * [1, -1, 1], atol=1e-9)


def test_output_is_byte_identical(tmp_path, scene):
    write_scene_frame(tmp_path / "a", "train", "run", scene)
    write_scene_frame(tmp_path / "b", "train", "run", scene)
    first = _files(tmp_path / "a")
    assert first == _files(tmp_path / "b")
    assert len(first) == 9
    write_scene_frame(tmp_path / "a", "train", "run", scene)  # rewriting in place changes nothing
    assert _files(tmp_path / "a") == first


def test_interrupted_write_leaves_no_yaml_and_rerun_completes(tmp_path, scene, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed after the pcd")

    with monkeypatch.context() as m:
        m.setattr(native, "write_npz_deterministic", crash)
        with pytest.raises(RuntimeError, match="killed"):
            write_scene_frame(tmp_path, "train", "run", scene)
    run = run_path(tmp_path, "train", "run")
    first_cav = run / str(CAV_IDS[0])
    assert (first_cav / "000007.pcd").is_file()
    assert not (first_cav / "000007.yaml").exists()
    assert not any(is_temporary(p) for p in run.rglob("*"))
    assert not frame_complete(tmp_path, "train", "run", list(CAV_IDS), 7)
    assert list_frames(run, list(CAV_IDS)) == []

    write_scene_frame(tmp_path, "train", "run", scene)
    assert frame_complete(tmp_path, "train", "run", list(CAV_IDS), 7)
    write_scene_frame(tmp_path / "clean", "train", "run", scene)
    assert _files(run) == _files(run_path(tmp_path / "clean", "train", "run"))

    with monkeypatch.context() as m:  # an interrupted rewrite withdraws the frame until redone
        m.setattr(native, "write_npz_deterministic", crash)
        with pytest.raises(RuntimeError, match="killed"):
            write_scene_frame(tmp_path, "train", "run", scene)
    assert not frame_complete(tmp_path, "train", "run", list(CAV_IDS), 7)


# --------------------------------------------------------------------------------------------------
# reading files that are not ours
# --------------------------------------------------------------------------------------------------


def test_legacy_ascii_pcd_reads(tmp_path, scene):
    write_scene_frame(tmp_path, "train", "run", scene)
    cav_dir = run_path(tmp_path, "train", "run") / "9"
    scan = scene.scans[9]
    legacy = o3d.geometry.PointCloud()
    legacy.points = o3d.utility.Vector3dVector(scan.points[:, :3].astype(np.float64) * [1, -1, 1])
    colors = np.zeros((len(scan.points), 3))
    colors[:, 0] = scan.points[:, 3]
    legacy.colors = o3d.utility.Vector3dVector(colors)
    assert o3d.io.write_point_cloud(str(cav_dir / "000007.pcd"), legacy, write_ascii=True)
    assert b"DATA ascii" in (cav_dir / "000007.pcd").read_bytes()[:400]

    with_sidecar = read_agent_frame(cav_dir / "000007.yaml")
    np.testing.assert_allclose(with_sidecar.points[:, :3], scan.points[:, :3], atol=1e-4)
    np.testing.assert_array_equal(with_sidecar.points[:, 3], scan.points[:, 3])

    (cav_dir / "000007.npz").unlink()
    plain = read_agent_frame(cav_dir / "000007.yaml")
    np.testing.assert_allclose(plain.points[:, :3], scan.points[:, :3], atol=1e-4)
    np.testing.assert_allclose(plain.points[:, 3], scan.points[:, 3], atol=1.0 / 255 + 1e-6)
    assert plain.instance_id is None and plain.semantic is None and plain.num_points is None
    assert plain.kinds is None and plain.agent_extent is None and plain.agent_box_world is None
    np.testing.assert_allclose(plain.T_world_from_sensor, scan.T_world_from_sensor, atol=1e-9)


def test_foreign_opv2v_yaml(tmp_path):
    """OPV2V-style yaml: another location/center split, 1e-5 style floats, camera keys."""
    cav_dir = tmp_path / "2021_08_16_22_26_54" / "641"
    cav_dir.mkdir(parents=True)
    (cav_dir / "000068.yaml").write_text(
        "camera0:\n  cords: [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]\n"
        "ego_speed: 36.0\n"
        "lidar_pose: [10.0, 20.0, 1.9, 0.0, 90.0, 0.0]\n"
        "plan_trajectory:\n- [1.0, 2.0, 3.0]\n"
        "predicted_ego_pos: [10.0, 20.0, 0.03, 0.0, 90.0, 0.0]\n"
        "true_ego_pos: [10.0, 20.0, 0.03, 0.0, 90.0, 0.0]\n"
        "vehicles:\n"
        "  4796:\n"
        "    angle: [0.0, -30.0, 0.0]\n"
        "    center: [1e-5, 0.0, 0.71]\n"
        "    extent: [2.45, 1.06, 0.75]\n"
        "    location: [158.55, -385.75, 0.032]\n"
        "    speed: 18.0\n"
    )
    xyz = np.array([[1.0, 2.0, 0.5], [-3.0, 4.0, -1.0]])
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    pcd.colors = o3d.utility.Vector3dVector([[0.2, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert o3d.io.write_point_cloud(str(cav_dir / "000068.pcd"), pcd, write_ascii=True)

    got = read_agent_frame(cav_dir / "000068.yaml")
    assert (got.cav_id, got.frame) == (641, 68)
    assert got.ego_speed_mps == pytest.approx(10.0)
    assert got.vehicle_speed_mps.tolist() == pytest.approx([5.0])
    # centre at location + center, mirrored; bottom = centre z - extent z; yaw = -(-30 deg)
    np.testing.assert_allclose(
        got.boxes_world[0],
        [158.55001, 385.75, 0.032 + 0.71 - 0.75, 4.9, 2.12, 1.5, np.radians(30.0)],
        atol=1e-9,
    )
    np.testing.assert_allclose(got.points[:, :3], xyz * [1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(got.points[:, 3], [0.2, 1.0], atol=1.0 / 255)
    assert set(got.extra_yaml) == {"camera0", "plan_trajectory"}
    # sensor yaw +90 deg in CARLA (towards +y right) is -90 deg in our frame
    np.testing.assert_allclose(got.T_world_from_sensor[:3, 0], [0.0, -1.0, 0.0], atol=1e-12)
    assert find_runs(tmp_path) == [tmp_path / "2021_08_16_22_26_54"]


def test_bad_inputs(tmp_path, scene):
    with pytest.raises(FileNotFoundError):
        read_agent_frame(tmp_path / "1" / "000000.yaml")
    bad = dataclasses.replace(scene, scans=dict(scene.scans))
    bad.scans[1] = dataclasses.replace(scene.scans[1], points=scene.scans[1].points.astype(np.float64))
    with pytest.raises(ValueError, match="float32"):
        write_scene_frame(tmp_path, "train", "run", bad)
    nan_pose = make_scene_frame(np.random.default_rng(1))
    nan_pose.agents[0].T_world_from_agent[0, 3] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        write_scene_frame(tmp_path, "train", "run", nan_pose)
    assert list(tmp_path.rglob("*.*")) == []  # checked before any file was written
    with pytest.raises(ValueError, match="folder name"):
        run_path(tmp_path, "../x", "run")
    (tmp_path / "x" / "3").mkdir(parents=True)
    (tmp_path / "x" / "3" / "000001.yaml").write_text("vehicles: {}\n")
    with pytest.raises(ValueError, match="lidar_pose"):
        read_agent_frame(tmp_path / "x" / "3" / "000001.yaml")


def test_empty_scan_round_trips(tmp_path):
    scene = make_scene_frame(np.random.default_rng(3), n_points=0)
    scan = scene.scans[1]
    scene.scans[1] = dataclasses.replace(
        scan, points=scan.points[:0], instance_id=scan.instance_id[:0], semantic=scan.semantic[:0]
    )
    write_scene_frame(tmp_path, "val", "run", scene)
    got = read_agent_frame(run_path(tmp_path, "val", "run") / "1" / "000007.yaml")
    assert got.points.shape == (0, 4) and got.instance_id.shape == (0,)


# --------------------------------------------------------------------------------------------------
# listings and the manifest
# --------------------------------------------------------------------------------------------------


def test_listings(tmp_path):
    rng = np.random.default_rng(5)
    for run in ("run_b", "run_a"):
        for f in (0, 1, 2):
            write_scene_frame(tmp_path, "train", run, make_scene_frame(rng, frame=f, n_points=20))
    write_scene_frame(tmp_path, "test", "run_c", make_scene_frame(rng, frame=0, n_points=20))
    (run_path(tmp_path, "train", "run_a") / "4" / "000001.yaml").unlink()  # cav 4 lacks frame 1

    assert list_splits(tmp_path) == ["test", "train"]
    assert list_runs(tmp_path, "train") == ["run_a", "run_b"]
    run_a = run_path(tmp_path, "train", "run_a")
    assert list_cavs(run_a) == list(CAV_IDS)
    assert list_frames(run_a) == [0, 2]
    assert list_frames(run_a, [1, 9]) == [0, 1, 2]
    assert find_runs(tmp_path) == [
        run_path(tmp_path, "test", "run_c"),
        run_a,
        run_path(tmp_path, "train", "run_b"),
    ]
    assert find_runs(tmp_path / "train") == [run_a, run_path(tmp_path, "train", "run_b")]
    assert find_runs(run_a) == [run_a]


def _manifest(seed=7, frames=5):
    return Manifest(
        scenario="hand_built",
        seed=seed,
        frames=frames,
        cavs=list(CAV_IDS),
        lidar=lidar_dict(LidarConfig()),
        dt=0.1,
    )


def test_manifest_round_trip_and_identity_check(tmp_path):
    m = _manifest()
    m.counts.add(counts_of_scene_frame(make_scene_frame(np.random.default_rng(0))))
    write_manifest(tmp_path / "run", m)
    got = read_manifest(tmp_path / "run")
    assert got == m
    assert got.created_by.startswith("coopstack ")
    text = (tmp_path / "run" / "manifest.yaml").read_bytes()
    write_manifest(tmp_path / "run", got)
    assert (tmp_path / "run" / "manifest.yaml").read_bytes() == text
    with pytest.raises(ValueError, match="seed"):
        write_manifest(tmp_path / "run", _manifest(seed=8))
    with pytest.raises(ValueError, match="dt"):
        write_manifest(tmp_path / "other", dataclasses.replace(_manifest(), dt=0.0))


def test_start_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    frames = [make_scene_frame(rng, frame=f, n_points=30) for f in range(5)]

    manifest, done = start_run(tmp_path, "train", "run", _manifest())
    assert done == [] and manifest.counts.frames_written == 0
    for frame in frames[:3]:
        write_scene_frame(tmp_path, "train", "run", frame)
        manifest.counts.add(counts_of_scene_frame(frame))
        write_manifest(run_path(tmp_path, "train", "run"), manifest)
    with monkeypatch.context() as m:  # the process dies half-way through frame 3
        m.setattr(native, "atomic_write_text", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            write_scene_frame(tmp_path, "train", "run", frames[3])

    manifest, done = start_run(tmp_path, "train", "run", _manifest())
    assert done == [0, 1, 2]
    expected = native.ManifestCounts()
    for frame in frames[:3]:
        expected.add(counts_of_scene_frame(frame))
    assert manifest.counts == expected
    assert expected.boxes == {"bus": 3, "car": 9, "truck": 3, "van": 6}
    for frame in frames:
        if frame.frame not in done:
            write_scene_frame(tmp_path, "train", "run", frame)
            manifest.counts.add(counts_of_scene_frame(frame))
            write_manifest(run_path(tmp_path, "train", "run"), manifest)
    assert list_frames(run_path(tmp_path, "train", "run")) == [0, 1, 2, 3, 4]
    assert read_manifest(run_path(tmp_path, "train", "run")).counts.frames_written == 5
    assert native.recount_run(run_path(tmp_path, "train", "run")) == manifest.counts
    with pytest.raises(ValueError, match="other settings"):
        start_run(tmp_path, "train", "run", _manifest(frames=6))
