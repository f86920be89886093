"""A recorded stand-in of the ``carla`` 0.9.16 client module, for tests on machines without a server.

It implements exactly the part of the API listed in ``sim.carla_world.CARLA_API_USED`` (names,
and method versus attribute as in the real library: ``tests/sim/test_carla_api.py`` checks both)
and fails loudly on anything else. Behind the API sits a small simulated server, one per port,
created on first connection, that keeps its state in our right-handed frame and speaks CARLA's
left-handed frame (y right, degrees) at every API value, so the bridge's conversions are exercised:

- a town: a four-way junction of two-way roads with two lanes per direction (arms of 230 m),
  right-hand traffic, OpenDRIVE-like lane ids (-1, -2 along the road's reference direction, +1,
  +2 against it), junction connections (straight from both lanes, left from the inner and right
  from the outer lane), waypoints with ``next``/``previous``/``get_left_lane``/``get_right_lane``
  following CARLA's ``Map::GetLeft``/``GetRight`` rules, spawn points every 40 m, four traffic
  lights on a fixed two-phase plan (:class:`sim.roads.SignalPlan`);
- vehicles: blueprints with ``base_type`` (car, van, truck, bus and a motorcycle that the bridge
  must skip) and bounding boxes deliberately off-centre in x and y, so that a sign error in the
  bridge's box handling shows up; spawning fails on overlap, like CARLA's "collision at spawn
  position"; under autopilot a vehicle follows its lane at the Traffic Manager's speed, keeps its
  distance, stops at red lights unless told to ignore them and takes junction turns from its TM
  route or the TM's seeded generator; without autopilot, ``VehicleControl`` drives a kinematic
  bicycle (throttle 4 m/s^2, brake 9 m/s^2, positive ``steer`` turns right, 1 = the front
  wheels' ``max_steer_angle``);
- LiDAR: ``sensor.lidar.ray_cast`` measurements produced by the embedded ray caster
  (:func:`sim.lidar.cast_lidar`) on the ground and the vehicles' true boxes, one full sweep per
  tick (spawning a LiDAR whose ``rotation_frequency`` is not the tick rate fails), converted to
  CARLA's left-handed sensor frame and its ``(x, y, z, intensity)`` float32 buffer ordered by
  channel, and delivered through ``listen`` callbacks on ``World.tick``, stamped with the frame.

Differences from a real server that matter when reading tests: callbacks run inside ``tick``
(CARLA calls them from its own threads, possibly after ``tick`` returns), a failing tick raises at
once instead of after the timeout, the Traffic Manager is a lane follower, and physics is the
kinematic bicycle above.

Test control (not part of the carla API, prefixed ``standin_``): :func:`standin_server` returns
the server of a port, whose ``faults`` inject a version mismatch, an unreachable server, a failed
tick, a dropped or stale LiDAR measurement, or failed spawns, and whose ``calls`` record what the
client asked for; :func:`standin_reset` forgets every server.
"""

from __future__ import annotations

import fnmatch
import math
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sim.box_ops import bev_iou
from sim.dynamics import bicycle_step
from sim.geometry import T_from_carla_pose, T_from_xyz_yaw, carla_pose_from_T, wrap_angle
from sim.lidar import StaticGeometry, cast_lidar
from sim.roads import SignalPlan
from sim.routes import Route, line
from sim.types import LidarConfig, Semantic

__all__ = [
    "AttachmentType",
    "Client",
    "LaneType",
    "Location",
    "Rotation",
    "TrafficLightState",
    "Transform",
    "Vector3D",
    "VehicleControl",
    "command",
    "standin_reset",
    "standin_server",
]

CLIENT_VERSION = "0.9.16"
LANE_WIDTH = 3.5
JUNCTION_HALF = 12.0  # metres from the junction centre to where the arms start
ARM_LENGTH = 230.0
SPEED_LIMIT = 50.0 / 3.6  # m/s on every road of the stand-in town
TM_DEFAULT_SLOWDOWN_PCT = 30.0  # CARLA's default global_percentage_speed_difference


def _missing(owner: str) -> Callable[[str], Any]:
    def __getattr__(name: str) -> Any:
        raise AttributeError(
            f"carla stand-in: {owner}.{name} is not implemented. The stand-in implements exactly "
            "sim.carla_world.CARLA_API_USED; add the name there (tests check it against the real "
            "carla 0.9.16 module) before using it."
        )

    return __getattr__


__getattr__ = _missing("carla")


