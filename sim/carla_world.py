"""The CARLA 0.9.16 backend of the :class:`sim.types.World` protocol.

``CarlaWorld`` drives a running CARLA server through the ``carla`` client library:

- **Connection**: ``carla.Client(host, port)`` with ``set_timeout``; the first call that reaches
  the server (``get_server_version``) fails after that timeout with a :class:`CarlaConnectionError`
  when nothing answers. Client and server versions must be equal (:class:`CarlaVersionError`).
- **Time**: synchronous mode with ``fixed_delta_seconds = dt`` (at most 0.1 s, the limit of
  CARLA's physics sub-stepping with its default ``max_substeps * max_substep_delta_time``); the
  Traffic Manager in synchronous mode, seeded with the episode's seed at every ``reset``.
  ``world.tick(timeout)`` advances one step; a tick that does not complete in time raises
  :class:`CarlaTimeoutError`.
- **Scenarios**: the scenario names and meaning of :mod:`sim.scenarios`, placed on the loaded town
  through map waypoints (:mod:`sim.carla_scenarios`). Vehicles are spawned in one batch
  (``command.SpawnActor`` through ``Client.apply_batch_sync``); a vehicle whose spawn fails is
  retried at waypoints a few metres ahead and behind (``spawn_retries`` rounds), background
  vehicles that still fail are dropped, a scenario vehicle that still fails is a
  :class:`CarlaSpawnError`.
- **Sensors**: one ``sensor.lidar.ray_cast`` per connected vehicle, with the attribute names of
  :class:`sim.types.LidarConfig` and ``rotation_frequency = 1 / dt`` (one sweep per tick), on the
  roof (``mount_z`` above the bounding box's top). Each sensor's ``listen`` callback feeds a
  queue; after a tick the measurement whose ``frame`` equals the tick's frame is taken, older
  ones are discarded, and none within the timeout is a :class:`CarlaTimeoutError`.
- **Ground truth**: from the world snapshot of the tick's frame (``get_snapshot``): actor
  transforms and velocities, and each vehicle's ``bounding_box`` (extent = half sizes, location
  = box centre in the actor's frame). The bottom centre is ``location + bbox.location - extent.z``
  in the actor's frame. ``ray_cast`` points carry no actor id, so each point's ``instance_id``
  is the vehicle box containing it (boxes grown by 3 cm sideways and on top, their lowest 5 cm
  left out so that ground returns around a wheel are not counted); semantic classes are known
  only for those points (:class:`sim.types.Semantic` of the vehicle's kind; others get ``NONE``).
- **Frames**: CARLA is left-handed (y right) with degrees. Conversion happens here only, with the
  helpers of :mod:`sim.geometry` (``T_from_carla_pose``, ``carla_pose_from_T``): poses are
  mirrored in y on both sides, vectors and points have y negated.
- **Control**: see :class:`ControlMapping`. Connected vehicles with an action are driven by it
  (autopilot off); every other vehicle is driven by the Traffic Manager (autopilot on).
- **Cleanup**: ``close()`` (also the context manager's exit, and automatically when ``reset`` or
  ``step`` raises, Ctrl-C included) restores the world's original settings and the Traffic
  Manager's synchronous mode, then destroys every actor this object spawned; each of these is
  attempted even when another fails.

Every attribute, class and method of the ``carla`` module used here is listed in
:data:`CARLA_API_USED`; ``tests/sim/test_carla_api.py`` checks that list against the installed
client library and against this file's source, and the test stand-in implements exactly it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import queue
import re
import time
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from sim.box_ops import bev_iou, points_in_boxes
from sim.carla_scenarios import LaneWalker, Placement, ScenarioPlan, alternative_waypoints, plan_scenario
from sim.geometry import T_from_carla_pose, carla_pose_from_T, invert_T, transform_boxes
from sim.lidar import lidar_preset
from sim.scenarios import SCENARIOS, ScenarioParams
from sim.types import (
    ActorKind,
    AgentState,
    LidarConfig,
    LidarScan,
    Role,
    SceneFrame,
    Semantic,
    VehicleControl,
)

__all__ = [
    "CARLA_API_USED",
    "CARLA_KEYWORDS_USED",
    "CARLA_VERSION",
    "CarlaCleanupError",
    "CarlaConnectionError",
    "CarlaError",
    "CarlaSpawnError",
    "CarlaTimeoutError",
    "CarlaVersionError",
    "CarlaWorld",
    "ControlMapping",
    "T_actor_from_agent",
    "T_from_carla_transform",
    "carla_transform_from_T",
    "lidar_attributes",
    "load_carla_module",
    "make_carla_world",
    "points_from_measurement",
    "vector_from_carla",
]

CARLA_VERSION = "0.9.16"
"""the client library version this bridge was written and checked against"""

# Every use of the carla module in sim/carla_world.py and sim/carla_scenarios.py, as
# (owner, name): owner "" is the module itself, "command" its command submodule, otherwise a
# class reached from the module ("command.Response" for carla.command.Response). Enum values are
# (enum, value). A member inherited from a base class is listed under the class that defines it
# in CARLA's documentation (Actor for bounding_box, Vehicle for set_autopilot).
CARLA_API_USED: tuple[tuple[str, str], ...] = (
    ("", "AttachmentType"),
    ("", "Client"),
    ("", "LaneType"),
    ("", "Location"),
    ("", "Rotation"),
    ("", "TrafficLightState"),
    ("", "Transform"),
    ("", "Vector3D"),
    ("", "VehicleControl"),
    ("", "command"),
    ("command", "DestroyActor"),
    ("command", "SpawnActor"),
    ("command.Response", "actor_id"),
    ("command.Response", "error"),
    ("AttachmentType", "Rigid"),
    ("LaneType", "Driving"),
    ("TrafficLightState", "Green"),
    ("TrafficLightState", "Red"),
    ("TrafficLightState", "Yellow"),
    ("Client", "apply_batch_sync"),
    ("Client", "get_client_version"),
    ("Client", "get_server_version"),
    ("Client", "get_trafficmanager"),
    ("Client", "get_world"),
    ("Client", "load_world"),
    ("Client", "set_timeout"),
    ("World", "apply_settings"),
    ("World", "get_actors"),
    ("World", "get_blueprint_library"),
    ("World", "get_map"),
    ("World", "get_settings"),
    ("World", "get_snapshot"),
    ("World", "reset_all_traffic_lights"),
    ("World", "spawn_actor"),
    ("World", "tick"),
    ("WorldSettings", "fixed_delta_seconds"),
    ("WorldSettings", "no_rendering_mode"),
    ("WorldSettings", "synchronous_mode"),
    ("WorldSnapshot", "find"),
    ("WorldSnapshot", "frame"),
    ("ActorSnapshot", "get_transform"),
    ("ActorSnapshot", "get_velocity"),
    ("TrafficManager", "get_port"),
    ("TrafficManager", "ignore_lights_percentage"),
    ("TrafficManager", "set_desired_speed"),
    ("TrafficManager", "set_random_device_seed"),
    ("TrafficManager", "set_route"),
    ("TrafficManager", "set_synchronous_mode"),
    ("TrafficManager", "vehicle_percentage_speed_difference"),
    ("Map", "generate_waypoints"),
    ("Map", "get_spawn_points"),
    ("Map", "get_waypoint"),
    ("Map", "name"),
    ("Waypoint", "get_left_lane"),
    ("Waypoint", "get_right_lane"),
    ("Waypoint", "is_junction"),
    ("Waypoint", "lane_type"),
    ("Waypoint", "next"),
    ("Waypoint", "previous"),
    ("Waypoint", "transform"),
    ("BlueprintLibrary", "filter"),
    ("BlueprintLibrary", "find"),
    ("ActorBlueprint", "get_attribute"),
    ("ActorBlueprint", "has_attribute"),
    ("ActorBlueprint", "id"),
    ("ActorBlueprint", "set_attribute"),
    ("ActorAttribute", "as_str"),
    ("ActorList", "filter"),
    ("Actor", "bounding_box"),
    ("Actor", "id"),
    ("Vehicle", "apply_control"),
    ("Vehicle", "get_control"),
    ("Vehicle", "get_physics_control"),
    ("Vehicle", "set_autopilot"),
    ("Vehicle", "set_target_velocity"),
    ("VehiclePhysicsControl", "wheels"),
    ("WheelPhysicsControl", "max_steer_angle"),
    ("Sensor", "is_listening"),
    ("Sensor", "listen"),
    ("Sensor", "stop"),
    ("TrafficLight", "get_state"),
    ("LidarMeasurement", "channels"),
    ("LidarMeasurement", "frame"),
    ("LidarMeasurement", "get_point_count"),
    ("LidarMeasurement", "raw_data"),
    ("LidarMeasurement", "transform"),
    ("BoundingBox", "extent"),
    ("BoundingBox", "location"),
    ("Transform", "location"),
    ("Transform", "rotation"),
    ("Vector3D", "x"),
    ("Vector3D", "y"),
    ("Vector3D", "z"),
    ("Rotation", "pitch"),
    ("Rotation", "roll"),
    ("Rotation", "yaw"),
    ("VehicleControl", "steer"),
)

# Keyword arguments passed to carla callables, checked against the real signatures (the
# ``(type)name=`` entries of their boost.python docstrings).
CARLA_KEYWORDS_USED: dict[tuple[str, str], tuple[str, ...]] = {
    ("Location", "__init__"): ("x", "y", "z"),
    ("Rotation", "__init__"): ("pitch", "yaw", "roll"),
    ("Vector3D", "__init__"): ("x", "y", "z"),
    ("Transform", "__init__"): ("location", "rotation"),
    ("VehicleControl", "__init__"): ("throttle", "steer", "brake", "hand_brake"),
    ("World", "spawn_actor"): ("attach_to", "attachment_type"),
    ("World", "tick"): ("seconds",),
    ("Client", "apply_batch_sync"): ("do_tick",),
}

MAX_DT = 0.1  # s: CARLA's default max_substeps (10) * max_substep_delta_time (0.01)
SPAWN_LIFT_M = 0.5  # vehicles are spawned this far above the waypoint and settle on the first tick
DEFAULT_MAX_STEER_DEG = 70.0  # front-wheel limit used when a vehicle reports none
_BOX_MARGIN_M = 0.03  # instance ids: boxes grown sideways and on top by this
_BOX_FLOOR_M = 0.05  # ... and their lowest part left out (ground returns)
_KIND_OF_BASE_TYPE = {"car": ActorKind.CAR, "van": ActorKind.VAN, "truck": ActorKind.TRUCK, "bus": ActorKind.BUS}
_KIND_FALLBACK = {
    ActorKind.BUS: (ActorKind.BUS, ActorKind.TRUCK, ActorKind.VAN, ActorKind.CAR),
    ActorKind.TRUCK: (ActorKind.TRUCK, ActorKind.VAN, ActorKind.BUS, ActorKind.CAR),
    ActorKind.VAN: (ActorKind.VAN, ActorKind.CAR),
    ActorKind.CAR: (ActorKind.CAR,),
}


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


class CarlaError(RuntimeError):
    """Something went wrong talking to the CARLA server."""


class CarlaConnectionError(CarlaError, ConnectionError):
    """No CARLA server answered within the timeout."""


class CarlaVersionError(CarlaError):
    """The client library and the server are different CARLA versions."""


class CarlaTimeoutError(CarlaError, TimeoutError):
    """A tick or a sensor measurement did not arrive within the timeout."""


class CarlaSpawnError(CarlaError):
    """A scenario vehicle could not be spawned, retries included."""


class CarlaCleanupError(CarlaError):
    """Restoring settings or destroying actors failed (every step was still attempted)."""


def load_carla_module(name: str = "carla") -> ModuleType:
    """Import the CARLA client library (or, for tests, a module standing in for it).

    ``name`` other than ``"carla"`` is a testing hook (``tools/generate.py --carla-module``): the
    test suite passes its recorded stand-in, since no CARLA server runs on the test machines.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        hint = f" (pip install carla=={CARLA_VERSION})" if name == "carla" else ""
        raise ImportError(f"cannot import the CARLA client module {name!r}{hint}: {err}") from err


