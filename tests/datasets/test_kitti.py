"""KITTI object format (datasets/kitti.py): real sample frames, camera <-> LiDAR, precision, bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from datasets import kitti as kt
from sim.box_ops import count_points_in_boxes, points_in_boxes
from sim.geometry import T_from_xyz_rpy, box_corners, transform_boxes, wrap_angle

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.fail(f"shared sample data {path} is missing (see shared/data/README.md); these tests need it")
    return path


@pytest.fixture(scope="module")
def sample() -> Path:
    return shared("kitti_sample")


def label_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# real frames
# --------------------------------------------------------------------------------------------------


def test_reads_the_real_sample_frames(sample):
    assert kt.kitti_split_dirs(sample) == [sample]
    assert kt.list_kitti_frames(sample) == [0, 1, 2]
    sizes = {0: 115_384, 1: 120_268, 2: 126_891}  # from the sample's README
    for index, n in sizes.items():
        frame = kt.read_kitti_frame(sample, index)
        assert frame.points.shape == (n, 4) and frame.points.dtype == np.float32
        lines = label_lines(sample / "label_2" / f"{index:06d}.txt")
        assert frame.labels is not None and len(frame.labels) == len(lines)
        assert frame.labels.types.tolist() == [parts[0] for parts in lines]
        # h w l x y z ry of the file -> x y z l h w ry
        file_values = np.array([[float(v) for v in parts[8:15]] for parts in lines])
        np.testing.assert_array_equal(frame.labels.boxes_camera, file_values[:, [3, 4, 5, 2, 0, 1, 6]])
        calib_lines = dict(line.split(":", 1) for line in (sample / "calib" / f"{index:06d}.txt").read_text().splitlines() if line)
        np.testing.assert_array_equal(frame.calib.P2.reshape(-1), [float(v) for v in calib_lines["P2"].split()])
        assert frame.meta is None


def test_lidar_boxes_agree_with_the_camera_labels(sample):
    """Independent of mmdet3d: the LiDAR bottom centre maps onto the label's (x, y, z) through
    R0_rect @ Tr_velo_to_cam, sizes are (l, w, h), and the heading maps onto KITTI's object x axis
    R_y(ry) @ [1, 0, 0] = (cos ry, 0, -sin ry) in the camera frame (up to the camera's small tilt)."""
    checked = 0
    for index in kt.list_kitti_frames(sample):
        frame = kt.read_kitti_frame(sample, index)
        boxes, _ = frame.boxes_lidar()
        care = frame.labels.select(frame.labels.care)
        T = frame.calib.T_rect_from_velo
        centre_cam = boxes[:, :3] @ T[:3, :3].T + T[:3, 3]
        np.testing.assert_allclose(centre_cam, care.boxes_camera[:, :3], atol=1e-9)
        np.testing.assert_allclose(boxes[:, 3:6], care.boxes_camera[:, [3, 5, 4]], atol=1e-12)
        heading_cam = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(len(boxes))], 1) @ T[:3, :3].T
        ry = care.boxes_camera[:, 6]
        np.testing.assert_allclose(heading_cam, np.stack([np.cos(ry), np.zeros_like(ry), -np.sin(ry)], 1), atol=0.02)
        checked += len(boxes)
    assert checked == 6  # every object but the DontCare regions


def test_projected_3d_boxes_match_the_annotated_image_boxes(sample):
    """The whole chain (calib parsing, camera -> LiDAR -> camera, P2 projection) against the
    annotators' 2D boxes, which are drawn independently of the 3D ones."""
    for index in kt.list_kitti_frames(sample):
        frame = kt.read_kitti_frame(sample, index)
        boxes, _ = frame.boxes_lidar()
        care = frame.labels.select(frame.labels.care)
        bbox, truncated = kt.image_boxes_and_truncation(boxes, frame.calib)
        assert np.abs(bbox - care.bbox).max() < 12.0  # pixels
        np.testing.assert_allclose(truncated, care.truncated, atol=0.05)