class _Strict:
    """Base of every stand-in class: a clear error for any attribute the stand-in lacks."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(type(self).__name__)(name)


def _timeout_error(seconds: float, port: int) -> RuntimeError:
    return RuntimeError(
        f"time-out of {int(seconds * 1000)}ms while waiting for the simulator, make sure the simulator "
        f"is ready and connected to 127.0.0.1:{port}"
    )


# --------------------------------------------------------------------------------------------------
# value types
# --------------------------------------------------------------------------------------------------


class Vector3D(_Strict):
    def __init__(self, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> None:
        self._xyz = [float(x), float(y), float(z)]

    x = property(lambda self: self._xyz[0], lambda self, v: self._xyz.__setitem__(0, float(v)))
    y = property(lambda self: self._xyz[1], lambda self, v: self._xyz.__setitem__(1, float(v)))
    z = property(lambda self: self._xyz[2], lambda self, v: self._xyz.__setitem__(2, float(v)))


class Location(Vector3D):
    pass


class Rotation(_Strict):
    def __init__(self, pitch: float = 0.0, yaw: float = 0.0, roll: float = 0.0) -> None:
        self._pyr = [float(pitch), float(yaw), float(roll)]

    pitch = property(lambda self: self._pyr[0])
    yaw = property(lambda self: self._pyr[1])
    roll = property(lambda self: self._pyr[2])


class Transform(_Strict):
    def __init__(self, location: Location | None = None, rotation: Rotation | None = None) -> None:
        self._location = location if location is not None else Location()
        self._rotation = rotation if rotation is not None else Rotation()

    location = property(lambda self: self._location)
    rotation = property(lambda self: self._rotation)


def _transform_of(T: np.ndarray) -> Transform:
    """CARLA transform of one of our right-handed poses."""
    x, y, z, roll, yaw, pitch = (float(v) for v in carla_pose_from_T(T))
    return Transform(Location(x, y, z), Rotation(pitch=pitch, yaw=yaw, roll=roll))


def _T_of(transform: Transform) -> np.ndarray:
    loc, rot = transform.location, transform.rotation
    return T_from_carla_pose([loc.x, loc.y, loc.z, rot.roll, rot.yaw, rot.pitch])


class VehicleControl(_Strict):
    def __init__(self, throttle: float = 0.0, steer: float = 0.0, brake: float = 0.0,
                 hand_brake: bool = False, reverse: bool = False, manual_gear_shift: bool = False,
                 gear: int = 0) -> None:
        self._throttle = min(max(float(throttle), 0.0), 1.0)
        self._steer = min(max(float(steer), -1.0), 1.0)
        self._brake = min(max(float(brake), 0.0), 1.0)
        self._hand_brake = bool(hand_brake)

    steer = property(lambda self: self._steer)


class BoundingBox(_Strict):
    def __init__(self, location: Location, extent: Vector3D) -> None:
        self._location, self._extent = location, extent

    location = property(lambda self: self._location)
    extent = property(lambda self: self._extent)


class _EnumValue:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class LaneType(_Strict):
    Driving = _EnumValue("LaneType.Driving")


class TrafficLightState(_Strict):
    Red = _EnumValue("TrafficLightState.Red")
    Yellow = _EnumValue("TrafficLightState.Yellow")
    Green = _EnumValue("TrafficLightState.Green")


class AttachmentType(_Strict):
    Rigid = _EnumValue("AttachmentType.Rigid")


# --------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------


class _SpawnActor(_Strict):
    def __init__(self, blueprint: ActorBlueprint, transform: Transform) -> None:
        self._blueprint, self._transform = blueprint, transform


class _DestroyActor(_Strict):
    def __init__(self, actor_id: int) -> None:
        self._actor_id = int(actor_id)


class _Response(_Strict):
    def __init__(self, actor_id: int = 0, error: str = "") -> None:
        self._actor_id, self._error = int(actor_id), str(error)

    actor_id = property(lambda self: self._actor_id)
    error = property(lambda self: self._error)


_SpawnActor.__name__ = _SpawnActor.__qualname__ = "SpawnActor"
_DestroyActor.__name__ = _DestroyActor.__qualname__ = "DestroyActor"
_Response.__name__ = _Response.__qualname__ = "Response"

command = types.ModuleType("carla.command")
command.SpawnActor = _SpawnActor
command.DestroyActor = _DestroyActor
command.Response = _Response
command.__getattr__ = _missing("carla.command")


# --------------------------------------------------------------------------------------------------
# the town
# --------------------------------------------------------------------------------------------------


@dataclass
class _Lane:
    """One lane in its direction of travel; ``t`` is the distance along it from its start."""

    key: tuple
    route: Route
    road_id: int
    lane_id: int
    is_junction: bool
    successors: list[tuple] = field(default_factory=list)
    predecessors: list[tuple] = field(default_factory=list)
    left: tuple[tuple, bool] | None = None  # (lane key, same direction)
    right: tuple[tuple, bool] | None = None
    light: int | None = None  # arm whose signal head governs the lane's end
    turn: str | None = None  # junction connections: "left", "straight", "right"

    @property
    def length(self) -> float:
        return self.route.length


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


class _Town:
    """The stand-in map (see the module docstring), in our right-handed frame."""

    name = "Carla/Maps/StandinTown"

    def __init__(self) -> None:
        self.lanes: dict[tuple, _Lane] = {}
        w = LANE_WIDTH
        for a in range(4):
            theta = a * math.pi / 2.0
            u = np.array([math.cos(theta), math.sin(theta)])
            r = np.array([math.sin(theta), -math.cos(theta)])  # right of the outward direction
            for k in (1, 2):
                off = (k - 0.5) * w * r
                out_xy = line(tuple(JUNCTION_HALF * u + off), tuple((JUNCTION_HALF + ARM_LENGTH) * u + off), 2.0)
                in_xy = line(tuple((JUNCTION_HALF + ARM_LENGTH) * u - off), tuple(JUNCTION_HALF * u - off), 2.0)
                self.lanes[(a, -k)] = _Lane((a, -k), Route(f"{a}/-{k}", out_xy), a, -k, False)
                self.lanes[(a, k)] = _Lane((a, k), Route(f"{a}/{k}", in_xy), a, k, False, light=a)
            lanes = {k: self.lanes[(a, k)] for k in (-2, -1, 1, 2)}
            lanes[-1].left, lanes[-1].right = ((a, 1), False), ((a, -2), True)
            lanes[-2].left = ((a, -1), True)
            lanes[1].left, lanes[1].right = ((a, -1), False), ((a, 2), True)
            lanes[2].left = ((a, 1), True)
        connections = [(1, "straight", 2, 1), (1, "left", 3, 1), (2, "straight", 2, 2), (2, "right", 1, 2)]
        for a in range(4):
            for k, turn, db, m in connections:
                b = (a + db) % 4
                incoming, outgoing = self.lanes[(a, k)], self.lanes[(b, -m)]
                p, q = incoming.route.xy[-1], outgoing.route.xy[0]
                dp = incoming.route.seg_dir[-1]
                dq = outgoing.route.seg_dir[0]
                c = 0.4 * float(np.linalg.norm(q - p))
                key = ("J", a, k, turn)
                self.lanes[key] = _Lane(key, Route(f"J{a}{k}{turn}", _bezier(p, p + c * dp, q - c * dq, q)),
                                        100 + 10 * a + k, -1, True, successors=[(b, -m)],
                                        predecessors=[(a, k)], turn=turn)
                incoming.successors.append(key)
                outgoing.predecessors.append(key)
        self.static = StaticGeometry.ground_plane(-300.0, 300.0, -300.0, 300.0, z=0.0, semantic=Semantic.ROAD)

    def pose(self, key: tuple, t: float) -> tuple[float, float, float]:
        lane = self.lanes[key]
        x, y = lane.route.point(t)
        return float(x), float(y), float(lane.route.heading(min(max(t, 0.0), lane.length - 1e-6)))

    def advance(self, key: tuple, t: float, d: float) -> list[tuple[tuple, float]]:
        lane = self.lanes[key]
        if t + d <= lane.length + 1e-9:
            return [(key, min(t + d, lane.length))]
        out: list[tuple[tuple, float]] = []
        for nxt in lane.successors:
            out += self.advance(nxt, 0.0, t + d - lane.length)
        return out

    def retreat(self, key: tuple, t: float, d: float) -> list[tuple[tuple, float]]:
        lane = self.lanes[key]
        if t - d >= -1e-9:
            return [(key, max(t - d, 0.0))]
        out: list[tuple[tuple, float]] = []
        for prv in lane.predecessors:
            out += self.retreat(prv, self.lanes[prv].length, d - t)
        return out

    def locate(self, x: float, y: float, heading: float | None = None) -> tuple[tuple, float]:
        """Nearest lane centre (optionally among lanes heading within 60 degrees of ``heading``)."""
        best, best_d = None, math.inf
        for key, lane in self.lanes.items():
            s, _ = lane.route.project(np.array([[x, y]]))
            s0 = float(s[0])
            px, py = lane.route.point(s0)
            d = math.hypot(px - x, py - y)
            if heading is not None and math.cos(float(lane.route.heading(min(s0, lane.length - 1e-6))) - heading) < 0.5:
                continue
            if d < best_d - 1e-9:
                best, best_d = (key, s0), d
        if best is None:  # nothing heads that way (a vehicle driven across the road): nearest lane
            return self.locate(x, y)
        return best


# --------------------------------------------------------------------------------------------------
# server state
# --------------------------------------------------------------------------------------------------


@dataclass
class Faults:
    """What the next ticks and commands do wrong (for the tests)."""

    server_version: str = CLIENT_VERSION
    listening: bool = True
    """False: every request times out, as with no server at the address"""
    fail_tick_in: int | None = None
    """the n-th next tick (1 = the next) raises CARLA's time-out error"""
    drop_lidar_in: int | None = None
    """the n-th next tick delivers no LiDAR measurement"""
    stale_lidar: bool = False
    """every tick first delivers each sensor's previous measurement again"""
    spawn_failures: int = 0
    """this many next SpawnActor commands fail"""