# --------------------------------------------------------------------------------------------------
# conversions at the CARLA boundary (left-handed, degrees <-> ours)
# --------------------------------------------------------------------------------------------------


def T_from_carla_transform(transform: Any) -> np.ndarray:
    """Our (4, 4) ``T_world_from_x`` from a ``carla.Transform`` (left-handed, degrees)."""
    loc, rot = transform.location, transform.rotation
    return T_from_carla_pose([loc.x, loc.y, loc.z, rot.roll, rot.yaw, rot.pitch])


def carla_transform_from_T(carla: Any, T: np.ndarray) -> Any:
    """A ``carla.Transform`` for our (4, 4) pose ``T`` (inverse of :func:`T_from_carla_transform`)."""
    x, y, z, roll, yaw, pitch = (float(v) for v in carla_pose_from_T(T))
    return carla.Transform(
        location=carla.Location(x=x, y=y, z=z), rotation=carla.Rotation(pitch=pitch, yaw=yaw, roll=roll)
    )


def vector_from_carla(vector: Any) -> np.ndarray:
    """(3,) float64 vector in our frame from a ``carla.Vector3D`` (y negated)."""
    return np.array([vector.x, -vector.y, vector.z], dtype=np.float64)


def T_actor_from_agent(bounding_box: Any) -> np.ndarray:
    """(4, 4) pose of our agent frame (box bottom centre, x along the heading) in the actor's frame.

    ``bounding_box`` is the actor's ``carla.BoundingBox``: ``location`` is the box centre in the
    actor's (left-handed) frame and ``extent`` its half sizes; its rotation is zero for vehicles.
    """
    loc, ext = bounding_box.location, bounding_box.extent
    T = np.eye(4)
    T[:3, 3] = [loc.x, -loc.y, loc.z - ext.z]
    return T