def test_real_objects_hold_points_that_lie_inside_them_in_the_camera_frame(sample):
    for index in kt.list_kitti_frames(sample):
        frame = kt.read_kitti_frame(sample, index)
        boxes, _ = frame.boxes_lidar()
        inside = points_in_boxes(frame.points, boxes)  # (N, M)
        assert np.all(inside.sum(0) > 0)
        care = frame.labels.select(frame.labels.care)
        for j in range(len(boxes)):
            pts_cam = frame.calib.points_velo_to_rect(frame.points[inside[:, j]])[:, :3].astype(np.float64)
            x, y, z, length, h, w, ry = care.boxes_camera[j]
            c, s = np.cos(ry), np.sin(ry)
            d = pts_cam - [x, y, z]
            along = c * d[:, 0] - s * d[:, 2]  # object x axis in the camera frame: (cos ry, 0, -sin ry)
            across = s * d[:, 0] + c * d[:, 2]
            tilt = 0.03 * max(length, h)  # the camera's tilt against the LiDAR, a few centimetres
            assert np.all(np.abs(along) <= length / 2 + tilt) and np.all(np.abs(across) <= w / 2 + tilt)
            assert np.all(d[:, 1] <= tilt) and np.all(d[:, 1] >= -h - tilt)  # y points down from the bottom


def test_real_frame_written_and_read_back_unchanged(sample, tmp_path):
    frame = kt.read_kitti_frame(sample, 1)
    out = tmp_path / "training"
    written = kt.write_kitti_frame(out, frame)
    assert written[-1].parent.name == "label_2"  # the label file, the completion mark, last
    paths = kt.kitti_frame_paths(out, 1)
    assert paths.velodyne.read_bytes() == (sample / "velodyne" / "000001.bin").read_bytes()
    back = kt.read_kitti_frame(out, 1)
    for key in ("P0", "P1", "P2", "P3", "R0_rect", "Tr_velo_to_cam", "Tr_imu_to_velo"):
        np.testing.assert_allclose(getattr(back.calib, key), getattr(frame.calib, key), rtol=1e-12, atol=0)
    for name in ("truncated", "occluded", "alpha", "bbox", "boxes_camera"):
        np.testing.assert_array_equal(getattr(back.labels, name), getattr(frame.labels, name))
    # frame 0 has no DontCare lines: its text comes back byte for byte
    kt.write_kitti_frame(out, kt.read_kitti_frame(sample, 0))
    assert paths.label.with_name("000000.txt").read_text() == (sample / "label_2" / "000000.txt").read_text()


# --------------------------------------------------------------------------------------------------
# conversion precision
# --------------------------------------------------------------------------------------------------


def random_boxes(rng: np.random.Generator, m: int) -> np.ndarray:
    return np.column_stack(
        [
            rng.uniform(-60, 60, (m, 2)),
            rng.uniform(-2.5, 0.5, m),
            rng.uniform(3.0, 12.0, m),
            rng.uniform(1.5, 2.6, m),
            rng.uniform(1.4, 3.8, m),
            rng.uniform(-np.pi, np.pi, m),
        ]
    )


@pytest.mark.parametrize("calib_source", ["synthetic", "real"])
def test_lidar_boxes_survive_the_label_text_within_its_precision(sample, calib_source):
    rng = np.random.default_rng(3)
    calib = kt.synthetic_calib() if calib_source == "synthetic" else kt.read_calib(sample / "calib" / "000001.txt")
    boxes = random_boxes(rng, 300)
    labels = kt.labels_from_lidar_boxes(boxes, ["Car"] * len(boxes), calib)
    back_labels, problems = kt.parse_labels(labels.to_text())
    assert problems == []
    back = kt.boxes_camera_to_lidar(back_labels.boxes_camera, calib)
    # 2 decimals: 0.005 per camera coordinate; the synthetic camera maps each LiDAR axis onto one
    # camera axis, a real one mixes them (rotation: at most 0.005 * sqrt(3) per coordinate)
    pos_tol = 0.005 + 1e-9 if calib_source == "synthetic" else 0.005 * np.sqrt(3) + 1e-9
    assert np.abs(back[:, :3] - boxes[:, :3]).max() <= pos_tol
    assert np.abs(back[:, 3:6] - boxes[:, 3:6]).max() <= 0.005 + 1e-9
    assert np.abs(wrap_angle(back[:, 6] - boxes[:, 6])).max() <= 0.005 + 1e-9
    # and the rounding is really there: the text is not exact
    assert np.abs(back[:, :3] - boxes[:, :3]).max() > 1e-4