@dataclass
class _Blueprint:
    id: str
    attributes: dict[str, str]
    modifiable: frozenset[str]
    extent: tuple[float, float, float] = (0.0, 0.0, 0.0)
    bbox_location: tuple[float, float, float] = (0.0, 0.0, 0.0)
    max_steer_deg: float = 70.0


def _vehicle_blueprint(name: str, base: str, half: tuple[float, float, float], dx: float, dy: float,
                       steer: float = 70.0, wheels: int = 4) -> _Blueprint:
    return _Blueprint(
        id=f"vehicle.standin.{name}",
        attributes={"base_type": base, "number_of_wheels": str(wheels), "role_name": "autopilot"},
        modifiable=frozenset({"role_name"}),
        extent=half,
        bbox_location=(dx, dy, half[2]),  # box centre in the actor's frame (left-handed)
        max_steer_deg=steer,
    )


_LIDAR_ATTRIBUTES = {
    "channels": "32", "range": "10.0", "points_per_second": "56000", "rotation_frequency": "10.0",
    "upper_fov": "10.0", "lower_fov": "-30.0", "horizontal_fov": "360.0", "atmosphere_attenuation_rate": "0.004",
    "dropoff_general_rate": "0.45", "dropoff_intensity_limit": "0.8", "dropoff_zero_intensity": "0.4",
    "noise_stddev": "0.0", "noise_seed": "0", "sensor_tick": "0.0", "role_name": "front",
}

BLUEPRINTS = [
    _vehicle_blueprint("sedan", "car", (2.30, 0.93, 0.75), 0.12, 0.10),
    _vehicle_blueprint("hatch", "car", (2.05, 0.90, 0.78), 0.08, -0.06),
    _vehicle_blueprint("van", "van", (2.65, 1.00, 1.10), 0.10, 0.05),
    _vehicle_blueprint("truck", "truck", (4.50, 1.25, 1.85), 0.30, 0.0, steer=55.0),
    _vehicle_blueprint("bus", "bus", (6.00, 1.28, 1.60), 0.0, 0.0, steer=55.0),
    _vehicle_blueprint("motorbike", "motorcycle", (1.10, 0.40, 0.80), 0.0, 0.0, wheels=2),
    _Blueprint("sensor.lidar.ray_cast", dict(_LIDAR_ATTRIBUTES), frozenset(_LIDAR_ATTRIBUTES)),
]
_SEMANTIC_OF_BASE = {"car": Semantic.CAR, "van": Semantic.CAR, "truck": Semantic.TRUCK, "bus": Semantic.BUS,
                     "motorcycle": Semantic.NONE}


