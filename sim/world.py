"""The embedded World: numpy kinematics, background traffic and Open3D LiDAR on any CPU.

One tick (``dt`` = 0.1 s by default):

1. every moving vehicle picks its controls: connected vehicles with an entry in ``actions`` take
   it; every other vehicle runs the driver model (pure pursuit on its route, IDM towards the
   nearest leader, stop line or merge point, and signal obedience unless scripted to run a red);
2. the kinematic bicycle moves them; human vehicles that reach the end of their route leave;
3. overlapping boxes are reported as collisions;
4. each connected vehicle casts its LiDAR against the static scenery and every other vehicle.

State lives in flat numpy arrays indexed by vehicle slot; ``SceneFrame`` is built from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.dynamics import MAX_BRAKE, IDMParams, bicycle_step, idm_acceleration, pure_pursuit_steering
from sim.geometry import T_from_xyz_yaw, transform_points
from sim.lidar import LidarConfig, StaticGeometry, cast_lidar, lidar_preset
from sim.roads import RoadLayout
from sim.scenarios import SCENARIOS, ScenarioParams, ScenarioSpec, build_scenario
from sim.types import ActorKind, AgentState, LidarScan, Role, SceneFrame, Semantic, VehicleControl

__all__ = ["EmbeddedWorld", "make_world"]

_LOOKAHEAD_M = 80.0  # how far ahead drivers look for leaders
_LATERAL_MARGIN_M = 0.3  # extra lateral clearance when deciding who is in one's path


@dataclass
class _Vehicles:
    """Per-vehicle state as parallel arrays (index = slot, not id)."""

    ids: np.ndarray  # (N,) int64
    kinds: list[ActorKind]
    roles: list[Role]
    extent: np.ndarray  # (N, 3)
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    speed: np.ndarray
    steering: np.ndarray
    desired_speed: np.ndarray
    route: list[str | None]
    ignore_signals: np.ndarray  # (N,) bool
    hold_until: np.ndarray  # (N,) seconds
    active: np.ndarray  # (N,) bool: False once a human vehicle has left the map

    @property
    def wheelbase(self) -> np.ndarray:
        return 0.6 * self.extent[:, 0]


def _static_geometry(layout: RoadLayout) -> StaticGeometry:
    """Ground plane, road surface strips and static boxes of a layout as one triangle soup."""
    x0, x1, y0, y1 = layout.extent
    parts = [StaticGeometry.ground_plane(x0, x1, y0, y1, z=0.0, semantic=Semantic.TERRAIN)]
    for left, right in layout.surfaces:
        k = len(left)
        vertices = np.concatenate([left, right], axis=0)
        vertices = np.concatenate([vertices, np.full((2 * k, 1), 0.02)], axis=1).astype(np.float32)
        i = np.arange(k - 1)
        # two triangles per quad (left_i, right_i, right_i+1), (left_i, right_i+1, left_i+1): normals up
        tri = np.concatenate(
            [np.stack([i, k + i, k + i + 1], 1), np.stack([i, k + i + 1, i + 1], 1)], axis=0
        ).astype(np.int32)
        parts.append(StaticGeometry(vertices, tri, np.full(len(tri), Semantic.ROAD, dtype=np.uint8)))
    for semantic in np.unique(layout.static_semantic):
        mask = layout.static_semantic == semantic
        parts.append(StaticGeometry.boxes_as_static(layout.static_boxes[mask], int(semantic)))
    return StaticGeometry.concatenate(parts)


class EmbeddedWorld:
    """A :class:`sim.types.World` simulated in-process. See the module docstring for one tick.

    Args:
        scenario: one of :data:`sim.scenarios.SCENARIOS`.
        params: scenario knobs (connected vehicles, traffic density, ...).
        lidar: LiDAR of every connected vehicle: a preset name or a :class:`LidarConfig`.
        dt: seconds per tick.
        idm: car-following parameters of the driver model.
    """

    def __init__(
        self,
        scenario: str,
        params: ScenarioParams | None = None,
        lidar: str | LidarConfig = "hdl64",
        dt: float = 0.1,
        idm: IDMParams | None = None,
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; valid scenarios: {list(SCENARIOS)}")
        if not 0.0 < dt <= 0.5:
            raise ValueError(f"dt must be in (0, 0.5] seconds, got {dt}")
        self.scenario = scenario
        self.params = params or ScenarioParams()
        self.params.validate()
        self.lidar = lidar_preset(lidar) if isinstance(lidar, str) else lidar
        self.lidar.validate()
        self.dt = float(dt)
        self.idm = idm or IDMParams()
        self.spec: ScenarioSpec | None = None
        self._static: StaticGeometry | None = None
        self._v: _Vehicles | None = None
        self._seed = 0
        self._frame = 0

    # ------------------------------------------------------------------------------------------
    # World protocol
    # ------------------------------------------------------------------------------------------

    def reset(self, seed: int) -> SceneFrame:
        """Sample the scenario from ``seed`` and return frame 0. Same seed, same frames."""
        self._seed = int(seed)
        rng = np.random.default_rng(self._seed)
        self.spec = build_scenario(self.scenario, rng, self.params)
        self._static = _static_geometry(self.spec.layout)
        self._v = self._spawn(self.spec)
        self._frame = 0
        return self._observe(collisions=self._collisions())

    def step(self, actions: dict[int, VehicleControl] | None = None) -> SceneFrame:
        """Advance one tick. ``actions`` maps connected vehicle ids to controls."""
        if self._v is None:
            raise RuntimeError("call reset(seed) before step()")
        v = self._v
        t = self._frame * self.dt
        accel, steer = self._driver_model(t)
        for agent_id, control in (actions or {}).items():
            slot = self._slot_of(agent_id)
            if v.roles[slot] is not Role.CONNECTED:
                raise ValueError(f"agent {agent_id} is not a connected vehicle; only those take actions")
            accel[slot], steer[slot] = control.acceleration, control.steering
        moving = v.active & np.array([r is not Role.PARKED for r in v.roles])
        nx, ny, nyaw, nspeed = bicycle_step(v.x, v.y, v.yaw, v.speed, accel, steer, v.wheelbase, self.dt)
        v.x = np.where(moving, nx, v.x)
        v.y = np.where(moving, ny, v.y)
        v.yaw = np.where(moving, nyaw, v.yaw)
        v.speed = np.where(moving, nspeed, v.speed)
        v.steering = np.where(moving, np.clip(steer, -0.6, 0.6), v.steering)
        self._retire_finished()
        self._frame += 1
        return self._observe(collisions=self._collisions())

    def close(self) -> None:
        self._v = None
        self._static = None

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------

    @property
    def layout(self) -> RoadLayout:
        assert self.spec is not None, "call reset(seed) first"
        return self.spec.layout

    def _slot_of(self, agent_id: int) -> int:
        assert self._v is not None
        hits = np.flatnonzero((self._v.ids == agent_id) & self._v.active)
        if len(hits) == 0:
            raise ValueError(f"no active agent with id {agent_id}")
        return int(hits[0])

    def _spawn(self, spec: ScenarioSpec) -> _Vehicles:
        n = len(spec.actors)
        x, y, yaw = np.zeros(n), np.zeros(n), np.zeros(n)
        for i, a in enumerate(spec.actors):
            if a.pose is not None:
                x[i], y[i], yaw[i] = a.pose
            else:
                route = spec.layout.route(a.route)
                x[i], y[i] = route.point(a.s)
                yaw[i] = route.heading(a.s)
        return _Vehicles(
            ids=np.arange(n, dtype=np.int64),
            kinds=[a.kind for a in spec.actors],
            roles=[a.role for a in spec.actors],
            extent=np.stack([a.extent for a in spec.actors]).astype(np.float64),
            x=x,
            y=y,
            yaw=yaw,
            speed=np.array([a.speed for a in spec.actors], dtype=np.float64),
            steering=np.zeros(n),
            desired_speed=np.array([a.desired_speed for a in spec.actors], dtype=np.float64),
            route=[a.route for a in spec.actors],
            ignore_signals=np.array([a.ignore_signals for a in spec.actors]),
            hold_until=np.array([a.hold_until for a in spec.actors], dtype=np.float64),
            active=np.ones(n, dtype=bool),
        )

    def _signal_state(self, signal_id: int, t: float) -> str:
        assert self.spec is not None
        return self.spec.signal_plan.state(signal_id, t)

    def _driver_model(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Acceleration and steering of every vehicle from the driver model, (N,) each."""
        v = self._v
        assert v is not None
        n = len(v.ids)
        accel = np.zeros(n)
        steer = np.zeros(n)
        xy = np.stack([v.x, v.y], axis=1)
        half_len, half_wid = v.extent[:, 0] / 2.0, v.extent[:, 1] / 2.0
        for name in sorted({r for r in v.route if r is not None}):
            route = self.layout.route(name)
            mine = np.flatnonzero(
                np.array([r == name for r in v.route]) & v.active & np.array([r is not Role.PARKED for r in v.roles])
            )
            if len(mine) == 0:
                continue
            s_all, lat_all = route.project(xy)  # everyone, on this route's coordinates
            others = v.active
            for i in mine:
                s_i = s_all[i]
                # leaders: vehicles ahead on this route whose boxes overlap our corridor
                ahead = s_all - s_i
                in_path = (
                    others
                    & (ahead > 0.0)
                    & (ahead < _LOOKAHEAD_M)
                    & (np.abs(lat_all) < half_wid[i] + half_wid + _LATERAL_MARGIN_M)
                )
                in_path[i] = False
                gap, closing = np.inf, 0.0
                if in_path.any():
                    j_candidates = np.flatnonzero(in_path)
                    gaps = ahead[j_candidates] - half_len[i] - half_len[j_candidates]
                    k = int(np.argmin(gaps))
                    j = j_candidates[k]
                    gap = float(gaps[k])
                    along = np.cos(v.yaw[j] - route.heading(s_all[j]))
                    closing = float(v.speed[i] - v.speed[j] * along)
                # stop lines of signals that are not green
                if not v.ignore_signals[i]:
                    for s_stop, signal_id in route.stop_lines:
                        dist = s_stop - (s_i + half_len[i])
                        if dist < -0.5:
                            continue
                        state = self._signal_state(signal_id, t)
                        if state == "green":
                            continue
                        # on yellow, go on when stopping would need more than comfortable braking
                        if state == "yellow" and v.speed[i] ** 2 / (2.0 * max(dist, 0.1)) > self.idm.comfortable_brake:
                            continue
                        if dist < gap:
                            gap, closing = max(dist, 0.0), float(v.speed[i])
                # on-ramp: wait at the end of the acceleration lane until the target lane has a gap
                if route.merge is not None:
                    gap, closing = self._merge_constraint(i, route, s_i, gap, closing, xy)
                # connected vehicles stop at the end of their route; human ones drive off it
                if v.roles[i] is Role.CONNECTED:
                    dist_end = route.length - (s_i + half_len[i])
                    if dist_end < gap:
                        gap, closing = max(dist_end, 0.0), float(v.speed[i])
                accel[i] = idm_acceleration(
                    v.speed[i : i + 1], v.desired_speed[i : i + 1], np.array([gap]), np.array([closing]), self.idm
                )[0]
                if t < v.hold_until[i]:
                    accel[i] = -MAX_BRAKE
                lookahead = float(np.clip(0.9 * v.speed[i] + 3.0, 4.0, 25.0))
                tx, ty = route.point(s_i + lookahead)
                steer[i] = pure_pursuit_steering(
                    v.x[i : i + 1], v.y[i : i + 1], v.yaw[i : i + 1], np.array([tx]), np.array([ty]),
                    v.wheelbase[i : i + 1],
                )[0]
        return accel, steer

    def _merge_constraint(
        self, i: int, route, s_i: float, gap: float, closing: float, xy: np.ndarray
    ) -> tuple[float, float]:
        """Virtual stop at the merge point unless the target lane has a gap beside us."""
        v = self._v
        target_name, s_start, s_end = route.merge
        if not (s_start - 30.0 <= s_i <= s_end):
            return gap, closing
        target = self.layout.route(target_name)
        s_target, lat_target = target.project(xy)
        s_me, _ = target.project(xy[i : i + 1])
        on_target = v.active & (np.abs(lat_target) < 1.5)
        on_target[i] = False
        rel = s_target - s_me[0]
        # a gap: nobody from 1.5 s behind (at their speed, at least 10 m) to 10 m ahead of us
        lag = np.maximum(10.0, 1.5 * v.speed) + v.extent[:, 0]
        blocking = on_target & (rel > -lag) & (rel < 10.0 + v.extent[i, 0])
        if blocking.any():
            dist = s_end - (s_i + v.extent[i, 0] / 2.0)
            if dist < gap:
                return max(dist, 0.0), float(v.speed[i])
        return gap, closing

    def _retire_finished(self) -> None:
        """Human vehicles that have driven off the end of their route leave the world."""
        v = self._v
        for i in np.flatnonzero(v.active):
            if v.roles[i] is Role.HUMAN and v.route[i] is not None:
                route = self.layout.route(v.route[i])
                end = route.xy[-1]
                heading = route.heading(route.length)
                past = (v.x[i] - end[0]) * np.cos(heading) + (v.y[i] - end[1]) * np.sin(heading)
                if past > 0.0:
                    v.active[i] = False

    def _boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """(M, 7) world boxes and (M,) slots of the active vehicles."""
        v = self._v
        slots = np.flatnonzero(v.active)
        boxes = np.stack(
            [v.x[slots], v.y[slots], np.zeros(len(slots)), *v.extent[slots].T, v.yaw[slots]], axis=1
        )
        return boxes, slots

    def _collisions(self) -> list[tuple[int, int]]:
        """Pairs of vehicle ids whose boxes overlap (BEV), through mmcv's rotated IoU."""
        from sim.box_ops import bev_iou

        boxes, slots = self._boxes()
        if len(slots) < 2:
            return []
        centres = boxes[:, :2]
        reach = np.hypot(boxes[:, 3], boxes[:, 4]) / 2.0
        close = np.linalg.norm(centres[:, None] - centres[None], axis=-1) < reach[:, None] + reach[None]
        np.fill_diagonal(close, False)
        if not close.any():
            return []
        iou = bev_iou(boxes, boxes)
        pairs = np.argwhere(np.triu(close & (iou > 0.0), k=1))
        ids = self._v.ids[slots]
        return sorted((int(ids[a]), int(ids[b])) for a, b in pairs)

    def _observe(self, collisions: list[tuple[int, int]]) -> SceneFrame:
        v = self._v
        boxes, slots = self._boxes()
        ids = v.ids[slots]
        semantic = np.array([Semantic.of_kind(v.kinds[s]) for s in slots], dtype=np.uint8)
        agents = [
            AgentState(
                id=int(v.ids[s]),
                kind=v.kinds[s],
                role=v.roles[s],
                T_world_from_agent=T_from_xyz_yaw(v.x[s], v.y[s], 0.0, v.yaw[s]),
                velocity=np.array([v.speed[s] * np.cos(v.yaw[s]), v.speed[s] * np.sin(v.yaw[s]), 0.0]),
                extent=v.extent[s].copy(),
                steering=float(v.steering[s]),
            )
            for s in slots
        ]
        scans: dict[int, LidarScan] = {}
        points_in_box: dict[int, np.ndarray] = {}
        for agent in agents:
            if not agent.connected:
                continue
            T_agent_from_sensor = T_from_xyz_yaw(
                self.lidar.mount_x, self.lidar.mount_y, agent.extent[2] + self.lidar.mount_z, 0.0
            )
            T_world_from_sensor = agent.T_world_from_agent @ T_agent_from_sensor
            rng = np.random.default_rng([self._seed, self._frame, agent.id])
            hits = cast_lidar(
                self.lidar, T_world_from_sensor, self._static, boxes, ids, semantic, agent.id, rng
            )
            scans[agent.id] = LidarScan(
                agent_id=agent.id,
                points=hits.points,
                instance_id=hits.instance_id,
                semantic=hits.semantic,
                T_world_from_sensor=T_world_from_sensor,
                config=self.lidar,
            )
            # visibility: how many of this scan's points hit each agent
            order = np.searchsorted(ids, hits.instance_id[hits.instance_id >= 0])
            points_in_box[agent.id] = np.bincount(order, minlength=len(ids)).astype(np.int32)
        t = self._frame * self.dt
        assert self.spec is not None
        hidden = tuple(int(i) for i in self.spec.hidden_indices if v.active[i])
        return SceneFrame(
            frame=self._frame,
            time_s=t,
            agents=agents,
            scans=scans,
            points_in_box=points_in_box,
            collisions=collisions,
            traffic_lights={s: self._signal_state(s, t) for s in self.layout.signals},
            scenario=self.scenario,
            hidden_agent_ids=hidden,
            ego_id=int(v.ids[self.spec.ego_index]),
        )


def make_world(
    scenario: str,
    lidar: str | LidarConfig = "hdl64",
    dt: float = 0.1,
    **params,
) -> EmbeddedWorld:
    """Build an embedded world: ``make_world("left_turn", lidar="tiny", cavs=3)``.

    Keyword arguments are :class:`sim.scenarios.ScenarioParams` fields; unknown ones raise
    ``ValueError`` listing the valid names.
    """
    return EmbeddedWorld(scenario, ScenarioParams.from_dict(params), lidar=lidar, dt=dt)


# Points of a scan in the world frame, for callers that fuse or plot (kept here so the transform
# lives next to the sensor pose it uses).
def scan_points_world(scan: LidarScan) -> np.ndarray:
    """(N, 4) float32 points of ``scan`` in the world frame."""
    return transform_points(scan.T_world_from_sensor, scan.points)
