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
from sim.lidar import LidarConfig, StaticGeometry, T_agent_from_lidar, cast_lidar, lidar_preset
from sim.roads import GroundRaster, RoadLayout
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
    s: np.ndarray  # (N,) arc length along the route (progress)
    ignore_signals: np.ndarray  # (N,) bool
    hold_until: np.ndarray  # (N,) seconds
    active: np.ndarray  # (N,) bool: False once a human vehicle has left the map

    @property
    def wheelbase(self) -> np.ndarray:
        return 0.6 * self.extent[:, 0]


def _static_geometry(layout: RoadLayout) -> StaticGeometry:
    """Ground plane and static boxes of a layout as one triangle soup.

    Road surfaces are not meshed: they are flat, so a ground hit's class comes from the layout's
    ground raster instead (coplanar road triangles 2 cm above the ground cost about 40 % more
    casting time for the rays that hit the ground).
    """
    x0, x1, y0, y1 = layout.extent
    parts = [StaticGeometry.ground_plane(x0, x1, y0, y1, z=0.0, semantic=Semantic.TERRAIN)]
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
        self._ground: GroundRaster | None = None
        self._v: _Vehicles | None = None
        self._seed = 0
        self._frame = 0
        self.sensors_enabled = True
        """False skips LiDAR casting (scans and visibility are then empty), e.g. to fast-forward."""

    # ------------------------------------------------------------------------------------------
    # World protocol
    # ------------------------------------------------------------------------------------------

    def reset(self, seed: int) -> SceneFrame:
        """Sample the scenario from ``seed`` and return frame 0. Same seed, same frames."""
        self._seed = int(seed)
        rng = np.random.default_rng(self._seed)
        self.spec = build_scenario(self.scenario, rng, self.params)
        self._static = _static_geometry(self.spec.layout)
        self._ground = self.spec.layout.ground_raster()
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
            s=np.array([a.s for a in spec.actors], dtype=np.float64),
            ignore_signals=np.array([a.ignore_signals for a in spec.actors]),
            hold_until=np.array([a.hold_until for a in spec.actors], dtype=np.float64),
            active=np.ones(n, dtype=bool),
        )

    def _signal_state(self, signal_id: int, t: float) -> str:
        assert self.spec is not None
        return self.spec.signal_plan.state(signal_id, t)

    def _driver_model(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Acceleration and steering of every vehicle from the driver model, (N,) each.

        For each route, the vehicles on it look for the nearest constraint ahead: a vehicle whose
        box overlaps their corridor, the stop line of a signal that is not green (on yellow only
        if they can stop comfortably), the end of an on-ramp without a gap beside it, and for
        connected vehicles the end of their route. IDM turns the nearest one into an
        acceleration; pure pursuit on a speed-dependent look-ahead point gives the steering.
        """
        v = self._v
        assert v is not None
        n = len(v.ids)
        gap = np.full(n, np.inf)
        closing = np.zeros(n)
        target = np.stack([v.x, v.y], axis=1)  # pure-pursuit targets; parked/inactive keep their place
        xy = target.copy()
        half_len, half_wid = v.extent[:, 0] / 2.0, v.extent[:, 1] / 2.0
        on_road = v.active & np.array([r is not Role.PARKED for r in v.roles])
        route_names = np.array([r or "" for r in v.route])
        for name in sorted({r for r in v.route if r is not None}):
            route = self.layout.route(name)
            mine = np.flatnonzero((route_names == name) & on_road)
            if len(mine) == 0:
                continue
            # everyone near this route's vehicles, in the route's coordinates, projected on the
            # window of the route those vehicles can see (keeps the projection local and cheap)
            dist = np.linalg.norm(xy[:, None, :] - xy[None, mine, :], axis=-1)  # (N, |mine|)
            near = v.active & (dist.min(axis=1) < _LOOKAHEAD_M + 20.0)
            window = (float(v.s[mine].min()) - 15.0, float(v.s[mine].max()) + _LOOKAHEAD_M + 15.0)
            s_all = np.full(n, -np.inf)
            lat_all = np.full(n, np.inf)
            s_all[near], lat_all[near] = route.project(xy[near], s_range=window)
            v.s[mine] = s_all[mine]
            s_me = s_all[mine]

            # leaders: vehicles ahead whose boxes overlap our corridor, (|mine|, N)
            ahead = s_all[None, :] - s_me[:, None]
            in_path = (
                near[None, :]
                & (ahead > 0.0)
                & (ahead < _LOOKAHEAD_M)
                & (np.abs(lat_all)[None, :] < half_wid[mine, None] + half_wid[None, :] + _LATERAL_MARGIN_M)
            )
            in_path[np.arange(len(mine)), mine] = False
            gaps = np.where(in_path, ahead - half_len[mine, None] - half_len[None, :], np.inf)
            leader = np.argmin(gaps, axis=1)
            g = gaps[np.arange(len(mine)), leader]
            along = np.cos(v.yaw[leader] - route.heading(np.clip(s_all[leader], 0.0, route.length)))
            c = np.where(np.isfinite(g), v.speed[mine] - v.speed[leader] * along, 0.0)

            def constrain(mask: np.ndarray, dist: np.ndarray, g=g, c=c, mine=mine) -> None:
                """A virtual stopped obstacle ``dist`` ahead of the front bumper where ``mask``."""
                take = mask & (dist < g)
                g[take] = np.maximum(dist[take], 0.0)
                c[take] = v.speed[mine][take]

            front = s_me + half_len[mine]
            for s_stop, signal_id in route.stop_lines:
                state = self._signal_state(signal_id, t)
                if state == "green":
                    continue
                dist_stop = s_stop - front
                stop = (dist_stop >= -0.5) & ~v.ignore_signals[mine]
                if state == "yellow":  # go on when stopping needs more than comfortable braking
                    needed = v.speed[mine] ** 2 / (2.0 * np.maximum(dist_stop, 0.1))
                    stop &= needed <= self.idm.comfortable_brake
                constrain(stop, dist_stop)
            if route.merge is not None:
                constrain(self._merge_blocked(route, mine, s_me, xy), route.merge[2] - front)
            connected = np.array([v.roles[i] is Role.CONNECTED for i in mine])
            constrain(connected, route.length - front)  # connected vehicles stop at their route's end

            gap[mine], closing[mine] = g, c
            lookahead = np.clip(0.9 * v.speed[mine] + 3.0, 4.0, 25.0)
            target[mine] = route.point(s_me + lookahead)

        accel = idm_acceleration(v.speed, v.desired_speed, gap, closing, self.idm)
        accel = np.where(t < v.hold_until, -MAX_BRAKE, accel)
        steer = pure_pursuit_steering(v.x, v.y, v.yaw, target[:, 0], target[:, 1], v.wheelbase)
        return np.where(on_road, accel, 0.0), np.where(on_road, steer, 0.0)

    def _merge_blocked(self, route, mine: np.ndarray, s_me: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """(|mine|,) True for ramp vehicles near the merge whose target lane has no gap beside them.

        A gap: nobody on the target lane from 1.5 s behind (at their speed, at least 10 m) to 10 m
        ahead of the merging vehicle.
        """
        v = self._v
        target_name, s_start, s_end = route.merge
        blocked = np.zeros(len(mine), dtype=bool)
        zone = (s_me >= s_start - 30.0) & (s_me <= s_end)
        if not zone.any():
            return blocked
        target = self.layout.route(target_name)
        s_target, lat_target = target.project(xy)
        on_target = v.active & (np.abs(lat_target) < 1.5)
        lag = np.maximum(10.0, 1.5 * v.speed) + v.extent[:, 0]
        for k in np.flatnonzero(zone):
            i = mine[k]
            rel = s_target - s_target[i]
            others = on_target.copy()
            others[i] = False
            blocked[k] = bool(np.any(others & (rel > -lag) & (rel < 10.0 + v.extent[i, 0])))
        return blocked

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

    def scan_agent(
        self,
        agent: AgentState,
        boxes: np.ndarray,
        ids: np.ndarray,
        semantic: np.ndarray,
        lidar: LidarConfig | None = None,
    ) -> LidarScan:
        """One sweep of ``lidar`` (default: the World's own) mounted on ``agent`` at the current
        frame, as every frame's scans are made: the generator seeded by (scenario seed, frame,
        agent id), the agent's own box left out, ground hits classed by the road raster.

        Args:
            agent: the vehicle carrying the sensor.
            boxes: (M, 7) world boxes of the vehicles the rays can hit, ``ids`` (M,) their ids and
                ``semantic`` (M,) uint8 their classes.
            lidar: another sensor to cast with (the perception source casts the one its model was
                trained on).
        """
        assert self._static is not None and self._ground is not None, "reset() first"
        lidar = lidar or self.lidar
        T_world_from_sensor = agent.T_world_from_agent @ T_agent_from_lidar(lidar, agent.extent[2])
        rng = np.random.default_rng([self._seed, self._frame, agent.id])
        hits = cast_lidar(lidar, T_world_from_sensor, self._static, boxes, ids, semantic, agent.id, rng)
        # ground hits (the only TERRAIN geometry is the ground plane) take the road raster's class
        ground = np.flatnonzero(hits.semantic == Semantic.TERRAIN)
        if len(ground):
            R = T_world_from_sensor[:2, :3].astype(np.float32)  # world x, y rows only
            xy = hits.points[:, :3] @ R.T  # all points: cheaper than gathering the ground ones first
            xy += T_world_from_sensor[:2, 3].astype(np.float32)
            hits.semantic[ground] = self._ground.lookup(xy[ground])
        return LidarScan(
            agent_id=agent.id,
            points=hits.points,
            instance_id=hits.instance_id,
            semantic=hits.semantic,
            T_world_from_sensor=T_world_from_sensor,
            config=lidar,
        )

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
            if not agent.connected or not self.sensors_enabled:
                continue
            scan = self.scan_agent(agent, boxes, ids, semantic)
            scans[agent.id] = scan
            # visibility: how many of this scan's points hit each agent
            per_id = np.bincount(scan.instance_id + 1, minlength=int(ids.max()) + 2)[1:]  # slot 0: id -1
            points_in_box[agent.id] = per_id[ids].astype(np.int32)
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

    # ------------------------------------------------------------------------------------------
    # queries for planners (sim/env.py)
    # ------------------------------------------------------------------------------------------

    def route_of(self, agent_id: int):
        """The :class:`sim.routes.Route` vehicle ``agent_id`` follows; ``ValueError`` for parked ones."""
        if self.spec is None:
            raise RuntimeError("call reset(seed) first")
        if not 0 <= agent_id < len(self.spec.actors):
            raise ValueError(f"no agent {agent_id}; ids are 0..{len(self.spec.actors) - 1}")
        name = self.spec.actors[agent_id].route
        if name is None:
            raise ValueError(f"agent {agent_id} is parked and has no route")
        return self.layout.route(name)

    def static_geometry(self) -> StaticGeometry:
        """Triangles of the ground, roads and buildings of the current episode (world frame)."""
        if self._static is None:
            raise RuntimeError("call reset(seed) first")
        return self._static

    def signal_state(self, signal_id: int, t: float) -> str:
        """``"green"``, ``"yellow"`` or ``"red"`` for signal ``signal_id`` at time ``t`` seconds."""
        if self.spec is None:
            raise RuntimeError("call reset(seed) first")
        return self._signal_state(signal_id, t)


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
