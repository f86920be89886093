"""Vehicle motion: kinematic bicycle, pure-pursuit lane keeping, IDM car following.

All functions are pure and vectorised over vehicles (arrays of shape (N,)).

Hand-written because each is a few lines of textbook maths on arrays: the kinematic bicycle
(Rajamani, *Vehicle Dynamics and Control*, 2.2), pure pursuit (Coulter, CMU-RI-TR-92-01) and the
Intelligent Driver Model (Treiber, Hennecke, Helbing, Phys. Rev. E 62, 2000). highway-env has the
same models but bound to its own road and vehicle objects, not as array functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.geometry import wrap_angle

__all__ = [
    "MAX_ACCEL",
    "MAX_BRAKE",
    "MAX_STEER",
    "IDMParams",
    "bicycle_step",
    "idm_acceleration",
    "pure_pursuit_steering",
]

MAX_STEER = 0.6  # rad, front wheel
MAX_ACCEL = 4.0  # m/s^2
MAX_BRAKE = 8.0  # m/s^2 (emergency braking on dry asphalt)


def bicycle_step(
    x: np.ndarray,
    y: np.ndarray,
    yaw: np.ndarray,
    speed: np.ndarray,
    acceleration: np.ndarray,
    steering: np.ndarray,
    wheelbase: np.ndarray,
    dt: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One step of the kinematic bicycle model, referenced at the box centre.

    The centre of gravity is taken midway between the axles (l_r = wheelbase / 2), so the slip
    angle is ``beta = atan(tan(steering) / 2)``. Inputs are clipped to the vehicle limits and speed
    never goes negative (no reversing). Integration is semi-implicit Euler: the new speed moves
    the vehicle.

    Args:
        x, y, yaw, speed: (N,) state; metres, radians, m/s.
        acceleration: (N,) m/s^2.
        steering: (N,) front-wheel angle, radians, positive left.
        wheelbase: (N,) metres.
        dt: seconds.

    Returns:
        (x, y, yaw, speed) after ``dt``.
    """
    accel = np.clip(acceleration, -MAX_BRAKE, MAX_ACCEL)
    delta = np.clip(steering, -MAX_STEER, MAX_STEER)
    new_speed = np.maximum(speed + accel * dt, 0.0)
    beta = np.arctan(0.5 * np.tan(delta))
    lr = 0.5 * wheelbase
    new_yaw = wrap_angle(yaw + new_speed / lr * np.sin(beta) * dt)
    mid_yaw = yaw + 0.5 * wrap_angle(new_yaw - yaw)  # heading at mid-step
    new_x = x + new_speed * np.cos(mid_yaw + beta) * dt
    new_y = y + new_speed * np.sin(mid_yaw + beta) * dt
    return new_x, new_y, new_yaw, new_speed


def pure_pursuit_steering(
    x: np.ndarray,
    y: np.ndarray,
    yaw: np.ndarray,
    target_x: np.ndarray,
    target_y: np.ndarray,
    wheelbase: np.ndarray,
) -> np.ndarray:
    """Front-wheel angle that steers the vehicle onto the arc through a look-ahead target point.

    ``delta = atan(2 L sin(alpha) / l_d)``, with alpha the bearing of the target in the vehicle
    frame and l_d its distance. Shapes (N,); result clipped to :data:`MAX_STEER`.
    """
    dx, dy = target_x - x, target_y - y
    lookahead = np.maximum(np.hypot(dx, dy), 1e-3)
    alpha = wrap_angle(np.arctan2(dy, dx) - yaw)
    return np.clip(np.arctan2(2.0 * wheelbase * np.sin(alpha), lookahead), -MAX_STEER, MAX_STEER)


@dataclass(frozen=True)
class IDMParams:
    """Intelligent Driver Model parameters (Treiber et al. 2000, urban values)."""

    max_accel: float = 1.5
    """a: maximum acceleration, m/s^2"""
    comfortable_brake: float = 2.0
    """b: comfortable deceleration, m/s^2"""
    min_gap: float = 2.0
    """s0: jam distance, m"""
    time_headway: float = 1.2
    """T: desired time headway, s"""
    delta: float = 4.0
    """acceleration exponent"""


def idm_acceleration(
    speed: np.ndarray,
    desired_speed: np.ndarray,
    gap: np.ndarray,
    closing_speed: np.ndarray,
    params: IDMParams = IDMParams(),
) -> np.ndarray:
    """IDM acceleration, m/s^2, shape (N,).

    Args:
        speed: (N,) own speed v.
        desired_speed: (N,) v0 > 0.
        gap: (N,) bumper-to-bumper distance to the leader, ``inf`` when there is none.
        closing_speed: (N,) v - v_leader (positive when approaching), 0 without a leader.
    """
    v = np.asarray(speed, dtype=np.float64)
    v0 = np.maximum(np.asarray(desired_speed, dtype=np.float64), 0.1)
    a, b = params.max_accel, params.comfortable_brake
    s_star = params.min_gap + np.maximum(
        0.0, v * params.time_headway + v * closing_speed / (2.0 * np.sqrt(a * b))
    )
    interaction = np.where(np.isfinite(gap), (s_star / np.maximum(gap, 0.1)) ** 2, 0.0)
    return a * (1.0 - (v / v0) ** params.delta - interaction)
