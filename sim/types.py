"""Typed boundaries of the simulator: what a World hands to the rest of the stack.

Frames follow docs/architecture.md: right-handed, x forward, y left, z up, metres, radians.
An agent's own frame has its origin at the bottom centre of its bounding box, x along its heading.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from sim.geometry import yaw_of

__all__ = [
    "ActorKind",
    "AgentState",
    "LidarConfig",
    "LidarScan",
    "Role",
    "SceneFrame",
    "Semantic",
    "VehicleControl",
    "World",
]


class ActorKind(str, enum.Enum):
    """Vehicle classes. The string value is what datasets and configs write."""

    CAR = "car"
    VAN = "van"
    TRUCK = "truck"
    BUS = "bus"


class Role(str, enum.Enum):
    """Who drives an actor: a connected vehicle (CAV: has a LiDAR, may be controlled by a planner),
    a human-driven background vehicle (driver model), or a parked vehicle (static)."""

    CONNECTED = "connected"
    HUMAN = "human"
    PARKED = "parked"


class Semantic(enum.IntEnum):
    """Per-point semantic class. Values are CARLA 0.9.14+ semantic tags, so embedded and CARLA
    semantic LiDAR data share one table."""

    NONE = 0
    ROAD = 1
    SIDEWALK = 2
    BUILDING = 3
    TERRAIN = 10
    CAR = 14  # CARLA tags vans as cars too
    TRUCK = 15
    BUS = 16

    @staticmethod
    def of_kind(kind: ActorKind) -> Semantic:
        return {
            ActorKind.CAR: Semantic.CAR,
            ActorKind.VAN: Semantic.CAR,
            ActorKind.TRUCK: Semantic.TRUCK,
            ActorKind.BUS: Semantic.BUS,
        }[kind]


@dataclass(frozen=True)
class LidarConfig:
    """A rotating LiDAR described with CARLA's ``sensor.lidar.ray_cast`` attribute names.

    Points per tick = ``points_per_second / rotation_frequency``; rays are spread over
    ``channels`` rows evenly spaced between ``lower_fov`` and ``upper_fov`` (degrees) and
    ``columns`` = points per tick / channels azimuths over ``horizontal_fov`` (degrees).
    """

    channels: int = 32
    range: float = 100.0
    """maximum distance in metres"""
    points_per_second: int = 56000
    rotation_frequency: float = 10.0
    """Hz; one full sweep per simulation tick when equal to the tick rate"""
    upper_fov: float = 10.0
    lower_fov: float = -30.0
    horizontal_fov: float = 360.0
    atmosphere_attenuation_rate: float = 0.004
    """intensity = exp(-rate * distance), as CARLA"""
    dropoff_general_rate: float = 0.45
    """fraction of points dropped at random"""
    dropoff_intensity_limit: float = 0.8
    """above this intensity no point is dropped by the intensity-based drop-off"""
    dropoff_zero_intensity: float = 0.4
    """drop probability of a point whose intensity is zero"""
    noise_stddev: float = 0.0
    """standard deviation of range noise along each ray, metres"""
    mount_x: float = 0.0
    mount_y: float = 0.0
    mount_z: float = 0.3
    """mount position on the vehicle: metres above the roof (z from the box top)"""

    @property
    def columns(self) -> int:
        return round(self.points_per_second / self.rotation_frequency / self.channels)

    def validate(self) -> None:
        problems = []
        if self.channels < 1:
            problems.append(f"channels must be >= 1, got {self.channels}")
        if self.range <= 0:
            problems.append(f"range must be > 0, got {self.range}")
        if self.rotation_frequency <= 0:
            problems.append(f"rotation_frequency must be > 0, got {self.rotation_frequency}")
        if self.channels >= 1 and self.rotation_frequency > 0 and self.columns < 1:
            problems.append("points_per_second / rotation_frequency / channels must be >= 1")
        if not self.lower_fov < self.upper_fov:
            problems.append(f"lower_fov ({self.lower_fov}) must be below upper_fov ({self.upper_fov})")
        if not 0 < self.horizontal_fov <= 360:
            problems.append(f"horizontal_fov must be in (0, 360], got {self.horizontal_fov}")
        for name in ("dropoff_general_rate", "dropoff_intensity_limit", "dropoff_zero_intensity"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {v}")
        if self.noise_stddev < 0:
            problems.append(f"noise_stddev must be >= 0, got {self.noise_stddev}")
        if problems:
            raise ValueError("invalid LidarConfig: " + "; ".join(problems))


@dataclass
class AgentState:
    """One dynamic or parked vehicle.

    Attributes:
        id: unique, stable over an episode (>= 0).
        kind: vehicle class.
        role: connected / human / parked.
        T_world_from_agent: (4, 4) float64 pose of the box's bottom centre, x along the heading.
        velocity: (3,) float64 world-frame velocity, m/s.
        extent: (3,) float64 full box size (dx length, dy width, dz height), metres.
        steering: current front-wheel angle, radians (0 for parked vehicles).
    """

    id: int
    kind: ActorKind
    role: Role
    T_world_from_agent: np.ndarray
    velocity: np.ndarray
    extent: np.ndarray
    steering: float = 0.0

    @property
    def connected(self) -> bool:
        return self.role is Role.CONNECTED

    @property
    def speed(self) -> float:
        return float(np.linalg.norm(self.velocity[:2]))

    @property
    def yaw(self) -> float:
        return yaw_of(self.T_world_from_agent)

    @property
    def box(self) -> np.ndarray:
        """(7,) world box in the mmdet3d LiDAR convention."""
        t = self.T_world_from_agent[:3, 3]
        return np.array([t[0], t[1], t[2], *self.extent, self.yaw], dtype=np.float64)


@dataclass
class LidarScan:
    """One LiDAR sweep of one connected vehicle.

    Attributes:
        agent_id: id of the vehicle carrying the sensor.
        points: (N, 4) float32 x, y, z, intensity in the sensor frame.
        instance_id: (N,) int32 id of the actor each point hit, -1 for ground and buildings.
        semantic: (N,) uint8 :class:`Semantic` class of each point.
        T_world_from_sensor: (4, 4) float64 sensor pose.
        config: the sensor's configuration.
    """

    agent_id: int
    points: np.ndarray
    instance_id: np.ndarray
    semantic: np.ndarray
    T_world_from_sensor: np.ndarray
    config: LidarConfig

    def validate(self) -> None:
        n = len(self.points)
        assert self.points.dtype == np.float32 and self.points.shape == (n, 4), self.points.shape
        assert self.instance_id.dtype == np.int32 and self.instance_id.shape == (n,)
        assert self.semantic.dtype == np.uint8 and self.semantic.shape == (n,)
        assert self.T_world_from_sensor.shape == (4, 4)


@dataclass
class SceneFrame:
    """Everything a World knows at one tick.

    Attributes:
        frame: tick index since reset (0 at reset).
        time_s: simulation time, seconds.
        agents: all vehicles (connected, human and parked), ordered by id.
        scans: LiDAR sweep of each connected vehicle, keyed by agent id.
        points_in_box: for each connected vehicle id, (M,) int32 number of its LiDAR points that
            hit each agent, aligned with ``agents`` (visibility ground truth).
        collisions: pairs ``(id_a, id_b)``, id_a < id_b, of vehicles whose boxes overlap now.
        traffic_lights: state of each signal head id: "green", "yellow" or "red".
        scenario: name of the scenario that produced the frame.
        hidden_agent_ids: ids the scenario marks as the danger hidden from the ego.
        ego_id: the scenario's ego vehicle (a connected vehicle).
    """

    frame: int
    time_s: float
    agents: list[AgentState]
    scans: dict[int, LidarScan]
    points_in_box: dict[int, np.ndarray]
    collisions: list[tuple[int, int]] = field(default_factory=list)
    traffic_lights: dict[int, str] = field(default_factory=dict)
    scenario: str = ""
    hidden_agent_ids: tuple[int, ...] = ()
    ego_id: int = 0

    @property
    def boxes_world(self) -> np.ndarray:
        """(M, 7) world boxes of all agents, aligned with ``agents``."""
        if not self.agents:
            return np.zeros((0, 7))
        return np.stack([a.box for a in self.agents])

    @property
    def agent_ids(self) -> np.ndarray:
        return np.array([a.id for a in self.agents], dtype=np.int64)

    @property
    def connected_ids(self) -> list[int]:
        return [a.id for a in self.agents if a.connected]

    def agent(self, agent_id: int) -> AgentState:
        for a in self.agents:
            if a.id == agent_id:
                return a
        raise KeyError(f"no agent {agent_id} in frame {self.frame}")

    def visible_union(self) -> np.ndarray:
        """(M,) int32 points on each agent summed over every connected vehicle's scan."""
        total = np.zeros(len(self.agents), dtype=np.int32)
        for counts in self.points_in_box.values():
            total += counts
        return total

    def validate(self) -> None:
        ids = [a.id for a in self.agents]
        assert ids == sorted(set(ids)), "agents must have unique ids in increasing order"
        for agent_id, scan in self.scans.items():
            assert scan.agent_id == agent_id
            scan.validate()
            assert self.points_in_box[agent_id].shape == (len(self.agents),)


@dataclass(frozen=True)
class VehicleControl:
    """A low-level command for one vehicle's kinematic bicycle.

    Attributes:
        acceleration: longitudinal acceleration, m/s^2 (negative brakes).
        steering: front-wheel angle, radians, positive turns left.
    """

    acceleration: float = 0.0
    steering: float = 0.0


@runtime_checkable
class World(Protocol):
    """What every backend (embedded, CARLA) implements.

    Connected vehicles with no entry in ``actions`` drive themselves with the background driver
    model (like CARLA's autopilot), which is what data generation uses.
    """

    dt: float
    """seconds per tick (0.1 by default, 10 Hz)"""

    def reset(self, seed: int) -> SceneFrame: ...

    def step(self, actions: dict[int, VehicleControl] | None = None) -> SceneFrame: ...

    def close(self) -> None: ...