def extent_of(bounding_box: Any) -> np.ndarray:
    """(3,) full box size (dx, dy, dz) from a ``carla.BoundingBox``'s half sizes."""
    e = bounding_box.extent
    return 2.0 * np.array([e.x, e.y, e.z], dtype=np.float64)


def points_from_measurement(measurement: Any) -> tuple[np.ndarray, np.ndarray]:
    """Points and pose of a ``carla.LidarMeasurement`` in our frames.

    Returns:
        points_sensor: (N, 4) float32 x, y, z, intensity in our (right-handed) sensor frame.
        T_world_from_sensor: (4, 4) float64.

    Raises:
        CarlaError: the buffer is not whole (x, y, z, intensity) float32 records, or its length
            disagrees with the per-channel point counts.
    """
    raw = bytes(measurement.raw_data)
    if len(raw) % 16 != 0:
        raise CarlaError(f"LiDAR buffer of frame {measurement.frame} has {len(raw)} bytes, not a multiple of 16")
    points = np.frombuffer(raw, dtype=np.float32).reshape(-1, 4).copy()
    counted = sum(int(measurement.get_point_count(c)) for c in range(int(measurement.channels)))
    if counted != len(points):
        raise CarlaError(
            f"LiDAR frame {measurement.frame}: {len(points)} points in the buffer but the channels count {counted}"
        )
    points[:, 1] = -points[:, 1]
    return points, T_from_carla_transform(measurement.transform)


# --------------------------------------------------------------------------------------------------
# control
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlMapping:
    """How our :class:`sim.types.VehicleControl` becomes CARLA's normalised pedals and steering.

    Open loop and approximate: CARLA's vehicles have engines, gears and tyres, so the same
    throttle gives different accelerations at different speeds and for different models.

    - acceleration ``a > 0``: ``throttle = min(a / full_throttle_accel, 1)``, no brake;
    - ``a < 0``: ``brake = min(-a / full_brake_decel, 1)``, no throttle;
    - steering ``delta`` (front-wheel angle, radians, positive left):
      ``steer = clip(-delta / max_steer, -1, 1)``: CARLA's ``steer`` is positive to the *right*
      and 1 means the wheel's ``max_steer_angle`` (from ``get_physics_control``). CARLA also
      scales steering down with speed through the vehicle's ``steering_curve``, so at speed the
      wheel turns less than asked.
    """

    full_throttle_accel: float = 4.0
    """m/s^2 taken to be reached at full throttle"""
    full_brake_decel: float = 8.0
    """m/s^2 taken to be reached at full brake"""

    def to_carla(self, carla: Any, control: VehicleControl, max_steer_rad: float) -> Any:
        a, delta = float(control.acceleration), float(control.steering)
        if not (math.isfinite(a) and math.isfinite(delta)):
            raise ValueError(f"control must be finite, got {control}")
        throttle = min(max(a, 0.0) / self.full_throttle_accel, 1.0)
        brake = min(max(-a, 0.0) / self.full_brake_decel, 1.0)
        steer = min(max(-delta / max_steer_rad, -1.0), 1.0)
        return carla.VehicleControl(throttle=throttle, steer=steer, brake=brake, hand_brake=False)

    @staticmethod
    def steering_from_carla(steer: float, max_steer_rad: float) -> float:
        """Front-wheel angle (radians, positive left) of a CARLA ``steer`` value."""
        return -float(steer) * max_steer_rad