def test_synthetic_calibration_looks_along_lidar_x():
    calib = kt.synthetic_calib()
    calib.validate()
    ahead = calib.points_velo_to_rect(np.array([[10.0, 0.0, 0.0], [10.0, 1.0, 0.5]]))
    np.testing.assert_allclose(ahead, [[0.0, 0.0, 10.0], [-1.0, -0.5, 10.0]], atol=1e-12)
    uv, depth = calib.project_rect_to_image(ahead)
    np.testing.assert_allclose(depth, [10.0, 10.0])
    np.testing.assert_allclose(uv[0], [609.5593, 172.854])  # principal point
    assert uv[1, 0] < uv[0, 0] and uv[1, 1] < uv[0, 1]  # left and up in the image
    np.testing.assert_allclose(calib.points_rect_to_velo(ahead), [[10.0, 0.0, 0.0], [10.0, 1.0, 0.5]], atol=1e-12)
    text = calib.to_text()
    again, problems = kt.parse_calib(text)
    assert problems == [] and np.array_equal(again.T_rect_from_velo, calib.T_rect_from_velo)


def test_truncation_and_image_boxes():
    calib = kt.synthetic_calib()
    boxes = np.array(
        [
            [15.0, 0.0, -1.7, 4.0, 1.8, 1.5, 0.3],  # straight ahead: fully in the image
            [-15.0, 0.0, -1.7, 4.0, 1.8, 1.5, 0.0],  # behind the camera
            [6.0, 6.0, -1.7, 4.0, 1.8, 1.5, 0.0],  # at the left edge of the field of view
            [0.5, -3.0, -1.7, 4.0, 1.8, 1.5, 0.0],  # beside the camera, crossing its plane
        ]
    )
    bbox, truncated = kt.image_boxes_and_truncation(boxes, calib)
    assert truncated[0] == 0.0 and 0 < bbox[0, 0] < bbox[0, 2] < 1241 and 0 < bbox[0, 1] < bbox[0, 3] < 374
    assert truncated[1] == 1.0 and np.all(bbox[1] == 0)
    assert 0.0 < truncated[2] < 1.0 and bbox[2, 0] == 0.0
    assert truncated[3] > 0.5