@dataclass
class _ActorState:
    id: int
    type_id: str
    blueprint: _Blueprint
    attributes: dict[str, str]
    x: float = 0.0
    y: float = 0.0
    yaw: float = 0.0  # ours, radians
    speed: float = 0.0
    lane: tuple | None = None
    t: float = 0.0
    autopilot: bool = False
    tm_port: int = 8000
    control: VehicleControl = field(default_factory=VehicleControl)
    steer: float = 0.0
    parent: int | None = None
    T_parent_from_sensor: np.ndarray | None = None
    callback: Callable[[Any], None] | None = None
    sweeps: int = 0
    last_measurement: Any = None
    truth_instance_id: np.ndarray | None = None
    light_arm: int | None = None

    @property
    def is_vehicle(self) -> bool:
        return self.type_id.startswith("vehicle.")

    @property
    def is_sensor(self) -> bool:
        return self.type_id.startswith("sensor.")

    @property
    def length(self) -> float:
        return 2.0 * self.blueprint.extent[0]

    def box(self) -> np.ndarray:
        """(7,) true bottom-centre box in our frame."""
        ex, ey, ez = self.blueprint.extent
        bx, by, _ = self.blueprint.bbox_location
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        cx, cy = self.x + c * bx - s * (-by), self.y + s * bx + c * (-by)
        return np.array([cx, cy, 0.0, 2 * ex, 2 * ey, 2 * ez, self.yaw])


@dataclass
class _TMState:
    synchronous: bool = False
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    desired: dict[int, float] = field(default_factory=dict)  # m/s
    slowdown_pct: dict[int, float] = field(default_factory=dict)
    ignore_lights: dict[int, float] = field(default_factory=dict)
    routes: dict[int, list[str]] = field(default_factory=dict)


