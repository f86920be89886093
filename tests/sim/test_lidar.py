"""Tests of the ray-cast LiDAR: ray pattern, geometry of hits, CARLA's drop-off and noise, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sim.geometry import T_from_xyz_yaw, box_corners, invert_T, transform_points
from sim.lidar import (
    LIDAR_PRESETS,
    StaticGeometry,
    box_triangles,
    cast_lidar,
    lidar_preset,
    ray_directions,
)
from sim.types import LidarConfig, Semantic

NO_BOXES = np.zeros((0, 7))
NO_IDS = np.zeros(0, dtype=np.int64)
NO_SEM = np.zeros(0, dtype=np.uint8)


def ideal(config: LidarConfig, **changes) -> LidarConfig:
    """``config`` without drop-off or noise (every traced hit within range is returned)."""
    fields = {"dropoff_general_rate": 0.0, "dropoff_zero_intensity": 0.0, "noise_stddev": 0.0}
    return dataclasses.replace(config, **{**fields, **changes})


def sweep(channels: int, columns: int, lower: float, upper: float, **kw) -> LidarConfig:
    """A full-turn sensor with the given ray pattern, one sweep per call."""
    return LidarConfig(
        channels=channels,
        points_per_second=channels * columns * 10,
        rotation_frequency=10.0,
        lower_fov=lower,
        upper_fov=upper,
        **kw,
    )


def big_ground(z: float = 0.0) -> StaticGeometry:
    return StaticGeometry.ground_plane(-2000.0, 2000.0, -2000.0, 2000.0, z=z)


def elevations_of(config: LidarConfig) -> np.ndarray:
    """(channels * columns,) elevation of each ray, radians, from the ray pattern itself."""
    d = ray_directions(config).astype(np.float64)
    return np.arcsin(np.clip(d[:, 2], -1.0, 1.0))


# --------------------------------------------------------------------------------------------------
# presets and ray pattern
# --------------------------------------------------------------------------------------------------


def test_presets_are_valid_and_have_documented_sizes():
    for config in LIDAR_PRESETS.values():
        config.validate()
    hdl64 = lidar_preset("hdl64")
    assert (hdl64.channels, hdl64.columns, hdl64.range) == (64, 2048, 120.0)
    assert (hdl64.upper_fov, hdl64.lower_fov) == (2.0, -24.9)
    vlp16 = lidar_preset("vlp16")
    assert (vlp16.channels, vlp16.columns, vlp16.upper_fov, vlp16.lower_fov) == (16, 1800, 15.0, -15.0)
    tiny = lidar_preset("tiny")
    assert (tiny.channels, tiny.columns, tiny.range) == (16, 256, 60.0)
    assert lidar_preset("opv2v").range == 120.0


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        lidar_preset("hdl32")
    for name in LIDAR_PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", sorted(LIDAR_PRESETS))
def test_ray_directions_unit_count_and_elevations(name):
    config = lidar_preset(name)
    d = ray_directions(config)
    assert d.dtype == np.float32
    assert d.shape == (config.channels * config.columns, 3)
    np.testing.assert_allclose(np.linalg.norm(d.astype(np.float64), axis=1), 1.0, atol=1e-6)
    elevation = np.degrees(elevations_of(config)).reshape(config.channels, config.columns)
    # every laser keeps one elevation, lasers evenly spaced from lower_fov to upper_fov
    np.testing.assert_allclose(elevation, elevation[:, :1].repeat(config.columns, axis=1), atol=1e-4)
    expected = np.linspace(config.lower_fov, config.upper_fov, config.channels)
    np.testing.assert_allclose(elevation[:, 0], expected, atol=1e-4)


def test_full_turn_azimuths_are_distinct_and_evenly_spaced():
    config = lidar_preset("tiny")
    d = ray_directions(config).reshape(config.channels, config.columns, 3)[0].astype(np.float64)
    azimuth = np.sort(np.arctan2(d[:, 1], d[:, 0]))
    steps = np.diff(np.concatenate([azimuth, azimuth[:1] + 2 * np.pi]))
    np.testing.assert_allclose(steps, 2 * np.pi / config.columns, atol=1e-5)
    assert np.any(np.abs(azimuth) < 1e-6), "straight ahead (+x) is one of the azimuths"


def test_partial_field_of_view_is_centred_on_x():
    config = dataclasses.replace(lidar_preset("tiny"), horizontal_fov=90.0)
    d = ray_directions(config).astype(np.float64)
    azimuth = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    assert azimuth.min() == pytest.approx(-45.0, abs=1e-4)
    assert azimuth.max() == pytest.approx(45.0, abs=1e-4)
    assert abs(azimuth.mean()) < 1e-4


def test_ray_directions_are_read_only():
    d = ray_directions(lidar_preset("tiny"))
    with pytest.raises(ValueError):
        d[0, 0] = 0.0


# --------------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------------


def test_box_triangles_are_closed_and_face_outward():
    rng = np.random.default_rng(3)
    boxes = np.column_stack(
        [rng.uniform(-50, 50, (5, 3)), rng.uniform(0.5, 6.0, (5, 3)), rng.uniform(-np.pi, np.pi, 5)]
    )
    vertices, triangles = box_triangles(boxes)
    assert vertices.shape == (40, 3) and triangles.shape == (60, 3)
    assert vertices.dtype == np.float32 and triangles.dtype == np.int32
    np.testing.assert_allclose(vertices, box_corners(boxes).reshape(-1, 3), atol=1e-4)

    v = vertices.astype(np.float64)
    a, b, c = v[triangles[:, 0]], v[triangles[:, 1]], v[triangles[:, 2]]
    normal = np.cross(b - a, c - a)
    centre = boxes[:, :3] + np.column_stack([np.zeros((5, 2)), boxes[:, 5] / 2])  # geometric centres
    outward = (a + b + c) / 3 - np.repeat(centre, 12, axis=0)
    assert np.all(np.einsum("ij,ij->i", normal, outward) > 0)
    # closed and consistently wound: every directed edge appears once and its reverse once
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    directed = {tuple(e) for e in edges.tolist()}
    assert len(directed) == len(edges)
    assert all((j, i) in directed for i, j in directed)
    # each box's 12 triangles use only its own 8 vertices
    assert np.all(triangles // 8 == np.repeat(np.arange(5), 12)[:, None])


def test_static_geometry_validates_and_concatenates():
    with pytest.raises(ValueError):
        StaticGeometry(np.zeros((3, 3)), np.array([[0, 1, 3]]), np.zeros(1))
    with pytest.raises(ValueError):
        StaticGeometry(np.zeros((3, 3)), np.array([[0, 1, 2]]), np.zeros(2))
    with pytest.raises(ValueError):
        StaticGeometry.ground_plane(1.0, 0.0, 0.0, 1.0)
    ground = StaticGeometry.ground_plane(-10, 10, -10, 10, semantic=Semantic.ROAD)
    houses = StaticGeometry.boxes_as_static(np.array([[0, 0, 0, 2, 2, 3, 0], [5, 5, 0, 2, 2, 3, 1]]))
    both = StaticGeometry.concatenate([ground, houses])
    assert both.num_triangles == 2 + 24
    assert list(both.semantic[:2]) == [Semantic.ROAD] * 2
    assert np.all(both.semantic[2:] == Semantic.BUILDING)
    np.testing.assert_array_equal(both.vertices[both.triangles[2:]], houses.vertices[houses.triangles])
    assert StaticGeometry.concatenate([]).num_triangles == 0


# --------------------------------------------------------------------------------------------------
# casting: geometry of the hits
# --------------------------------------------------------------------------------------------------


def test_ground_hits_at_analytic_distance_and_upward_rays_miss():
    height = 2.0
    config = ideal(sweep(16, 128, -30.0, 10.0, range=500.0))
    T = T_from_xyz_yaw(12.0, -7.0, height, 0.7)
    hits = cast_lidar(config, T, big_ground(), NO_BOXES, NO_IDS, NO_SEM, None, np.random.default_rng(0))

    elevation = elevations_of(config)
    downward = elevation < 0
    assert len(hits) == downward.sum(), "every downward ray hits, no upward ray does"
    distance = np.linalg.norm(hits.points[:, :3].astype(np.float64), axis=1)
    np.testing.assert_allclose(distance, height / np.sin(-elevation[downward]), rtol=1e-4)
    np.testing.assert_allclose(hits.points[:, 2], -height, atol=1e-3)  # sensor frame, yaw only
    assert np.all(hits.semantic == Semantic.TERRAIN) and np.all(hits.instance_id == -1)
    np.testing.assert_allclose(
        hits.points[:, 3], np.exp(-config.atmosphere_attenuation_rate * distance), rtol=1e-5
    )
    assert hits.points.dtype == np.float32 and hits.instance_id.dtype == np.int32
    assert hits.semantic.dtype == np.uint8


def test_points_are_in_the_sensor_frame():
    config = ideal(lidar_preset("tiny"))
    rng = np.random.default_rng(0)
    T_a = T_from_xyz_yaw(0.0, 0.0, 1.5, 0.0)
    T_b = T_from_xyz_yaw(100.0, -40.0, 1.5, 2.0)
    box_a = np.array([[8.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
    box_b = box_a.copy()
    box_b[0, :3] = transform_points(T_b, np.array([[8.0, 0.0, -1.5]]))[0]
    box_b[0, 6] = 2.0
    ids, sem = np.array([1]), np.array([Semantic.CAR], dtype=np.uint8)
    hits_a = cast_lidar(config, T_a, big_ground(), box_a, ids, sem, None, rng)
    hits_b = cast_lidar(config, T_b, big_ground(), box_b, ids, sem, None, rng)
    # the same scene seen from the same relative pose gives the same sensor-frame points
    assert len(hits_a) == len(hits_b) > 0
    np.testing.assert_allclose(hits_a.points, hits_b.points, atol=2e-3)
    np.testing.assert_array_equal(hits_a.instance_id, hits_b.instance_id)


def test_box_hits_carry_its_id_and_lie_on_its_surface():
    config = ideal(sweep(32, 512, -25.0, 5.0, range=100.0))
    T = T_from_xyz_yaw(3.0, 1.0, 1.8, 0.4)
    box = np.array([[13.0, 6.0, 0.0, 4.5, 1.9, 1.6, 1.1]])
    hits = cast_lidar(
        config, T, big_ground(), box, np.array([42]), np.array([Semantic.TRUCK], dtype=np.uint8), None,
        np.random.default_rng(0),
    )
    on_box = hits.instance_id == 42
    assert on_box.sum() > 50
    assert set(np.unique(hits.instance_id)) == {-1, 42}
    assert np.all(hits.semantic[on_box] == Semantic.TRUCK)
    assert np.all(hits.semantic[~on_box] == Semantic.TERRAIN)

    points_world = transform_points(T, hits.points[:, :3].astype(np.float64))
    T_box_from_world = invert_T(T_from_xyz_yaw(*box[0, :3], box[0, 6]))
    local = transform_points(T_box_from_world, points_world[on_box])
    half = box[0, 3:5] / 2
    inside_grown = (
        np.all(np.abs(local[:, :2]) <= half + 0.01, axis=1)
        & (local[:, 2] >= -0.01)
        & (local[:, 2] <= box[0, 5] + 0.01)
    )
    assert np.all(inside_grown)
    # on the surface, not inside: every point is within 1 cm of a face
    gap = np.minimum(np.min(half - np.abs(local[:, :2]), axis=1), box[0, 5] - local[:, 2])
    assert np.all(gap < 0.01)
    # ground hits lie on the ground
    np.testing.assert_allclose(points_world[~on_box, 2], 0.0, atol=2e-3)


def test_nearest_surface_wins():
    config = ideal(sweep(32, 512, -25.0, 5.0, range=100.0))
    T = T_from_xyz_yaw(0.0, 0.0, 1.0, 0.0)
    near = [10.0, 0.0, 0.0, 1.0, 6.0, 4.0, 0.0]  # a wall across the view
    far = [20.0, 0.0, 0.0, 2.0, 2.0, 1.5, 0.0]  # smaller, straight behind it: fully hidden
    boxes = np.array([near, far])
    sem = np.array([Semantic.CAR, Semantic.CAR], dtype=np.uint8)
    rng = np.random.default_rng(0)
    hits = cast_lidar(config, T, big_ground(), boxes, np.array([1, 2]), sem, None, rng)
    assert np.any(hits.instance_id == 1) and not np.any(hits.instance_id == 2)
    alone = cast_lidar(config, T, big_ground(), boxes[1:], np.array([2]), sem[1:], None, rng)
    assert np.any(alone.instance_id == 2)


def test_own_box_is_excluded():
    config = ideal(lidar_preset("tiny"))
    own = np.array([0.0, 0.0, 0.0, 4.5, 1.9, 1.5, 0.3])
    other = np.array([12.0, 3.0, 0.0, 4.5, 1.9, 1.5, 0.0])
    boxes = np.stack([own, other])
    ids = np.array([5, 6])
    sem = np.full(2, Semantic.CAR, dtype=np.uint8)
    T = T_from_xyz_yaw(own[0], own[1], own[5] + config.mount_z, own[6])  # on the roof
    rng = np.random.default_rng(0)
    excluded = cast_lidar(config, T, big_ground(), boxes, ids, sem, 5, rng)
    assert not np.any(excluded.instance_id == 5)
    assert np.any(excluded.instance_id == 6)
    kept = cast_lidar(config, T, big_ground(), boxes, ids, sem, None, rng)
    assert np.any(kept.instance_id == 5), "without exclusion the sensor sees its own roof"


def test_hits_beyond_range_are_dropped():
    height = 2.0
    config = ideal(sweep(32, 64, -20.0, -1.0, range=40.0))
    T = T_from_xyz_yaw(0.0, 0.0, height, 0.0)
    hits = cast_lidar(config, T, big_ground(), NO_BOXES, NO_IDS, NO_SEM, None, np.random.default_rng(0))
    distance = np.linalg.norm(hits.points[:, :3], axis=1)
    assert distance.max() <= config.range + 1e-4
    within = height / np.sin(-elevations_of(config)) <= config.range
    assert 0 < within.sum() < len(within)  # the cut falls inside the pattern
    assert len(hits) == within.sum()


def test_empty_scene_gives_no_points():
    config = lidar_preset("tiny")
    hits = cast_lidar(
        config, np.eye(4), StaticGeometry.empty(), NO_BOXES, NO_IDS, NO_SEM, None, np.random.default_rng(0)
    )
    assert hits.points.shape == (0, 4) and hits.instance_id.shape == (0,) and hits.semantic.shape == (0,)


# --------------------------------------------------------------------------------------------------
# casting: drop-off, noise, determinism
# --------------------------------------------------------------------------------------------------


def test_general_dropoff_keeps_the_complementary_fraction():
    config = ideal(sweep(64, 1024, -40.0, -5.0, range=1000.0), dropoff_general_rate=0.5)
    T = T_from_xyz_yaw(0.0, 0.0, 2.0, 0.0)
    n_rays = config.channels * config.columns
    for seed in (0, 1):
        hits = cast_lidar(
            config, T, big_ground(), NO_BOXES, NO_IDS, NO_SEM, None, np.random.default_rng(seed)
        )
        kept = len(hits) / n_rays
        assert abs(kept - 0.5) < 5 * np.sqrt(0.25 / n_rays), kept  # 5 sigma of a binomial


def test_intensity_dropoff_follows_carlas_linear_rule():
    # Flat ground and a yaw-only pose: all rays of one laser travel the same distance, so each
    # laser is one intensity with `columns` independent keep/drop draws.
    height, rate, limit, at_zero = 2.0, 0.05, 0.7, 0.8
    config = dataclasses.replace(
        ideal(sweep(24, 2048, -60.0, -2.0, range=1000.0)),
        atmosphere_attenuation_rate=rate,
        dropoff_intensity_limit=limit,
        dropoff_zero_intensity=at_zero,
    )
    T = T_from_xyz_yaw(0.0, 0.0, height, 0.0)
    hits = cast_lidar(config, T, big_ground(), NO_BOXES, NO_IDS, NO_SEM, None, np.random.default_rng(7))

    laser_elevation = elevations_of(config).reshape(config.channels, config.columns)[:, 0]
    intensity = np.exp(-rate * height / np.sin(-laser_elevation))
    assert intensity.min() < 0.2 and intensity.max() > limit  # the pattern spans the rule
    expected_keep = np.where(intensity > limit, 1.0, 1.0 - at_zero * (1.0 - intensity / limit))

    hit_elevation = np.arcsin(hits.points[:, 2] / np.linalg.norm(hits.points[:, :3], axis=1))
    laser = np.abs(hit_elevation[:, None] - laser_elevation[None, :]).argmin(axis=1)
    kept = np.bincount(laser, minlength=config.channels) / config.columns
    sigma = np.sqrt(expected_keep * (1 - expected_keep) / config.columns)
    assert np.all(np.abs(kept - expected_keep) <= 5 * sigma + 1e-9), (kept, expected_keep)
    np.testing.assert_array_equal(kept[intensity > limit], 1.0)


def test_same_seed_same_bytes_other_seed_differs():
    config = dataclasses.replace(lidar_preset("tiny"), noise_stddev=0.02)  # CARLA's drop-off on
    T = T_from_xyz_yaw(1.0, 2.0, 1.8, 0.2)
    boxes = np.array([[10.0, 0.0, 0.0, 4.5, 1.9, 1.5, 0.0], [-8.0, 4.0, 0.0, 4.5, 1.9, 1.5, 1.0]])
    ids = np.array([3, 4])
    sem = np.full(2, Semantic.CAR, dtype=np.uint8)
    static = StaticGeometry.concatenate(
        [big_ground(), StaticGeometry.boxes_as_static(np.array([[0.0, 25.0, 0.0, 20.0, 10.0, 12.0, 0.0]]))]
    )

    def run(seed: int):
        return cast_lidar(config, T, static, boxes, ids, sem, None, np.random.default_rng(seed))

    a, b, c = run(11), run(11), run(12)
    assert a.points.tobytes() == b.points.tobytes()
    assert a.instance_id.tobytes() == b.instance_id.tobytes()
    assert a.semantic.tobytes() == b.semantic.tobytes()
    assert len(a) != len(c) or a.points.tobytes() != c.points.tobytes()
    assert set(np.unique(a.semantic)) == {Semantic.TERRAIN, Semantic.BUILDING, Semantic.CAR}


def test_range_noise_has_the_configured_sigma_along_the_ray():
    height, sigma = 2.0, 0.05
    config = ideal(sweep(32, 512, -40.0, -5.0, range=1000.0), noise_stddev=sigma)
    T = T_from_xyz_yaw(0.0, 0.0, height, 0.0)
    ground = big_ground()
    hits = cast_lidar(config, T, ground, NO_BOXES, NO_IDS, NO_SEM, None, np.random.default_rng(5))
    clean = cast_lidar(ideal(config), T, ground, NO_BOXES, NO_IDS, NO_SEM, None, np.random.default_rng(5))
    assert len(hits) == len(clean) == config.channels * config.columns
    p = hits.points[:, :3].astype(np.float64)
    q = clean.points[:, :3].astype(np.float64)
    error = np.linalg.norm(p, axis=1) - np.linalg.norm(q, axis=1)
    assert abs(error.mean()) < 4 * sigma / np.sqrt(len(error))
    assert error.std() == pytest.approx(sigma, rel=0.05)
    # the noise moves points along their rays only
    unit_p, unit_q = p / np.linalg.norm(p, axis=1)[:, None], q / np.linalg.norm(q, axis=1)[:, None]
    np.testing.assert_allclose(unit_p, unit_q, atol=1e-5)
    # intensity comes from the noise-free distance
    np.testing.assert_array_equal(hits.points[:, 3], clean.points[:, 3])


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"channels": 0},
        {"rotation_frequency": 0.0},
        {"range": -1.0},
        {"lower_fov": 10.0, "upper_fov": -10.0},
        {"dropoff_general_rate": 1.5},
        {"noise_stddev": -0.1},
        {"horizontal_fov": 0.0},
    ],
)
def test_invalid_config_raises(changes):
    config = dataclasses.replace(lidar_preset("tiny"), **changes)
    with pytest.raises(ValueError):
        ray_directions(config)
    with pytest.raises(ValueError):
        cast_lidar(config, np.eye(4), big_ground(), NO_BOXES, NO_IDS, NO_SEM, None, np.random.default_rng(0))


def test_bad_arguments_raise():
    config = lidar_preset("tiny")
    rng = np.random.default_rng(0)
    box = np.array([[5.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
    sem = np.array([Semantic.CAR], dtype=np.uint8)
    with pytest.raises(ValueError):
        cast_lidar(config, np.eye(3), big_ground(), box, np.array([1]), sem, None, rng)
    with pytest.raises(ValueError):
        cast_lidar(config, np.eye(4), big_ground(), box[:, :6], np.array([1]), sem, None, rng)
    with pytest.raises(ValueError):
        cast_lidar(config, np.eye(4), big_ground(), box, np.array([1, 2]), sem, None, rng)
    with pytest.raises(ValueError):
        flat = box * [1, 1, 1, 1, 1, 0, 1]  # zero height
        cast_lidar(config, np.eye(4), big_ground(), flat, np.array([1]), sem, None, rng)