def cast_rays(boxes: np.ndarray, n_az: int = 720, n_el: int = 24) -> np.ndarray:
    """Points where rays from the origin first hit axis-aligned (yaw 0) boxes; rays that hit none
    are dropped. A test-only ray caster (slab method), independent of the module."""
    az = np.radians(np.linspace(-180, 180, n_az, endpoint=False))
    el = np.radians(np.linspace(-15, 5, n_el))
    A, E = np.meshgrid(az, el)
    d = np.stack([np.cos(E) * np.cos(A), np.cos(E) * np.sin(A), np.sin(E)], -1).reshape(-1, 3)
    lo = np.stack([boxes[:, 0] - boxes[:, 3] / 2, boxes[:, 1] - boxes[:, 4] / 2, boxes[:, 2]], 1)
    hi = np.stack([boxes[:, 0] + boxes[:, 3] / 2, boxes[:, 1] + boxes[:, 4] / 2, boxes[:, 2] + boxes[:, 5]], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = lo[None] / d[:, None], hi[None] / d[:, None]  # (R, M, 3)
    t_near = np.nanmax(np.minimum(t1, t2), axis=2)
    t_far = np.nanmin(np.maximum(t1, t2), axis=2)
    hit = (t_near <= t_far) & (t_far > 0)
    t = np.where(hit, t_near, np.inf).min(axis=1)
    keep = np.isfinite(t)
    pts = d[keep] * (t[keep, None] + 1e-3)  # a millimetre inside the face that was hit
    return np.column_stack([pts, np.ones(len(pts))]).astype(np.float32)


def test_occlusion_levels_follow_what_the_lidar_saw():
    boxes = np.array(
        [
            [10.0, 0.0, -1.5, 4.0, 2.0, 1.5, 0.0],  # in front
            [20.0, 0.0, -1.5, 4.0, 2.0, 1.5, 0.0],  # right behind it: hidden
            [20.0, 1.8, -1.5, 4.0, 2.0, 1.5, 0.0],  # behind, half beside it: partly hidden
            [0.0, 30.0, -1.5, 4.0, 2.0, 1.5, 0.0],  # alone, to the left
        ]
    )
    points = cast_rays(boxes)
    counts = count_points_in_boxes(points, boxes)
    assert counts[0] > 0 and counts[1] == 0 and counts[2] > 0 and counts[3] > 0
    levels, fraction = kt.occlusion_levels(points, boxes)
    assert levels[0] == 0 and levels[3] == 0 and fraction[0] == 0.0
    assert levels[1] == 2 and fraction[1] == 1.0
    assert levels[2] in (1, 2) and 0.0 < fraction[2] < 1.0
    # a box nobody's ray reached, and nothing in front of it
    levels, _ = kt.occlusion_levels(points[:0], boxes[:1])
    assert levels.tolist() == [3]


def test_labels_from_lidar_boxes_fill_kitti_fields():
    calib = kt.synthetic_calib()
    boxes = np.array([[15.0, 5.0, -1.7, 4.0, 1.8, 1.5, 0.4]])
    labels = kt.labels_from_lidar_boxes(boxes, ["Van"], calib)
    ry = labels.boxes_camera[0, 6]
    assert ry == pytest.approx(-0.4 - np.pi / 2)
    x, z = labels.boxes_camera[0, 0], labels.boxes_camera[0, 2]
    assert labels.alpha[0] == pytest.approx(float(wrap_angle(ry - np.arctan2(x, z))))
    assert labels.types.tolist() == ["Van"] and labels.occluded.tolist() == [3]  # no sweep: unknown
    upright = boxes.copy()
    upright[:, 6] = 0.0  # the test's ray caster knows axis-aligned boxes only
    labels = kt.labels_from_lidar_boxes(upright, ["Van"], calib, visibility_points=cast_rays(upright))
    assert labels.occluded.tolist() == [0]
    with pytest.raises(ValueError, match="types for"):
        kt.labels_from_lidar_boxes(boxes, ["Car", "Car"], calib)


def test_frame_boxes_transform_like_points():
    """A box moved by a pose and a point inside it moved by the same pose stay together."""
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 20)
    corners = box_corners(boxes)  # (M, 8, 3)
    centres = corners.mean(axis=1)
    T = T_from_xyz_rpy(3.0, -2.0, 0.1, 0.0, 0.0, 0.7)
    moved = transform_boxes(T, boxes)
    centres_moved = centres @ T[:3, :3].T + T[:3, 3]
    pts = np.column_stack([centres_moved, np.zeros(len(boxes))]).astype(np.float32)
    assert np.all(np.diag(points_in_boxes(pts, moved)))


# --------------------------------------------------------------------------------------------------
# our additions
# --------------------------------------------------------------------------------------------------


def test_frame_index_and_meta_round_trip(tmp_path):
    entries = [kt.FrameIndexEntry(0, "train", "run_a", 3, 7, "cav"), kt.FrameIndexEntry(1, "val", "run_b", -1, 0, "fused")]
    kt.write_frames_index(tmp_path, entries)
    assert kt.read_frames_index(tmp_path) == entries
    assert kt.read_frames_index(tmp_path / "nothing") is None
    with pytest.raises(ValueError, match="unique"):
        kt.write_frames_index(tmp_path, entries + entries[:1])
    meta = kt.ViewMeta(
        T_world_from_sensor=T_from_xyz_rpy(1.0, 2.0, 3.0, 0.01, -0.02, 1.1),
        T_world_from_agent=T_from_xyz_rpy(1.0, 2.0, 1.0, 0.0, 0.0, 1.1),
        ego_speed_mps=4.25,
        object_ids=np.array([5, 9]),
        kinds=["bus", "car"],
        speeds_mps=np.array([0.1, 1.0 / 3.0]),
        roles=["human", "connected"],
        agent_extent=np.array([4.5, 1.9, 1.5]),
        time_s=float("nan"),
        extra_yaml={"camera0": {"fov": 100}},
    )
    frame = kt.KittiFrame(
        index=4,
        points=np.zeros((3, 4), np.float32),
        calib=kt.synthetic_calib(),
        labels=kt.labels_from_lidar_boxes(random_boxes(np.random.default_rng(1), 2), ["Truck", "Car"], kt.synthetic_calib()),
        meta=meta,
    )
    kt.write_kitti_frame(tmp_path / "training", frame)
    back = kt.read_kitti_frame(tmp_path / "training", 4).meta
    np.testing.assert_array_equal(back.T_world_from_sensor, meta.T_world_from_sensor)  # float repr: exact
    assert back.kinds == ["bus", "car"] and back.roles == ["human", "connected"] and back.time_s is None
    np.testing.assert_array_equal(back.speeds_mps, meta.speeds_mps)
    assert back.extra_yaml == {"camera0": {"fov": 100}}
    frame.meta = kt.ViewMeta(np.eye(4), np.eye(4), 0.0, np.array([1]), ["car"], np.zeros(1))
    with pytest.raises(ValueError, match="label lines"):
        kt.write_kitti_frame(tmp_path / "training", frame)