def lidar_for_tick_rate(config: LidarConfig, dt: float) -> LidarConfig:
    """``config`` spinning once per tick (``rotation_frequency = 1 / dt``) with the same points per
    sweep (``points_per_second`` scaled accordingly)."""
    rotation_frequency = 1.0 / dt
    points_per_sweep = config.points_per_second / config.rotation_frequency
    out = dataclasses.replace(
        config,
        rotation_frequency=rotation_frequency,
        points_per_second=round(points_per_sweep * rotation_frequency),
    )
    out.validate()
    return out


def lidar_attributes(config: LidarConfig) -> dict[str, str]:
    """Blueprint attributes of ``sensor.lidar.ray_cast`` for ``config`` (strings, as CARLA wants).

    Every field of :class:`LidarConfig` but the mount position (which is the sensor's transform).
    """
    out = {}
    for f in dataclasses.fields(config):
        if not f.name.startswith("mount_"):
            value = getattr(config, f.name)
            out[f.name] = repr(float(value)) if isinstance(value, float) else str(value)
    return out


def _parse_version(text: str) -> tuple[int, ...] | None:
    """(major, minor, patch) of a version string such as ``"0.9.16"`` or ``"0.9.16-1-gabc"``."""
    match = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", str(text))
    return tuple(int(g) for g in match.groups()) if match else None


# --------------------------------------------------------------------------------------------------
# sensor queues
# --------------------------------------------------------------------------------------------------


