"""Priority-based safety supervisor (MAPPO-PIS, after Chen et al.'s on-ramp merging supervisor).

Between the policy and the vehicles: every controlled vehicle's proposed action is checked
against the vehicles it knows about over a short horizon, and an action whose predicted
trajectory comes closer than ``margin_m`` to any of them is replaced by the safest candidate
action (the one with the largest predicted clearance).

- **Trajectories.** Each candidate action of a vehicle comes with its predicted poses (the env
  rolls its low-level controller out); other vehicles are predicted by their shared intent when
  one was received, else at constant velocity.
- **Priority.** Vehicles are supervised one at a time, highest priority first (the env gives
  vehicles on a merge lane near its end, and vehicles with a short time headway, the highest);
  a vehicle supervised later sees the *final* plans of those before it and the *proposed* plans
  of those after it, when plans are shared (intent sharing on). Without sharing, every vehicle
  predicts every other at constant velocity.
- **Clearance.** A footprint is covered by three discs along its length (radius
  ``sqrt((L/6)^2 + (W/2)^2)``); the clearance of two footprints is the smallest distance between
  disc rims, negative when they overlap. The discs reach about half a metre past a car's bumpers
  and a few decimetres past its sides, so the check errs on the safe side.

Pure numpy; no torch, so :mod:`sim.env` can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SafetyConfig",
    "SafetyDecision",
    "SafetyRequest",
    "constant_velocity_poses",
    "footprint_clearance",
    "supervise",
]


@dataclass(frozen=True)
class SafetyConfig:
    """Settings of the safety supervisor."""

    horizon_s: float = 1.5
    """seconds of trajectory checked"""
    margin_m: float = 0.5
    """an action is unsafe when its predicted clearance to a known vehicle falls below this"""

    def validate(self) -> None:
        if not 0 < self.horizon_s <= 5:
            raise ValueError(f"horizon_s must be in (0, 5], got {self.horizon_s}")
        if self.margin_m < 0:
            raise ValueError(f"margin_m must be >= 0, got {self.margin_m}")


def _discs(poses: np.ndarray, extent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres (..., H, 3, 2) and radii (...,) of the three discs covering footprints.

    Args:
        poses: (..., H, 3) x, y, yaw over time.
        extent: (..., 2) length and width.
    """
    length, width = extent[..., 0], extent[..., 1]
    offsets = np.stack([-length / 3.0, np.zeros_like(length), length / 3.0], axis=-1)  # (..., 3)
    heading = np.stack([np.cos(poses[..., 2]), np.sin(poses[..., 2])], axis=-1)  # (..., H, 2)
    centres = poses[..., None, :2] + offsets[..., None, :, None] * heading[..., :, None, :]
    radius = np.sqrt((length / 6.0) ** 2 + (width / 2.0) ** 2)
    return centres, radius


def footprint_clearance(
    own_poses: np.ndarray, own_extent: np.ndarray, other_poses: np.ndarray, other_extents: np.ndarray
) -> np.ndarray:
    """Smallest predicted clearance of each candidate trajectory to all other vehicles.

    Args:
        own_poses: (C, H, 3) x, y, yaw of C candidate trajectories over H steps.
        own_extent: (2,) own length and width.
        other_poses: (M, H, 3) predicted poses of M other vehicles at the same times.
        other_extents: (M, 2) their lengths and widths.

    Returns:
        (C,) metres, the minimum over time and vehicles of the gap between footprint discs
        (negative: overlap); ``inf`` when M = 0.
    """
    own_poses = np.asarray(own_poses, dtype=np.float64)
    other_poses = np.asarray(other_poses, dtype=np.float64)
    c = len(own_poses)
    if len(other_poses) == 0:
        return np.full(c, np.inf)
    if own_poses.shape[1] != other_poses.shape[1]:
        raise ValueError(f"horizons differ: {own_poses.shape[1]} vs {other_poses.shape[1]} steps")
    own_c, own_r = _discs(own_poses, np.asarray(own_extent, dtype=np.float64)[None].repeat(c, 0))
    oth_c, oth_r = _discs(other_poses, np.asarray(other_extents, dtype=np.float64))
    # (C, 1, H, 3, 1, 2) - (1, M, H, 1, 3, 2) -> (C, M, H, 3, 3)
    diff = own_c[:, None, :, :, None, :] - oth_c[None, :, :, None, :, :]
    dist = np.sqrt(np.einsum("...d,...d->...", diff, diff))
    gap = dist - own_r[:, None, None, None, None] - oth_r[None, :, None, None, None]
    return gap.reshape(c, -1).min(axis=1)