# --------------------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def copy_of_sample(sample, tmp_path) -> Path:
    out = tmp_path / "kitti"
    shutil.copytree(sample, out)
    for p in out.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return out


def test_truncated_and_non_finite_velodyne_files_are_named(copy_of_sample):
    path = copy_of_sample / "velodyne" / "000001.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-6])
    with pytest.raises(ValueError, match=r"000001\.bin.*truncated"):
        kt.read_velodyne(path)
    points = np.frombuffer(data, dtype=np.float32).reshape(-1, 4).copy()
    points[10, 1] = np.nan
    points[20, 0] = np.inf
    points.tofile(path)
    with pytest.raises(ValueError, match=r"000001\.bin: 2 points with NaN or infinity \(first at row 10\)"):
        kt.read_kitti_frame(copy_of_sample, 1)
    with pytest.raises(FileNotFoundError, match=r"000009\.bin"):
        kt.read_velodyne(copy_of_sample / "velodyne" / "000009.bin")
    with pytest.raises(ValueError, match="NaN"):
        kt.write_velodyne(path, points)


def test_bad_calibration_files_are_named(copy_of_sample):
    path = copy_of_sample / "calib" / "000002.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line for line in lines if not line.startswith("R0_rect")) + "\n")
    with pytest.raises(ValueError, match=r"000002\.txt: bad calibration: missing R0_rect"):
        kt.read_calib(path)
    path.write_text("\n".join([" ".join(lines[0].split()[:4]), *lines[1:]]) + "\n")  # P0 cut to 3 numbers
    assert kt.calib_problems(path) == ["line 1: P0 needs 12 numbers, got 3", "missing P0"]
    path.write_text("\n".join(["P0: nan " + " ".join(lines[0].split()[2:]), *lines[1:]]) + "\n")
    assert kt.calib_problems(path) == ["P0 holds NaN or infinity"]


def test_bad_label_lines_are_all_listed(copy_of_sample):
    path = copy_of_sample / "label_2" / "000001.txt"
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace(" 2.85 2.63 12.34 ", " 2.85 -2.63 12.34 ")  # negative width
    lines[2] = lines[2].replace("Cyclist", "Bicycle")
    lines.append(lines[1].replace("Car 0.00 0", "Car 1.50 0"))
    lines.append(lines[1].replace("Car 0.00 0", "Car 0.00 4"))
    lines[1] = "Car 0.00 0 1.85 387.63 181.54"  # truncated line
    path.write_text("\n".join(lines) + "\n")
    problems = kt.label_problems(path)
    assert problems == [
        "line 1: Truck box with non-positive size h=2.85 w=-2.63 l=12.34",
        "line 2: expected 15 or 16 fields, got 6",
        "line 3: unknown type 'Bicycle'",
        "line 8: truncated must be in [0, 1], got 1.50",
        "line 9: occluded must be 0, 1, 2 or 3, got 4",
    ]
    with pytest.raises(ValueError, match=r"000001\.txt: bad labels: line 1"):
        kt.read_kitti_frame(copy_of_sample, 1)
    labels, _ = kt.parse_labels(path.read_text())
    assert labels.types.tolist() == ["DontCare"] * 4  # the good lines are still parsed
    with pytest.raises(ValueError, match="non-positive size"):
        kt.KittiLabels(
            types=np.array(["Car"]),
            truncated=np.zeros(1),
            occluded=np.zeros(1, np.int64),
            alpha=np.zeros(1),
            bbox=np.zeros((1, 4)),
            boxes_camera=np.array([[0, 0, 10, 4, 0, 2, 0.0]]),
        ).to_text()
