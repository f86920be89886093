"""Pose noise: zero noise is the identity, statistics match the stated deviations, seeded."""

import numpy as np
import pytest

from sim.geometry import T_from_xyz_rpy, rpy_from_rotation, yaw_of
from v2x.pose_noise import PoseNoise

T_TRUE = T_from_xyz_rpy(12.0, -4.0, 1.8, 0.02, -0.03, 0.7)


def test_zero_noise_returns_the_true_pose():
    noise = PoseNoise()
    assert noise.is_zero
    np.testing.assert_allclose(noise.apply(T_TRUE, np.random.default_rng(0)), T_TRUE, atol=1e-12)


def test_noise_statistics_match_the_deviations():
    noise = PoseNoise(std_xyz_m=(0.2, 0.4, 0.05), std_yaw_rad=np.radians(0.5))
    rng = np.random.default_rng(1)
    draws = [noise.apply(T_TRUE, rng) for _ in range(4000)]
    d_xyz = np.array([T[:3, 3] - T_TRUE[:3, 3] for T in draws])
    d_yaw = np.array([yaw_of(T) - yaw_of(T_TRUE) for T in draws])
    np.testing.assert_allclose(d_xyz.std(axis=0), [0.2, 0.4, 0.05], rtol=0.06)
    np.testing.assert_allclose(d_xyz.mean(axis=0), 0.0, atol=0.02)
    assert d_yaw.std() == pytest.approx(np.radians(0.5), rel=0.06)


def test_noisy_pose_is_rigid_and_keeps_roll_and_pitch():
    noise = PoseNoise(std_xyz_m=0.5, std_yaw_rad=0.1)
    T = noise.apply(T_TRUE, np.random.default_rng(2))
    assert T.dtype == np.float64 and T.shape == (4, 4)
    np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-12)
    np.testing.assert_array_equal(T[3], [0, 0, 0, 1])
    # a rotation about world z leaves the tilt of the sensor's z axis unchanged
    np.testing.assert_allclose(T[2, :3], T_TRUE[2, :3], atol=1e-12)
    roll, pitch, _ = rpy_from_rotation(T[:3, :3])
    true_roll, true_pitch, _ = rpy_from_rotation(T_TRUE[:3, :3])
    assert (roll, pitch) == pytest.approx((true_roll, true_pitch), abs=1e-9)


def test_same_seed_same_pose():
    noise = PoseNoise(std_xyz_m=0.3, std_yaw_rad=0.05)
    a = noise.apply(T_TRUE, np.random.default_rng(7))
    b = noise.apply(T_TRUE, np.random.default_rng(7))
    c = noise.apply(T_TRUE, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize(
    "kwargs", [{"std_xyz_m": -0.1}, {"std_yaw_rad": -1.0}, {"std_xyz_m": (0.1, np.nan, 0)}]
)
def test_invalid_deviations_are_refused(kwargs):
    with pytest.raises(ValueError):
        PoseNoise(**kwargs)