class _Server:
    """The simulated CARLA server of one port (state in our right-handed frame)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.faults = Faults()
        self.calls: list[tuple[str, Any]] = []
        self.settings = (False, None, False)  # synchronous_mode, fixed_delta_seconds, no_rendering_mode
        self.frame = 1000
        self.elapsed = 0.0
        self.lights_origin = 0.0
        self.town = _Town()
        self.actors: dict[int, _ActorState] = {}
        self.next_id = 1
        self.tms: dict[int, _TMState] = {}
        self.plan = SignalPlan()
        for a in range(4):
            light = self._new_actor("traffic.traffic_light", _Blueprint("traffic.traffic_light", {}, frozenset()), {})
            light.light_arm = a
        self.snapshot: dict[int, tuple[Transform, Vector3D]] = {}
        self._take_snapshot()

    # inspection for tests -------------------------------------------------------------------------

    def live_actor_ids(self, kind: str = "") -> list[int]:
        """Ids of vehicles (``kind="vehicle"``), sensors (``"sensor"``) or both (``""``)."""
        return sorted(a.id for a in self.actors.values()
                      if (a.is_vehicle or a.is_sensor) and a.type_id.startswith(kind))

    def tm_synchronous(self, port: int = 8000) -> bool:
        return self.tms.get(port, _TMState()).synchronous

    def true_boxes(self) -> dict[int, np.ndarray]:
        """Actor id -> (7,) true box in our frame, for every vehicle."""
        return {a.id: a.box() for a in self.actors.values() if a.is_vehicle}

    def lidar_truth(self, sensor_id: int) -> np.ndarray:
        """(N,) actor id hit by each point of the sensor's last measurement (-1 for the ground)."""
        truth = self.actors[sensor_id].truth_instance_id
        assert truth is not None
        return truth

    def parent_of(self, sensor_id: int) -> int:
        parent = self.actors[sensor_id].parent
        assert parent is not None
        return parent

    # requests -------------------------------------------------------------------------------------

    def check_reachable(self, timeout_s: float) -> None:
        if not self.faults.listening:
            raise _timeout_error(timeout_s, self.port)

    def _new_actor(self, type_id: str, blueprint: _Blueprint, attributes: dict[str, str]) -> _ActorState:
        actor = _ActorState(id=self.next_id, type_id=type_id, blueprint=blueprint, attributes=attributes)
        self.actors[actor.id] = actor
        self.next_id += 1
        return actor

    def spawn(self, blueprint: ActorBlueprint, transform: Transform, parent: int | None = None) -> tuple[int, str]:
        bp = blueprint._blueprint
        if self.faults.spawn_failures > 0:
            self.faults.spawn_failures -= 1
            self.calls.append(("spawn_failed", bp.id))
            return 0, "Spawn failed because of collision at spawn position"
        if bp.id.startswith("vehicle."):
            T = _T_of(transform)
            candidate = _ActorState(0, bp.id, bp, {}, x=float(T[0, 3]), y=float(T[1, 3]),
                                    yaw=math.atan2(T[1, 0], T[0, 0]))
            others = [a.box() for a in self.actors.values() if a.is_vehicle]
            if others and np.any(bev_iou(candidate.box()[None], np.stack(others)) > 0.0):
                self.calls.append(("spawn_failed", bp.id))
                return 0, "Spawn failed because of collision at spawn position"
            actor = self._new_actor(bp.id, bp, dict(blueprint._attributes))
            actor.x, actor.y, actor.yaw = candidate.x, candidate.y, candidate.yaw
            actor.lane, actor.t = self.town.locate(actor.x, actor.y, actor.yaw)
        elif bp.id == "sensor.lidar.ray_cast":
            if parent not in self.actors:
                return 0, "a LiDAR must be attached to a vehicle"
            dt = self.settings[1]
            rotation = float(blueprint._attributes["rotation_frequency"])
            if dt is None or abs(rotation * dt - 1.0) > 1e-6:
                return 0, (f"stand-in LiDAR simulates one full sweep per tick: rotation_frequency {rotation} "
                           f"must be 1 / fixed_delta_seconds ({dt})")
            actor = self._new_actor(bp.id, bp, dict(blueprint._attributes))
            actor.parent = parent
            actor.T_parent_from_sensor = _T_of(transform)
        else:
            return 0, f"stand-in cannot spawn {bp.id}"
        self.calls.append(("spawn", (actor.id, bp.id)))
        return actor.id, ""

    def destroy(self, actor_id: int) -> str:
        actor = self.actors.get(actor_id)
        if actor is None or not (actor.is_vehicle or actor.is_sensor):
            return f"unable to destroy actor {actor_id}: not found"
        del self.actors[actor_id]
        self.calls.append(("destroy", actor_id))
        return ""

    def tick(self, seconds: float) -> int:
        self.check_reachable(seconds)
        f = self.faults
        if f.fail_tick_in is not None:
            f.fail_tick_in -= 1
            if f.fail_tick_in <= 0:
                f.fail_tick_in = None
                self.calls.append(("tick_failed", self.frame + 1))
                raise _timeout_error(seconds, self.port)
        drop = False
        if f.drop_lidar_in is not None:
            f.drop_lidar_in -= 1
            drop = f.drop_lidar_in <= 0
            if drop:
                f.drop_lidar_in = None
        dt = self.settings[1] or 0.05
        vehicles = sorted((a for a in self.actors.values() if a.is_vehicle), key=lambda a: a.id)
        before = {a.id: (a.lane, a.t, a.speed, a.length) for a in vehicles}
        for actor in vehicles:
            if actor.autopilot:
                self._autopilot(actor, dt, before)
            else:
                self._manual(actor, dt)
        self.frame += 1
        self.elapsed += dt
        self._take_snapshot()
        self._sense(drop)
        return self.frame

    def light_state(self, arm: int) -> str:
        return self.plan.state(arm % 2, self.elapsed - self.lights_origin)

    # physics ----------------------------------------------------------------------------------------

    def _manual(self, actor: _ActorState, dt: float) -> None:
        c = actor.control
        accel = 4.0 * c._throttle - 9.0 * (1.0 if c._hand_brake else c._brake) - 0.02 * actor.speed
        delta = -c._steer * math.radians(actor.blueprint.max_steer_deg)
        wheelbase = 0.6 * actor.length
        x, y, yaw, speed = bicycle_step(*(np.array([v]) for v in (actor.x, actor.y, actor.yaw, actor.speed,
                                                                    accel, delta, wheelbase)), dt)
        actor.x, actor.y, actor.yaw, actor.speed = float(x[0]), float(y[0]), float(yaw[0]), float(speed[0])
        actor.steer = c._steer

    def _autopilot(self, actor: _ActorState, dt: float, before: dict) -> None:
        tm = self.tms.setdefault(actor.tm_port, _TMState())
        lane = self.town.lanes[actor.lane]
        target = tm.desired.get(actor.id, SPEED_LIMIT * (1.0 - tm.slowdown_pct.get(actor.id, TM_DEFAULT_SLOWDOWN_PCT) / 100.0))
        gap = math.inf
        for other_id, (other_lane, other_t, _, other_length) in before.items():
            if other_id != actor.id and other_lane == actor.lane and other_t > actor.t:
                gap = min(gap, other_t - actor.t - (actor.length + other_length) / 2.0)
        if lane.light is not None and tm.ignore_lights.get(actor.id, 0.0) < 100.0:
            to_line = lane.length - actor.t - actor.length / 2.0
            if self.light_state(lane.light) != "green" and to_line > -0.5:
                gap = min(gap, max(to_line, 0.0))
        if math.isfinite(gap):
            target = min(target, max(0.0, (gap - 2.0) / 1.2))
        actor.speed = max(actor.speed + min(max(target - actor.speed, -8.0 * dt), 3.0 * dt), 0.0)
        heading_before = actor.yaw
        remaining = actor.speed * dt
        key, t = actor.lane, actor.t
        while remaining > 0.0:
            lane = self.town.lanes[key]
            if t + remaining <= lane.length:
                t += remaining
                break
            remaining -= lane.length - t
            if not lane.successors:
                t, actor.speed = lane.length, 0.0
                break
            key, t = self._choose(tm, actor.id, lane.successors), 0.0
        actor.lane, actor.t = key, t
        actor.x, actor.y, actor.yaw = self.town.pose(key, t)
        moved = actor.speed * dt
        curvature = float(wrap_angle(actor.yaw - heading_before)) / moved if moved > 1e-6 else 0.0
        delta = math.atan(0.6 * actor.length * curvature)
        actor.steer = min(max(-delta / math.radians(actor.blueprint.max_steer_deg), -1.0), 1.0)

    def _choose(self, tm: _TMState, actor_id: int, options: list[tuple]) -> tuple:
        if len(options) == 1:
            return options[0]
        route = tm.routes.get(actor_id)
        if route:
            wanted = route.pop(0).lower()
            for key in options:
                if self.town.lanes[key].turn == wanted:
                    return key
        return options[int(tm.rng.integers(len(options)))]

    def _take_snapshot(self) -> None:
        snap = {}
        for a in self.actors.values():
            if a.is_vehicle:
                T = T_from_xyz_yaw(a.x, a.y, 0.0, a.yaw)
                v = Vector3D(a.speed * math.cos(a.yaw), -a.speed * math.sin(a.yaw), 0.0)
                snap[a.id] = (_transform_of(T), v)
        self.snapshot = snap
        self.snapshot_frame = self.frame

    # sensing ----------------------------------------------------------------------------------------

    def _sense(self, drop: bool) -> None:
        vehicles = sorted((a for a in self.actors.values() if a.is_vehicle), key=lambda a: a.id)
        boxes = np.stack([a.box() for a in vehicles]) if vehicles else np.zeros((0, 7))
        ids = np.array([a.id for a in vehicles], dtype=np.int64)
        semantic = np.array([_SEMANTIC_OF_BASE[a.blueprint.attributes["base_type"]] for a in vehicles], dtype=np.uint8)
        for sensor in sorted((a for a in self.actors.values() if a.is_sensor), key=lambda a: a.id):
            parent = self.actors.get(sensor.parent)
            if sensor.callback is None or parent is None:
                continue
            attrs = sensor.attributes
            config = LidarConfig(**{name: (int(attrs[name]) if name in ("channels", "points_per_second")
                                           else float(attrs[name]))
                                    for name in ("channels", "range", "points_per_second", "rotation_frequency",
                                                 "upper_fov", "lower_fov", "horizontal_fov",
                                                 "atmosphere_attenuation_rate", "dropoff_general_rate",
                                                 "dropoff_intensity_limit", "dropoff_zero_intensity", "noise_stddev")})
            T_world_from_sensor = T_from_xyz_yaw(parent.x, parent.y, 0.0, parent.yaw) @ sensor.T_parent_from_sensor
            rng = np.random.default_rng([int(attrs["noise_seed"]) % 2**32, sensor.sweeps])
            sensor.sweeps += 1
            hits = cast_lidar(config, T_world_from_sensor, self.town.static, boxes, ids, semantic, parent.id, rng)
            points = hits.points.copy()
            elevation = np.degrees(np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1])))
            span = max(config.upper_fov - config.lower_fov, 1e-9)
            channel = np.clip(np.rint((elevation - config.lower_fov) / span * (config.channels - 1)), 0,
                              config.channels - 1).astype(np.int64)
            points[:, 1] = -points[:, 1]  # to CARLA's left-handed sensor frame
            measurement = LidarMeasurement(self.frame, _transform_of(T_world_from_sensor), points.tobytes(),
                                           np.bincount(channel, minlength=config.channels))
            sensor.truth_instance_id = hits.instance_id.copy()
            if self.faults.stale_lidar and sensor.last_measurement is not None:
                sensor.callback(sensor.last_measurement)
            sensor.last_measurement = measurement
            if drop:
                self.calls.append(("lidar_dropped", (sensor.id, self.frame)))
                continue
            sensor.callback(measurement)