def constant_velocity_poses(boxes: np.ndarray, velocities: np.ndarray, times_s: np.ndarray) -> np.ndarray:
    """(M, H, 3) x, y, yaw of vehicles driving on at their current velocity.

    Args:
        boxes: (M, 7) current world boxes.
        velocities: (M, 2) world velocities, m/s.
        times_s: (H,) seconds ahead.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    velocities = np.asarray(velocities, dtype=np.float64).reshape(-1, 2)
    t = np.asarray(times_s, dtype=np.float64)
    xy = boxes[:, None, :2] + velocities[:, None, :] * t[None, :, None]
    yaw = np.broadcast_to(boxes[:, None, 6], (len(boxes), len(t)))
    return np.concatenate([xy, yaw[..., None]], axis=-1)


@dataclass
class SafetyRequest:
    """One controlled vehicle's case for the supervisor.

    Attributes:
        agent_id: the vehicle.
        proposed: the policy's action index.
        candidates: (A, H, 3) predicted poses under each of the A actions (index = action).
        extent: (2,) length and width.
        priority: larger is supervised first.
        obstacle_ids: (M,) ids of the other vehicles it knows about.
        obstacle_poses: (M, H, 3) their predicted poses (intent or constant velocity).
        obstacle_extents: (M, 2) their lengths and widths.
    """

    agent_id: int
    proposed: int
    candidates: np.ndarray
    extent: np.ndarray
    priority: float
    obstacle_ids: np.ndarray
    obstacle_poses: np.ndarray
    obstacle_extents: np.ndarray


@dataclass
class SafetyDecision:
    """The supervisor's verdict for one vehicle.

    Attributes:
        action: the action to apply.
        overridden: True when it differs from the proposed one.
        clearance: predicted clearance of the applied action, metres.
        clearances: (A,) predicted clearance of every candidate.
    """

    action: int
    overridden: bool
    clearance: float
    clearances: np.ndarray = field(repr=False)


def supervise(
    requests: Sequence[SafetyRequest], config: SafetyConfig, share_plans: bool
) -> dict[int, SafetyDecision]:
    """Check and, where unsafe, replace every vehicle's action, by priority.

    Args:
        requests: one per controlled vehicle.
        config: margin and horizon.
        share_plans: when True (intent sharing), a controlled vehicle that another one knows
            about is predicted by its plan (final if already supervised, proposed otherwise)
            instead of the obstacle prediction in the request.

    Returns:
        agent id -> decision. An unsafe proposal (clearance < margin) is replaced by the
        candidate with the largest clearance; among equal clearances the proposal is kept.
    """
    config.validate()
    chosen: dict[int, int] = {}
    plans = {r.agent_id: r for r in requests}
    decisions: dict[int, SafetyDecision] = {}
    for request in sorted(requests, key=lambda r: -r.priority):
        obstacles = np.array(request.obstacle_poses, dtype=np.float64, copy=True)
        if share_plans and len(obstacles):
            for k, other in enumerate(np.asarray(request.obstacle_ids).tolist()):
                if other in plans and other != request.agent_id:
                    plan = plans[other]
                    action = chosen.get(other, plan.proposed)
                    obstacles[k] = plan.candidates[action]
        clearances = footprint_clearance(
            request.candidates, request.extent, obstacles, request.obstacle_extents
        )
        action = int(request.proposed)
        if clearances[action] < config.margin_m:
            best = float(clearances.max())
            if best > clearances[action]:
                action = int(np.argmax(clearances))
        chosen[request.agent_id] = action
        decisions[request.agent_id] = SafetyDecision(
            action=action,
            overridden=action != int(request.proposed),
            clearance=float(clearances[action]),
            clearances=clearances,
        )
    return decisions