class _SensorQueue:
    """Measurements of one sensor as its ``listen`` callback delivers them (from CARLA's threads)."""

    def __init__(self, agent_id: int) -> None:
        self.agent_id = agent_id
        self._queue: queue.Queue[Any] = queue.Queue()

    def put(self, measurement: Any) -> None:
        self._queue.put(measurement)

    def take(self, frame_id: int, timeout_s: float) -> Any:
        """The measurement of ``frame_id``; older ones are discarded.

        Raises:
            CarlaTimeoutError: none arrives within ``timeout_s``.
            CarlaError: a measurement of a later frame arrives first (the stream is out of step).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                measurement = self._queue.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                raise CarlaTimeoutError(
                    f"no LiDAR measurement of frame {frame_id} from the sensor on agent {self.agent_id} "
                    f"within {timeout_s:g} s (the server dropped it or is overloaded)"
                ) from None
            if measurement.frame == frame_id:
                return measurement
            if measurement.frame > frame_id:
                raise CarlaError(
                    f"the sensor on agent {self.agent_id} delivered frame {measurement.frame} while frame "
                    f"{frame_id} was expected: sensor stream out of step with the ticks"
                )


# --------------------------------------------------------------------------------------------------
# the world
# --------------------------------------------------------------------------------------------------


@dataclass
class _Vehicle:
    """A spawned vehicle and what is fixed about it for the episode."""

    agent_id: int
    actor: Any
    placement: Placement
    kind: ActorKind
    role: Role
    T_actor_from_agent: np.ndarray
    extent: np.ndarray
    max_steer_rad: float
    autopilot: bool | None = None
    sensor: Any = None
    sensor_queue: _SensorQueue | None = None


class CarlaWorld:
    """A :class:`sim.types.World` on a CARLA 0.9.16 server (see the module docstring).

    Args:
        scenario: one of :data:`sim.scenarios.SCENARIOS`.
        params: scenario knobs; ``parked_fraction`` has no effect here.
        lidar: LiDAR of every connected vehicle: a preset name or a :class:`LidarConfig`. Its
            ``rotation_frequency`` becomes ``1 / dt`` with the same points per sweep (see
            ``self.lidar`` for what the sensors actually use).
        dt: seconds per tick, in (0, 0.1].
        host, port: the CARLA server (``./CarlaUE4.sh`` listens on 2000 and 2001 by default).
        timeout_s: client timeout for every request, for a tick and for each sensor measurement.
        tm_port: the Traffic Manager's port.
        town: map to load (e.g. ``"Town05"``) if another one is loaded; None keeps the current map.
        no_rendering: set ``no_rendering_mode`` while running (restored on close).
        control: how actions become CARLA controls.
        spawn_retries: rounds of retries for vehicles whose spawn failed.
        background_radius_m: background traffic is placed within this distance of the ego.
        carla_module: the ``carla`` module, or a module standing in for it (tests); default
            ``import carla``.

    Raises:
        ValueError: bad arguments.
        CarlaConnectionError, CarlaVersionError, CarlaError: the server could not be set up (what
            was already changed on it is restored before raising).
    """

    def __init__(
        self,
        scenario: str,
        params: ScenarioParams | None = None,
        lidar: str | LidarConfig = "hdl64",
        dt: float = 0.1,
        host: str = "127.0.0.1",
        port: int = 2000,
        timeout_s: float = 10.0,
        tm_port: int = 8000,
        town: str | None = None,
        no_rendering: bool = False,
        control: ControlMapping | None = None,
        spawn_retries: int = 5,
        background_radius_m: float = 120.0,
        carla_module: ModuleType | None = None,
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; valid scenarios: {list(SCENARIOS)}")
        if not 0.0 < dt <= MAX_DT:
            raise ValueError(f"dt must be in (0, {MAX_DT}] s for CARLA's physics sub-stepping, got {dt}")
        if not timeout_s > 0.0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if spawn_retries < 0:
            raise ValueError(f"spawn_retries must be >= 0, got {spawn_retries}")
        self.scenario = scenario
        self.params = params or ScenarioParams()
        self.params.validate()
        config = lidar_preset(lidar) if isinstance(lidar, str) else lidar
        config.validate()
        self.dt = float(dt)
        self.lidar = lidar_for_tick_rate(config, self.dt)
        self.timeout_s = float(timeout_s)
        self.control = control or ControlMapping()
        self.spawn_retries = int(spawn_retries)
        self.background_radius_m = float(background_radius_m)
        self.sensors_enabled = True
        """False skips converting LiDAR data (measurements are still consumed), e.g. to fast-forward."""
        self.plan: ScenarioPlan | None = None
        self._carla = carla_module if carla_module is not None else load_carla_module()
        self._address = f"{host}:{port}"
        self._vehicles: list[_Vehicle] = []
        self._spawned_ids: list[int] = []  # every actor id this object spawned and has not destroyed
        self._traffic_lights: list[Any] = []
        self._frame = 0
        self._seed = 0
        self._reset_done = False
        self._closed = False
        self._original_settings = None
        self._tm = None
        self._tm_port = int(tm_port)
        self._walk = LaneWalker(self._carla)
        try:
            self._connect(host, int(port), town, no_rendering)
        except BaseException as err:
            self._abort(err)
            raise

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------

    def _connect(self, host: str, port: int, town: str | None, no_rendering: bool) -> None:
        carla = self._carla
        self._client = carla.Client(host, port)
        self._client.set_timeout(self.timeout_s)
        client_version = str(self._client.get_client_version())
        started = time.monotonic()
        try:
            server_version = str(self._client.get_server_version())
        except RuntimeError as err:
            raise CarlaConnectionError(
                f"no CARLA server answered at {self._address} within {self.timeout_s:g} s "
                f"(waited {time.monotonic() - started:.1f} s). Start one with ./CarlaUE4.sh -RenderOffScreen "
                f"(port {port}, and {port + 1} for streaming) or pass the right host and port. Client said: {err}"
            ) from err
        if _parse_version(client_version) != _parse_version(server_version):
            raise CarlaVersionError(
                f"CARLA client library {client_version} but server {server_version} at {self._address}: "
                f"they must be the same version. Install the matching client "
                f"(pip install carla=={server_version.split('-')[0]}) or run a {client_version} server."
            )
        if _parse_version(client_version) != _parse_version(CARLA_VERSION):
            warnings.warn(
                f"CARLA {client_version}: this bridge was checked against {CARLA_VERSION}", stacklevel=3
            )
        world = self._client.get_world()
        if town is not None and not str(world.get_map().name).endswith(town):
            world = self._client.load_world(town)
        self._world = world
        self._original_settings = world.get_settings()
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = self.dt
        settings.no_rendering_mode = bool(no_rendering)
        world.apply_settings(settings)
        try:
            self._tm = self._client.get_trafficmanager(self._tm_port)
        except RuntimeError as err:
            raise CarlaError(
                f"cannot start or reach the Traffic Manager on port {self._tm_port} ({err}); "
                "another client may hold it: pass another tm_port"
            ) from err
        self._tm.set_synchronous_mode(True)
        self._map = world.get_map()
        self._blueprints = world.get_blueprint_library()

    # ------------------------------------------------------------------------------------------
    # World protocol
    # ------------------------------------------------------------------------------------------

    def reset(self, seed: int) -> SceneFrame:
        """Destroy the previous episode's actors, place the scenario from ``seed`` and return frame 0.

        Any exception (Ctrl-C included) closes the world before it propagates.
        """
        self._check_open()
        try:
            self._destroy_episode()
            rng = np.random.default_rng(int(seed))
            self._seed = int(seed)
            self._frame = 0
            self._tm.set_random_device_seed(int(seed))
            self._world.reset_all_traffic_lights()  # signal cycles start over: same seed, same episode
            self.plan = plan_scenario(
                self._carla, self._map, self.scenario, rng, self.params, self.background_radius_m
            )
            self._spawn(self.plan, rng)
            self._reset_done = True
            frame_id = self._tick()
            return self._observe(frame_id)
        except CarlaError as err:
            raise type(err)(f"{err} [{self._abort(err)}]") from err
        except BaseException as err:
            self._abort(err)
            raise

    def step(self, actions: dict[int, VehicleControl] | None = None) -> SceneFrame:
        """Advance one tick. ``actions`` maps connected vehicle ids to controls (others: autopilot).

        Raises:
            ValueError: an action for an unknown or non-connected vehicle (the world stays open).
            CarlaTimeoutError: a tick or a measurement did not arrive (the world is closed).
        """
        self._check_open()
        if not self._reset_done:
            raise RuntimeError("call reset(seed) before step()")
        actions = dict(actions or {})
        by_id = {v.agent_id: v for v in self._vehicles}
        for agent_id, control in actions.items():
            if agent_id not in by_id:
                raise ValueError(f"no agent {agent_id}; agents are {sorted(by_id)}")
            if by_id[agent_id].role is not Role.CONNECTED:
                raise ValueError(f"agent {agent_id} is not a connected vehicle; only those take actions")
            if not isinstance(control, VehicleControl):
                raise ValueError(f"action for agent {agent_id} must be a VehicleControl, got {type(control)}")
        try:
            self._drive(actions)
            frame_id = self._tick()
            self._frame += 1
            return self._observe(frame_id)
        except CarlaError as err:
            raise type(err)(f"{err} [{self._abort(err)}]") from err
        except BaseException as err:
            self._abort(err)
            raise

    def close(self) -> None:
        """Restore the original settings and the TM's synchronous mode, destroy every spawned actor.

        Idempotent. Every step is attempted; failures are collected into one :class:`CarlaCleanupError`.
        """
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for v in self._vehicles:
            if v.sensor is not None:
                try:
                    if v.sensor.is_listening():
                        v.sensor.stop()
                except Exception as err:
                    errors.append(f"stopping the sensor on agent {v.agent_id}: {err}")
        if self._original_settings is not None:
            try:
                self._world.apply_settings(self._original_settings)
            except Exception as err:
                errors.append(f"restoring the world settings: {err}")
        if self._tm is not None:
            try:
                self._tm.set_synchronous_mode(bool(self._original_settings.synchronous_mode))
            except Exception as err:
                errors.append(f"restoring the Traffic Manager's synchronous mode: {err}")
        try:
            self._destroy_episode()
        except Exception as err:
            errors.append(str(err))
        if errors:
            raise CarlaCleanupError("CARLA cleanup incomplete: " + "; ".join(errors))

    def __enter__(self) -> CarlaWorld:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self._abort(exc)

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this CarlaWorld is closed; create a new one")

    def _abort(self, err: BaseException) -> str:
        """Close after ``err``; a cleanup failure becomes a warning so that ``err`` propagates.

        Returns:
            What the cleanup did, for the message of ``err``.
        """
        count = len(self._spawned_ids)
        try:
            self.close()
        except Exception as cleanup:
            warnings.warn(f"{cleanup} (while handling {type(err).__name__}: {err})", stacklevel=3)
            return f"world closed; {cleanup}"
        return (
            f"world closed: original world settings and Traffic Manager synchronous mode restored, "
            f"{count} spawned actor(s) destroyed"
        )

    def _tick(self) -> int:
        try:
            return int(self._world.tick(seconds=self.timeout_s))
        except RuntimeError as err:
            raise CarlaTimeoutError(
                f"the CARLA server at {self._address} did not complete tick {self._frame + 1} of this "
                f"episode within {self.timeout_s:g} s in synchronous mode ({err})"
            ) from err

    def _destroy_episode(self) -> None:
        """Destroy the actors spawned so far (sensors first). Raises CarlaError listing failures."""
        for v in self._vehicles:
            if v.sensor is not None:
                try:
                    if v.sensor.is_listening():
                        v.sensor.stop()
                except Exception:  # stopping is best effort: the actor is destroyed next anyway
                    pass
        self._vehicles = []
        self._traffic_lights = []
        self._reset_done = False
        if not self._spawned_ids:
            return
        ids = list(reversed(self._spawned_ids))  # sensors were spawned after their vehicles
        carla = self._carla
        responses = self._client.apply_batch_sync([carla.command.DestroyActor(i) for i in ids], do_tick=False)
        failed = [f"{i}: {r.error}" for i, r in zip(ids, responses, strict=True) if r.error]
        self._spawned_ids = []
        if failed:
            raise CarlaError(f"could not destroy {len(failed)} actor(s): " + "; ".join(failed))

    # spawning ----------------------------------------------------------------------------------

    def _blueprint_for(self, kind: ActorKind, rng: np.random.Generator) -> tuple[Any, ActorKind]:
        """A vehicle blueprint of ``kind`` (CARLA's ``base_type`` attribute), falling back to a
        similar kind when the library has none; choices sorted by id and drawn from ``rng``."""
        by_kind: dict[ActorKind, list[Any]] = {}
        for bp in self._blueprints.filter("vehicle.*"):
            base = bp.get_attribute("base_type").as_str().lower() if bp.has_attribute("base_type") else "car"
            if base in _KIND_OF_BASE_TYPE:
                by_kind.setdefault(_KIND_OF_BASE_TYPE[base], []).append(bp)
        for candidate in _KIND_FALLBACK[kind]:
            options = sorted(by_kind.get(candidate, []), key=lambda b: b.id)
            if options:
                return options[int(rng.integers(len(options)))], candidate
        raise CarlaError(f"the blueprint library has no four-wheeled vehicle for {kind.value}")

    def _spawn(self, plan: ScenarioPlan, rng: np.random.Generator) -> None:
        carla = self._carla
        placements = plan.placements
        blueprints = []
        for i, p in enumerate(placements):
            bp, kind = self._blueprint_for(p.kind, rng)
            if bp.has_attribute("role_name"):
                bp.set_attribute("role_name", "hero" if i == 0 else f"coopstack_{p.tag or 'background'}")
            blueprints.append((bp, kind))
        candidates = [alternative_waypoints(self._walk, p.waypoint, self.spawn_retries) for p in placements]
        where = [0] * len(placements)  # index into candidates of the current try
        actor_ids: dict[int, int] = {}
        last_error: dict[int, str] = {}
        pending = list(range(len(placements)))
        for _ in range(self.spawn_retries + 1):
            commands = []
            for i in pending:
                T = T_from_carla_transform(candidates[i][where[i]].transform)
                T[2, 3] += SPAWN_LIFT_M
                commands.append(carla.command.SpawnActor(blueprints[i][0], carla_transform_from_T(carla, T)))
            responses = self._client.apply_batch_sync(commands, do_tick=False)
            failed = []
            for i, response in zip(pending, responses, strict=True):
                if response.error:
                    last_error[i] = str(response.error)
                    failed.append(i)
                else:
                    actor_ids[i] = int(response.actor_id)
                    self._spawned_ids.append(int(response.actor_id))
            pending = []
            for i in failed:
                if where[i] + 1 < len(candidates[i]):
                    where[i] += 1
                    pending.append(i)
            if not pending:
                break
        lost = [i for i in range(len(placements)) if i not in actor_ids]
        essential_lost = [i for i in lost if placements[i].essential]
        if essential_lost:
            detail = "; ".join(f"{placements[i].tag} ({last_error.get(i, '?')})" for i in essential_lost)
            raise CarlaSpawnError(
                f"could not spawn scenario vehicle(s) of {plan.name!r} on {plan.map_name} after "
                f"{self.spawn_retries} retries each at waypoints up to {2 * self.spawn_retries} m away: {detail}"
            )
        kept = [i for i in range(len(placements)) if i in actor_ids]
        actors = {a.id: a for a in self._world.get_actors([actor_ids[i] for i in kept])}
        self._vehicles = []
        for agent_id, i in enumerate(kept):
            actor = actors[actor_ids[i]]
            bbox = actor.bounding_box
            wheels = list(actor.get_physics_control().wheels)
            max_steer_deg = float(wheels[0].max_steer_angle) if wheels else 0.0
            p = placements[i]
            self._vehicles.append(
                _Vehicle(
                    agent_id=agent_id,
                    actor=actor,
                    placement=p,
                    kind=blueprints[i][1],
                    role=p.role,
                    T_actor_from_agent=T_actor_from_agent(bbox),
                    extent=extent_of(bbox),
                    max_steer_rad=math.radians(max_steer_deg if max_steer_deg > 0 else DEFAULT_MAX_STEER_DEG),
                )
            )
        self._promote_cavs(plan.cavs)
        self._configure_traffic()
        self._attach_lidars()
        self._traffic_lights = sorted(
            self._world.get_actors().filter("traffic.traffic_light*"), key=lambda tl: tl.id
        )

    def _promote_cavs(self, wanted: int) -> None:
        """Background vehicles nearest the ego become connected until ``wanted`` exist."""
        have = sum(v.role is Role.CONNECTED for v in self._vehicles)
        ego_xy = self._walk.xy(self._vehicles[0].placement.waypoint)
        background = [v for v in self._vehicles if v.role is Role.HUMAN and not v.placement.essential]
        background.sort(key=lambda v: float(np.linalg.norm(self._walk.xy(v.placement.waypoint) - ego_xy)))
        for v in background[: max(wanted - have, 0)]:
            v.role = Role.CONNECTED
        have = sum(v.role is Role.CONNECTED for v in self._vehicles)
        if have < wanted:
            raise ValueError(
                f"could place only {have} connected vehicles, {wanted} requested; raise traffic_density"
            )

    def _configure_traffic(self) -> None:
        carla, tm = self._carla, self._tm
        for v in self._vehicles:
            p = v.placement
            if p.desired_speed is not None:
                tm.set_desired_speed(v.actor, 3.6 * p.desired_speed)  # km/h
            else:
                tm.vehicle_percentage_speed_difference(v.actor, p.speed_difference_pct)
            if p.ignore_lights:
                tm.ignore_lights_percentage(v.actor, 100.0)
            if p.route:
                tm.set_route(v.actor, list(p.route))
            if p.speed > 0.0:
                heading = self._walk.heading(p.waypoint)
                velocity = p.speed * np.array([math.cos(heading), math.sin(heading), 0.0])
                v.actor.set_target_velocity(carla.Vector3D(x=velocity[0], y=-velocity[1], z=0.0))
        self._drive({})

    def _attach_lidars(self) -> None:
        carla = self._carla
        config = self.lidar
        for v in self._vehicles:
            if v.role is not Role.CONNECTED:
                continue
            bp = self._blueprints.find("sensor.lidar.ray_cast")
            for name, value in lidar_attributes(config).items():
                bp.set_attribute(name, value)
            if bp.has_attribute("noise_seed"):  # per-sensor noise stream: same seed, same sweeps
                bp.set_attribute("noise_seed", str((self._seed * 1009 + v.agent_id) % 2**31))
            # sensor on the roof: (mount_x, mount_y, height + mount_z) in our agent frame
            T_agent_from_sensor = np.eye(4)
            T_agent_from_sensor[:3, 3] = [config.mount_x, config.mount_y, v.extent[2] + config.mount_z]
            T_actor_from_sensor = v.T_actor_from_agent @ T_agent_from_sensor
            sensor = self._world.spawn_actor(
                bp,
                carla_transform_from_T(carla, T_actor_from_sensor),
                attach_to=v.actor,
                attachment_type=carla.AttachmentType.Rigid,
            )
            self._spawned_ids.append(int(sensor.id))
            v.sensor, v.sensor_queue = sensor, _SensorQueue(v.agent_id)
            sensor.listen(v.sensor_queue.put)

    # driving -----------------------------------------------------------------------------------

    def _drive(self, actions: dict[int, VehicleControl]) -> None:
        """Autopilot for every vehicle without an action and not held; controls for the others."""
        carla = self._carla
        t = self._frame * self.dt
        for v in self._vehicles:
            if v.agent_id in actions:
                control = self.control.to_carla(carla, actions[v.agent_id], v.max_steer_rad)
            elif t < v.placement.hold_s:
                control = carla.VehicleControl(throttle=0.0, steer=0.0, brake=1.0, hand_brake=False)
            else:
                control = None
            autopilot = control is None
            if v.autopilot is not autopilot:
                v.actor.set_autopilot(autopilot, self._tm.get_port())
                v.autopilot = autopilot
            if control is not None:
                v.actor.apply_control(control)

    # observing ---------------------------------------------------------------------------------

    def _snapshot(self, frame_id: int) -> Any:
        deadline = time.monotonic() + self.timeout_s
        while True:
            snapshot = self._world.get_snapshot()
            if snapshot.frame == frame_id:
                return snapshot
            if snapshot.frame > frame_id or time.monotonic() > deadline:
                raise CarlaTimeoutError(
                    f"world snapshot is at frame {snapshot.frame}, expected the ticked frame {frame_id}"
                )
            time.sleep(0.001)

    def _observe(self, frame_id: int) -> SceneFrame:
        snapshot = self._snapshot(frame_id)
        agents: list[AgentState] = []
        for v in self._vehicles:
            state = snapshot.find(v.actor.id)
            if state is None:
                continue  # the server removed it
            T_world_from_actor = T_from_carla_transform(state.get_transform())
            agents.append(
                AgentState(
                    id=v.agent_id,
                    kind=v.kind,
                    role=v.role,
                    T_world_from_agent=T_world_from_actor @ v.T_actor_from_agent,
                    velocity=vector_from_carla(state.get_velocity()),
                    extent=v.extent.copy(),
                    steering=ControlMapping.steering_from_carla(v.actor.get_control().steer, v.max_steer_rad),
                )
            )
        boxes = np.stack([a.box for a in agents]) if agents else np.zeros((0, 7))
        ids = np.array([a.id for a in agents], dtype=np.int64)
        semantic = np.array([Semantic.of_kind(a.kind) for a in agents], dtype=np.uint8)
        scans: dict[int, LidarScan] = {}
        points_in_box: dict[int, np.ndarray] = {}
        present = set(ids.tolist())
        for v in self._vehicles:
            if v.sensor_queue is None:
                continue
            measurement = v.sensor_queue.take(frame_id, self.timeout_s)
            if not self.sensors_enabled or v.agent_id not in present:
                continue
            points, T_world_from_sensor = points_from_measurement(measurement)
            instance = _instance_ids(points, invert_T(T_world_from_sensor), boxes, ids, v.agent_id)
            order = np.searchsorted(ids, instance[instance >= 0])
            sem = np.full(len(points), Semantic.NONE, dtype=np.uint8)
            sem[instance >= 0] = semantic[order]
            scans[v.agent_id] = LidarScan(
                agent_id=v.agent_id,
                points=points,
                instance_id=instance,
                semantic=sem,
                T_world_from_sensor=T_world_from_sensor,
                config=self.lidar,
            )
            points_in_box[v.agent_id] = np.bincount(order, minlength=len(ids)).astype(np.int32)
        assert self.plan is not None
        hidden_ids = {v.agent_id for v in self._vehicles if v.placement.tag in self.plan.hidden_tags}
        return SceneFrame(
            frame=self._frame,
            time_s=self._frame * self.dt,
            agents=agents,
            scans=scans,
            points_in_box=points_in_box,
            collisions=_overlapping_pairs(boxes, ids),
            traffic_lights=self._light_states(),
            scenario=self.scenario,
            hidden_agent_ids=tuple(sorted(hidden_ids & present)),
            ego_id=self._vehicles[0].agent_id,
        )

    def _light_states(self) -> dict[int, str]:
        carla = self._carla
        names = {
            carla.TrafficLightState.Green: "green",
            carla.TrafficLightState.Yellow: "yellow",
            carla.TrafficLightState.Red: "red",
        }
        out = {}
        for light in self._traffic_lights:
            state = names.get(light.get_state())
            if state is not None:  # Off and Unknown are left out
                out[int(light.id)] = state
        return out


def _instance_ids(points_sensor: np.ndarray, T_sensor_from_world: np.ndarray, boxes_world: np.ndarray,
                  ids: np.ndarray, own_id: int) -> np.ndarray:
    """(N,) int32 id of the vehicle box holding each point (-1 for none); the sensor's own vehicle
    is left out. Boxes are grown by ``_BOX_MARGIN_M`` sideways and on top, and their lowest
    ``_BOX_FLOOR_M`` left out."""
    out = np.full(len(points_sensor), -1, dtype=np.int32)
    keep = ids != own_id
    if len(points_sensor) == 0 or not keep.any():
        return out
    boxes = transform_boxes(T_sensor_from_world, boxes_world[keep])
    boxes[:, 2] += _BOX_FLOOR_M
    boxes[:, 3:5] += 2.0 * _BOX_MARGIN_M
    boxes[:, 5] += _BOX_MARGIN_M - _BOX_FLOOR_M
    inside = points_in_boxes(points_sensor[:, :3], boxes)  # (N, M')
    hit = inside.any(axis=1)
    out[hit] = ids[keep][np.argmax(inside[hit], axis=1)]
    return out


def _overlapping_pairs(boxes: np.ndarray, ids: np.ndarray) -> list[tuple[int, int]]:
    """Pairs ``(id_a, id_b)``, id_a < id_b, of boxes whose footprints overlap."""
    if len(boxes) < 2:
        return []
    reach = np.hypot(boxes[:, 3], boxes[:, 4]) / 2.0
    close = np.linalg.norm(boxes[:, None, :2] - boxes[None, :, :2], axis=-1) < reach[:, None] + reach[None]
    np.fill_diagonal(close, False)
    if not close.any():
        return []
    pairs = np.argwhere(np.triu(close & (bev_iou(boxes, boxes) > 0.0), k=1))
    return sorted((int(min(ids[a], ids[b])), int(max(ids[a], ids[b]))) for a, b in pairs)


def make_carla_world(
    scenario: str,
    lidar: str | LidarConfig = "hdl64",
    dt: float = 0.1,
    host: str = "127.0.0.1",
    port: int = 2000,
    timeout_s: float = 10.0,
    carla_module: ModuleType | str | None = None,
    **params: Any,
) -> CarlaWorld:
    """``make_carla_world("left_turn", lidar="tiny", cavs=3, port=2000)``, like :func:`sim.world.make_world`.

    Keyword arguments beyond the connection are :class:`sim.scenarios.ScenarioParams` fields.
    ``carla_module`` may be a module name (see :func:`load_carla_module`).
    """
    module = load_carla_module(carla_module) if isinstance(carla_module, str) else carla_module
    return CarlaWorld(
        scenario,
        ScenarioParams.from_dict(params),
        lidar=lidar,
        dt=dt,
        host=host,
        port=port,
        timeout_s=timeout_s,
        carla_module=module,
    )