_SERVERS: dict[int, _Server] = {}


def standin_server(port: int = 2000) -> _Server:
    """The stand-in server listening on ``port`` (created on first use)."""
    if port not in _SERVERS:
        _SERVERS[port] = _Server(port)
    return _SERVERS[port]


def standin_reset() -> None:
    """Forget every stand-in server (each test starts from a fresh one)."""
    _SERVERS.clear()


# --------------------------------------------------------------------------------------------------
# client-side API
# --------------------------------------------------------------------------------------------------


class Client(_Strict):
    def __init__(self, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> None:
        self._server = standin_server(int(port))
        self._timeout = 5.0

    def set_timeout(self, seconds: float) -> None:
        self._timeout = float(seconds)

    def get_client_version(self) -> str:
        return CLIENT_VERSION

    def get_server_version(self) -> str:
        self._server.check_reachable(self._timeout)
        return self._server.faults.server_version

    def get_world(self) -> World:
        self._server.check_reachable(self._timeout)
        return World(self._server, self)

    def load_world(self, map_name: str, reset_settings: bool = True, map_layers: Any = None) -> World:
        self._server.check_reachable(self._timeout)
        if not _Town.name.endswith(map_name):
            raise RuntimeError(f"map '{map_name}' not found")
        return World(self._server, self)

    def get_trafficmanager(self, client_connection: int = 8000) -> TrafficManager:
        self._server.check_reachable(self._timeout)
        self._server.tms.setdefault(int(client_connection), _TMState())
        return TrafficManager(self._server, int(client_connection))

    def apply_batch_sync(self, commands: list[Any], do_tick: bool = False) -> list[_Response]:
        self._server.check_reachable(self._timeout)
        out = []
        for c in commands:
            if isinstance(c, _SpawnActor):
                out.append(_Response(*self._server.spawn(c._blueprint, c._transform)))
            elif isinstance(c, _DestroyActor):
                out.append(_Response(c._actor_id, self._server.destroy(c._actor_id)))
            else:
                raise TypeError(f"carla stand-in: batch command {type(c).__name__} is not implemented")
        if do_tick:
            self._server.tick(self._timeout)
        return out


class WorldSettings(_Strict):
    def __init__(self, synchronous_mode: bool = False, fixed_delta_seconds: float | None = None,
                 no_rendering_mode: bool = False) -> None:
        self._values = [bool(synchronous_mode), fixed_delta_seconds, bool(no_rendering_mode)]

    synchronous_mode = property(lambda self: self._values[0], lambda self, v: self._values.__setitem__(0, bool(v)))
    fixed_delta_seconds = property(
        lambda self: self._values[1],
        lambda self, v: self._values.__setitem__(1, float(v) if v is not None and float(v) > 0.0 else None),
    )
    no_rendering_mode = property(lambda self: self._values[2], lambda self, v: self._values.__setitem__(2, bool(v)))


class World(_Strict):
    def __init__(self, server: _Server, client: Client) -> None:
        self._server, self._client = server, client

    def get_settings(self) -> WorldSettings:
        return WorldSettings(*self._server.settings)

    def apply_settings(self, settings: WorldSettings, seconds: float = 0.0) -> int:
        self._server.check_reachable(self._client._timeout)
        self._server.settings = tuple(settings._values)
        self._server.calls.append(("apply_settings", self._server.settings))
        return self._server.frame

    def tick(self, seconds: float = 0.0) -> int:
        return self._server.tick(seconds or self._client._timeout)

    def get_map(self) -> Map:
        return Map(self._server.town)

    def get_blueprint_library(self) -> BlueprintLibrary:
        return BlueprintLibrary([ActorBlueprint(bp) for bp in BLUEPRINTS])

    def get_actors(self, actor_ids: list[int] | None = None) -> ActorList:
        states = self._server.actors
        chosen = sorted(states) if actor_ids is None else [int(i) for i in actor_ids if int(i) in states]
        return ActorList([_handle(self._server, self._client, states[i]) for i in chosen])

    def spawn_actor(self, blueprint: ActorBlueprint, transform: Transform, attach_to: Actor | None = None,
                    attachment_type: Any = AttachmentType.Rigid, bone: str = "") -> Actor:
        self._server.check_reachable(self._client._timeout)
        actor_id, error = self._server.spawn(blueprint, transform, None if attach_to is None else attach_to.id)
        if error:
            raise RuntimeError(error)
        return _handle(self._server, self._client, self._server.actors[actor_id])

    def get_snapshot(self) -> WorldSnapshot:
        return WorldSnapshot(self._server.snapshot_frame, dict(self._server.snapshot))

    def reset_all_traffic_lights(self) -> None:
        self._server.lights_origin = self._server.elapsed
        self._server.calls.append(("reset_all_traffic_lights", self._server.frame))


class WorldSnapshot(_Strict):
    def __init__(self, frame: int, states: dict[int, tuple[Transform, Vector3D]]) -> None:
        self._frame, self._states = frame, states

    frame = property(lambda self: self._frame)

    def find(self, actor_id: int) -> ActorSnapshot | None:
        state = self._states.get(int(actor_id))
        return None if state is None else ActorSnapshot(*state)


class ActorSnapshot(_Strict):
    def __init__(self, transform: Transform, velocity: Vector3D) -> None:
        self._transform, self._velocity = transform, velocity

    def get_transform(self) -> Transform:
        return self._transform

    def get_velocity(self) -> Vector3D:
        return self._velocity


class TrafficManager(_Strict):
    def __init__(self, server: _Server, port: int) -> None:
        self._server, self._port = server, port

    @property
    def _state(self) -> _TMState:
        return self._server.tms.setdefault(self._port, _TMState())

    def set_synchronous_mode(self, mode_switch: bool = True) -> None:
        self._state.synchronous = bool(mode_switch)
        self._server.calls.append(("tm.set_synchronous_mode", bool(mode_switch)))

    def set_random_device_seed(self, value: int) -> None:
        self._state.rng = np.random.default_rng(int(value))
        self._server.calls.append(("tm.set_random_device_seed", int(value)))

    def get_port(self) -> int:
        return self._port

    def set_desired_speed(self, actor: Actor, speed: float) -> None:
        self._state.desired[actor.id] = float(speed) / 3.6  # km/h

    def vehicle_percentage_speed_difference(self, actor: Actor, percentage: float) -> None:
        self._state.slowdown_pct[actor.id] = float(percentage)

    def ignore_lights_percentage(self, actor: Actor, perc: float) -> None:
        self._state.ignore_lights[actor.id] = float(perc)

    def set_route(self, actor: Actor, path: list[str], empty_buffer: bool = True) -> None:
        for step in path:
            if step not in ("Left", "Right", "Straight"):
                raise RuntimeError(f"unknown route instruction {step!r}")
        self._state.routes[actor.id] = list(path)


class Map(_Strict):
    def __init__(self, town: _Town) -> None:
        self._town = town

    name = property(lambda self: self._town.name)

    def get_spawn_points(self) -> list[Transform]:
        out = []
        for key, lane in self._town.lanes.items():
            if not lane.is_junction:
                for t in (25.0, 65.0, 105.0, 145.0, 185.0):
                    x, y, heading = self._town.pose(key, t)
                    out.append(_transform_of(T_from_xyz_yaw(x, y, 0.5, heading)))
        return out

    def get_waypoint(self, location: Location, project_to_road: bool = True, lane_type: Any = LaneType.Driving) -> Waypoint:
        key, t = self._town.locate(location.x, -location.y)
        return Waypoint(self._town, key, t)

    def generate_waypoints(self, distance: float) -> list[Waypoint]:
        out = []
        for key, lane in self._town.lanes.items():
            for t in np.arange(0.0, lane.length, float(distance)):
                out.append(Waypoint(self._town, key, float(t)))
        return out


class Waypoint(_Strict):
    def __init__(self, town: _Town, key: tuple, t: float) -> None:
        self._town, self._key, self._t = town, key, float(t)

    @property
    def transform(self) -> Transform:
        x, y, heading = self._town.pose(self._key, self._t)
        return _transform_of(T_from_xyz_yaw(x, y, 0.0, heading))

    is_junction = property(lambda self: self._town.lanes[self._key].is_junction)
    lane_type = property(lambda self: LaneType.Driving)

    def next(self, distance: float) -> list[Waypoint]:
        return [Waypoint(self._town, k, t) for k, t in self._town.advance(self._key, self._t, float(distance))]

    def previous(self, distance: float) -> list[Waypoint]:
        return [Waypoint(self._town, k, t) for k, t in self._town.retreat(self._key, self._t, float(distance))]

    def _side(self, link: tuple[tuple, bool] | None) -> Waypoint | None:
        if link is None:
            return None
        key, same = link
        length = self._town.lanes[key].length
        return Waypoint(self._town, key, self._t if same else length - self._t)

    def get_left_lane(self) -> Waypoint | None:
        return self._side(self._town.lanes[self._key].left)

    def get_right_lane(self) -> Waypoint | None:
        return self._side(self._town.lanes[self._key].right)


class ActorAttribute(_Strict):
    def __init__(self, value: str) -> None:
        self._value = value

    def as_str(self) -> str:
        return self._value


class ActorBlueprint(_Strict):
    def __init__(self, blueprint: _Blueprint) -> None:
        self._blueprint = blueprint
        self._attributes = dict(blueprint.attributes)

    id = property(lambda self: self._blueprint.id)

    def has_attribute(self, id: str) -> bool:
        return id in self._attributes

    def get_attribute(self, id: str) -> ActorAttribute:
        if id not in self._attributes:
            raise IndexError(f"blueprint '{self.id}' has no attribute '{id}'")
        return ActorAttribute(self._attributes[id])

    def set_attribute(self, id: str, value: str) -> None:
        if id not in self._attributes:
            raise IndexError(f"blueprint '{self.id}' has no attribute '{id}'")
        if id not in self._blueprint.modifiable:
            raise RuntimeError(f"attribute '{id}' of '{self.id}' is not modifiable")
        if not isinstance(value, str):
            raise TypeError(f"attribute values are strings, got {type(value).__name__}")
        self._attributes[id] = value


class BlueprintLibrary(_Strict):
    def __init__(self, blueprints: list[ActorBlueprint]) -> None:
        self._blueprints = blueprints

    def filter(self, wildcard_pattern: str) -> BlueprintLibrary:
        return BlueprintLibrary([b for b in self._blueprints if fnmatch.fnmatch(b.id, wildcard_pattern)])

    def find(self, id: str) -> ActorBlueprint:
        for b in self._blueprints:
            if b.id == id:
                return ActorBlueprint(b._blueprint)
        raise IndexError(f"no blueprint with id '{id}'")

    def __iter__(self) -> Iterator[ActorBlueprint]:
        return iter(self._blueprints)

    def __len__(self) -> int:
        return len(self._blueprints)


class ActorList(_Strict):
    def __init__(self, actors: list[Actor]) -> None:
        self._actors = actors

    def filter(self, wildcard_pattern: str) -> ActorList:
        return ActorList([a for a in self._actors if fnmatch.fnmatch(a._state.type_id, wildcard_pattern)])

    def __iter__(self) -> Iterator[Actor]:
        return iter(self._actors)

    def __len__(self) -> int:
        return len(self._actors)


class Actor(_Strict):
    def __init__(self, server: _Server, client: Client, state: _ActorState) -> None:
        self._server, self._client, self._state = server, client, state

    id = property(lambda self: self._state.id)

    @property
    def bounding_box(self) -> BoundingBox:
        bx, by, bz = self._state.blueprint.bbox_location
        ex, ey, ez = self._state.blueprint.extent
        return BoundingBox(Location(bx, by, bz), Vector3D(ex, ey, ez))

    def _alive(self) -> _ActorState:
        if self._state.id not in self._server.actors:
            raise RuntimeError(f"trying to operate on a destroyed actor; an actor's function was called, but the actor is already destroyed (id {self._state.id})")
        return self._state


class Vehicle(Actor):
    def apply_control(self, control: VehicleControl) -> None:
        self._alive().control = control

    def get_control(self) -> VehicleControl:
        return VehicleControl(steer=self._state.steer)

    def get_physics_control(self) -> VehiclePhysicsControl:
        front = self._state.blueprint.max_steer_deg
        return VehiclePhysicsControl([WheelPhysicsControl(front), WheelPhysicsControl(front),
                                      WheelPhysicsControl(0.0), WheelPhysicsControl(0.0)])

    def set_autopilot(self, enabled: bool = True, tm_port: int = 8000) -> None:
        state = self._alive()
        if enabled and not state.autopilot:  # the TM takes the vehicle from the lane it is on
            state.lane, state.t = self._server.town.locate(state.x, state.y, state.yaw)
        state.autopilot, state.tm_port = bool(enabled), int(tm_port)
        self._server.calls.append(("set_autopilot", (state.id, bool(enabled))))

    def set_target_velocity(self, velocity: Vector3D) -> None:
        state = self._alive()
        vx, vy = velocity.x, -velocity.y  # ours
        forward = vx * math.cos(state.yaw) + vy * math.sin(state.yaw)
        sideways = -vx * math.sin(state.yaw) + vy * math.cos(state.yaw)
        state.speed = max(forward, 0.0)  # the kinematic model cannot slide: the sideways part is lost
        self._server.calls.append(("set_target_velocity", (state.id, forward, sideways)))


class Sensor(Actor):
    def listen(self, callback: Callable[[Any], None]) -> None:
        self._alive().callback = callback
        self._server.calls.append(("listen", self._state.id))

    def stop(self) -> None:
        self._state.callback = None
        self._server.calls.append(("stop", self._state.id))

    def is_listening(self) -> bool:
        return self._state.callback is not None


class TrafficLight(Actor):
    def get_state(self) -> Any:
        name = self._server.light_state(self._state.light_arm or 0)
        return {"red": TrafficLightState.Red, "yellow": TrafficLightState.Yellow,
                "green": TrafficLightState.Green}[name]


def _handle(server: _Server, client: Client, state: _ActorState) -> Actor:
    if state.is_vehicle:
        return Vehicle(server, client, state)
    if state.is_sensor:
        return Sensor(server, client, state)
    return TrafficLight(server, client, state)


class VehiclePhysicsControl(_Strict):
    def __init__(self, wheels: list[WheelPhysicsControl]) -> None:
        self._wheels = wheels

    wheels = property(lambda self: list(self._wheels))


class WheelPhysicsControl(_Strict):
    def __init__(self, max_steer_angle: float) -> None:
        self._max_steer_angle = float(max_steer_angle)

    max_steer_angle = property(lambda self: self._max_steer_angle)


class LidarMeasurement(_Strict):
    def __init__(self, frame: int, transform: Transform, raw: bytes, counts: np.ndarray) -> None:
        self._frame, self._transform, self._raw, self._counts = frame, transform, raw, counts

    frame = property(lambda self: self._frame)
    transform = property(lambda self: self._transform)
    raw_data = property(lambda self: self._raw)
    channels = property(lambda self: len(self._counts))

    def get_point_count(self, channel: int) -> int:
        return int(self._counts[int(channel)])
