"""Kinematic bicycle, pure pursuit and IDM: closed-form checks and short simulations."""

import numpy as np
import pytest

from sim.dynamics import MAX_STEER, IDMParams, bicycle_step, idm_acceleration, pure_pursuit_steering


def _step(state, accel, steer, wheelbase=2.8, dt=0.1):
    x, y, yaw, v = (np.array([s], dtype=float) for s in state)
    out = bicycle_step(x, y, yaw, v, np.array([accel]), np.array([steer]), np.array([wheelbase]), dt)
    return tuple(float(o[0]) for o in out)


@pytest.mark.parametrize("yaw", [0.0, 0.7, -2.5])
def test_straight_line_moves_speed_times_dt(yaw):
    x, y, new_yaw, v = _step((1.0, 2.0, yaw, 10.0), 0.0, 0.0)
    assert new_yaw == pytest.approx(yaw)
    assert v == pytest.approx(10.0)
    assert x == pytest.approx(1.0 + np.cos(yaw))
    assert y == pytest.approx(2.0 + np.sin(yaw))


def test_constant_steering_drives_a_circle_of_the_kinematic_radius():
    wheelbase, delta, speed = 2.8, 0.2, 5.0
    beta = np.arctan(0.5 * np.tan(delta))
    radius = (wheelbase / 2) / np.sin(beta)  # kinematic bicycle, CG midway between the axles
    state = (0.0, 0.0, 0.0, speed)
    points = []
    for _ in range(400):
        state = _step(state, 0.0, delta, wheelbase, dt=0.01)
        points.append(state[:2])
    points = np.array(points)
    # fit the circle centre: it lies on the left normal of the initial heading of the slip direction
    centre = np.array([-radius * np.sin(beta), radius * np.cos(beta)])
    distances = np.linalg.norm(points - centre, axis=1)
    assert np.allclose(distances, radius, rtol=1e-3)


def test_braking_never_reverses_and_inputs_are_clipped():
    state = (0.0, 0.0, 0.0, 1.0)
    for _ in range(20):
        state = _step(state, -100.0, 5.0)
    assert state[3] == 0.0
    x_before = state[0]
    state = _step(state, 0.0, 0.0)
    assert state[0] == x_before
    # steering is clipped: yaw rate equals the one at MAX_STEER
    a = _step((0.0, 0.0, 0.0, 10.0), 0.0, 5.0)
    b = _step((0.0, 0.0, 0.0, 10.0), 0.0, MAX_STEER)
    assert a == pytest.approx(b)


def test_pure_pursuit_points_at_the_target():
    # target straight ahead: no steering; to the left: positive steering; to the right: negative
    zero = np.zeros(1)
    wb = np.array([2.8])
    assert pure_pursuit_steering(zero, zero, zero, np.array([10.0]), zero, wb)[0] == pytest.approx(0.0)
    assert pure_pursuit_steering(zero, zero, zero, np.array([10.0]), np.array([2.0]), wb)[0] > 0
    assert pure_pursuit_steering(zero, zero, zero, np.array([10.0]), np.array([-2.0]), wb)[0] < 0


def test_pure_pursuit_converges_onto_a_lane():
    # start 1.5 m right of the lane y = 0, track points 8 m ahead on it
    x, y, yaw, v = np.array([0.0]), np.array([-1.5]), np.array([0.0]), np.array([8.0])
    wb = np.array([2.8])
    for _ in range(100):
        steer = pure_pursuit_steering(x, y, yaw, x + 8.0, np.zeros(1), wb)
        x, y, yaw, v = bicycle_step(x, y, yaw, v, np.zeros(1), steer, wb, 0.1)
    assert abs(y[0]) < 0.05 and abs(yaw[0]) < 0.02


def test_idm_free_road_and_equilibrium():
    p = IDMParams()
    # at rest on a free road it accelerates at a; at the desired speed it stops accelerating
    assert idm_acceleration(np.array([0.0]), np.array([10.0]), np.array([np.inf]), np.zeros(1), p)[
        0
    ] == pytest.approx(p.max_accel)
    assert idm_acceleration(np.array([10.0]), np.array([10.0]), np.array([np.inf]), np.zeros(1), p)[
        0
    ] == pytest.approx(0.0)
    # behind a leader at the same speed, the equilibrium gap gives zero acceleration
    v, v0 = 8.0, 12.0
    s_eq = (p.min_gap + v * p.time_headway) / np.sqrt(1 - (v / v0) ** p.delta)
    assert idm_acceleration(np.array([v]), np.array([v0]), np.array([s_eq]), np.zeros(1), p)[
        0
    ] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("speed", [5.0, 10.0, 14.0])
def test_idm_stops_behind_a_stopped_car_without_touching_it(speed):
    p = IDMParams()
    dt, gap_start = 0.1, 60.0
    pos, v = 0.0, speed
    leader = gap_start
    min_gap = np.inf
    for _ in range(600):
        a = idm_acceleration(np.array([v]), np.array([14.0]), np.array([leader - pos]), np.array([v]), p)[0]
        v = max(v + max(a, -8.0) * dt, 0.0)
        pos += v * dt
        min_gap = min(min_gap, leader - pos)
    assert v == pytest.approx(0.0, abs=1e-3)
    assert 0.5 < min_gap <= p.min_gap + 0.5
