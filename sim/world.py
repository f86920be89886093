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

import itertools
from dataclasses import dataclass

import numpy as np

from sim.box_ops import bev_overlap
from sim.dynamics import MAX_BRAKE, IDMParams, bicycle_step, idm_acceleration, pure_pursuit_steering
from sim.geometry import transform_points
from sim.lidar import LidarConfig, StaticGeometry, T_agent_from_lidar, cast_lidar, lidar_preset
from sim.roads import GroundRaster, RoadLayout
from sim.routes import Route
from sim.scenarios import SCENARIOS, ScenarioParams, ScenarioSpec, build_scenario
from sim.types import ActorKind, AgentState, LidarScan, Role, SceneFrame, Semantic, VehicleControl

__all__ = ["EmbeddedWorld", "make_world"]

_LOOKAHEAD_M = 80.0  # how far ahead drivers look for leaders
_CURVE_SPEED_GAIN = 1.5  # 1/s: how fast drivers match the curve speed (the env controller's gain)
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
    reaction_s: np.ndarray  # (N,) seconds before the driver model reacts to a vehicle entering its path
    in_path_since: np.ndarray  # (N, N) seconds: since when vehicle j has been in i's path; nan if not
    active: np.ndarray  # (N,) bool: False once a human vehicle has left the map
    parked: np.ndarray  # (N,) bool
    connected: np.ndarray  # (N,) bool
    semantic: np.ndarray  # (N,) uint8 Semantic of each kind

    @property
    def wheelbase(self) -> np.ndarray:
        return 0.6 * self.extent[:, 0]


@dataclass(frozen=True)
class _RouteGroup:
    """The vehicles that drive one route, fixed for an episode."""

    route: Route
    slots: np.ndarray  # (K,) int64, increasing
    end_xy: np.ndarray  # (2,) the route's last vertex
    end_cos: float  # its heading there, as a direction
    end_sin: float


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
        self._groups: list[_RouteGroup] = []
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
        self._ground = None  # rasterised on the first scan: worlds without sensors never need it
        self._v = self._spawn(self.spec)
        self._groups = self._route_groups(self._v)
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
        moving = v.active & ~v.parked
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
        v = self._v
        assert v is not None
        if not (0 <= agent_id < len(v.ids) and v.active[agent_id]):  # ids are slots (see _spawn)
            raise ValueError(f"no active agent with id {agent_id}")
        return int(agent_id)

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
        roles = [a.role for a in spec.actors]
        return _Vehicles(
            ids=np.arange(n, dtype=np.int64),
            kinds=[a.kind for a in spec.actors],
            roles=roles,
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
            reaction_s=np.array([a.reaction_s for a in spec.actors], dtype=np.float64),
            in_path_since=np.full((n, n), np.nan),  # filled from the first tick (see _reacted)
            active=np.ones(n, dtype=bool),
            parked=np.array([r is Role.PARKED for r in roles], dtype=bool),
            connected=np.array([r is Role.CONNECTED for r in roles], dtype=bool),
            semantic=np.array([Semantic.of_kind(a.kind) for a in spec.actors], dtype=np.uint8),
        )

    def _route_groups(self, v: _Vehicles) -> list[_RouteGroup]:
        """Each route with vehicles on it (by name), and the vehicles, fixed for the episode."""
        groups = []
        for name in sorted({r for r in v.route if r is not None}):
            route = self.layout.route(name)
            heading = route.heading(route.length)
            groups.append(
                _RouteGroup(
                    route=route,
                    slots=np.array([i for i, r in enumerate(v.route) if r == name], dtype=np.int64),
                    end_xy=route.xy[-1],
                    end_cos=np.cos(heading),
                    end_sin=np.sin(heading),
                )
            )
        return groups

    def _signal_state(self, signal_id: int, t: float) -> str:
        assert self.spec is not None
        return self.spec.signal_plan.state(signal_id, t)

    def _driver_model(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Acceleration and steering of every vehicle from the driver model, (N,) each.

        For each route, the vehicles on it look for the nearest constraint ahead: a vehicle whose
        box overlaps their corridor, the stop line of a signal that is not green (on yellow only
        if they can stop comfortably), the end of an on-ramp without a gap beside it, and for
        connected vehicles the end of their route. IDM turns the nearest one into an
        acceleration, capped to track the route's curve speed; pure pursuit on a speed-dependent look-ahead point gives the steering.
        """
        v = self._v
        assert v is not None
        on_road = v.active & ~v.parked
        gap, closing, target = self._constraints(t, on_road)
        accel = idm_acceleration(v.speed, v.desired_speed, gap, closing, self.idm)
        # and no faster than the curves ahead allow: the env's meta-action controller tracks the
        # route's curve speed (sim.env_lanes.meta_control), and so do the human drivers
        for g in self._groups:
            mine = g.slots[on_road[g.slots]]
            if len(mine):
                s_ahead = v.s[mine] + v.speed[mine] / _CURVE_SPEED_GAIN
                curve = _CURVE_SPEED_GAIN * (g.route.curve_speed(s_ahead) - v.speed[mine])
                accel[mine] = np.minimum(accel[mine], curve)
        accel = np.where(t < v.hold_until, -MAX_BRAKE, accel)
        steer = pure_pursuit_steering(v.x, v.y, v.yaw, target[:, 0], target[:, 1], v.wheelbase)
        return np.where(on_road, accel, 0.0), np.where(on_road, steer, 0.0)

    def _constraints(self, t: float, on_road: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The driver model's nearest constraint ahead of every vehicle on a route, (N,) gap and
        closing speed (inf and 0 without one), and its (N, 2) pure-pursuit target."""
        v = self._v
        n = len(v.ids)
        gap = np.full(n, np.inf)
        closing = np.zeros(n)
        xy = np.stack([v.x, v.y], axis=1)
        target = xy.copy()  # pure-pursuit targets; parked/inactive keep their place
        half_len, half_wid = v.extent[:, 0] / 2.0, v.extent[:, 1] / 2.0
        routes = [(g.route, g.slots[on_road[g.slots]]) for g in self._groups]
        routes = [(route, mine) for route, mine in routes if len(mine)]
        if not routes:
            return gap, closing, target
        dist = np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=-1)  # (N, N) centre distances
        # Every route's vehicles and everyone near them, in the route's coordinates (row r of
        # s_all / lat_all), projected on the window of the route those vehicles can see (keeps
        # the projection local and cheap); -inf / inf for the others.
        s_all = np.full((len(routes), n), -np.inf)
        lat_all = np.full((len(routes), n), np.inf)
        near = np.zeros((len(routes), n), dtype=bool)
        for r, (route, mine) in enumerate(routes):
            near[r] = v.active & (dist[:, mine].min(axis=1) < _LOOKAHEAD_M + 20.0)
            window = (float(v.s[mine].min()) - 15.0, float(v.s[mine].max()) + _LOOKAHEAD_M + 15.0)
            s_all[r, near[r]], lat_all[r, near[r]] = route.project(xy[near[r]], s_range=window)

        # From here on every vehicle on a route at once, route by route: row k is vehicle mine[k]
        # on route r_of[k] (rows[r] are route r's), seeing everyone in that route's coordinates.
        mine = np.concatenate([m for _, m in routes])  # (K,)
        bounds = np.cumsum([0] + [len(m) for _, m in routes])
        rows = [slice(a, b) for a, b in itertools.pairwise(bounds.tolist())]
        r_of = np.repeat(np.arange(len(routes)), np.diff(bounds))
        s_me = s_all[r_of, mine]
        v.s[mine] = s_me

        # leaders: vehicles ahead whose boxes overlap our corridor, (K, N)
        ahead = s_all[r_of] - s_me[:, None]
        in_path = (
            near[r_of]
            & (ahead > 0.0)
            & (ahead < _LOOKAHEAD_M)
            & (np.abs(lat_all[r_of]) < half_wid[mine, None] + half_wid[None, :] + _LATERAL_MARGIN_M)
        )
        in_path[np.arange(len(mine)), mine] = False
        in_path = self._reacted(t, mine, in_path)
        gaps = np.where(in_path, ahead - half_len[mine, None] - half_len[None, :], np.inf)
        leader = np.argmin(gaps, axis=1)
        g = gaps[np.arange(len(mine)), leader]
        length = np.array([route.length for route, _ in routes])[r_of]
        s_leader = np.clip(s_all[r_of, leader], 0.0, length)
        heading = np.concatenate(
            [route.heading(s_leader[k]) for (route, _), k in zip(routes, rows, strict=True)]
        )
        along = np.cos(v.yaw[leader] - heading)
        c = np.where(np.isfinite(g), v.speed[mine] - v.speed[leader] * along, 0.0)
        front = s_me + half_len[mine]

        def constrain(k: slice, mask: np.ndarray, dist: np.ndarray) -> None:
            """A virtual stopped obstacle ``dist`` ahead of the front bumper of rows ``k`` where ``mask``."""
            g_k, c_k = g[k], c[k]  # views: the assignments below write into g and c
            take = mask & (dist < g_k)
            g_k[take] = np.maximum(dist[take], 0.0)
            c_k[take] = v.speed[mine[k]][take]

        for (route, route_mine), k in zip(routes, rows, strict=True):
            for s_stop, signal_id in route.stop_lines:
                state = self._signal_state(signal_id, t)
                if state == "green":
                    continue
                dist_stop = s_stop - front[k]
                stop = (dist_stop >= -0.5) & ~v.ignore_signals[route_mine]
                if state == "yellow":  # go on when stopping needs more than comfortable braking
                    needed = v.speed[route_mine] ** 2 / (2.0 * np.maximum(dist_stop, 0.1))
                    stop &= needed <= self.idm.comfortable_brake
                constrain(k, stop, dist_stop)
            if route.merge is not None:
                constrain(k, self._merge_blocked(route, route_mine, s_me[k], xy), route.merge[2] - front[k])
        everyone = slice(None)
        constrain(everyone, v.connected[mine], length - front)  # connected vehicles stop at their route's end

        gap[mine], closing[mine] = g, c
        lookahead = np.clip(0.9 * v.speed[mine] + 3.0, 4.0, 25.0)
        s_target = s_me + lookahead
        for (route, route_mine), k in zip(routes, rows, strict=True):
            target[route_mine] = route.point(s_target[k])
        return gap, closing, target

    def _reacted(self, t: float, mine: np.ndarray, in_path: np.ndarray) -> np.ndarray:
        """(K, N) the part of ``in_path`` (rows: vehicles ``mine``) each driver reacts to: vehicles
        that have been in its path for at least its ``reaction_s``.

        A driver with right of way who cannot see a vehicle about to pull into its lane (the
        ``left_turn`` bus hides the ego from the oncoming cars as much as it hides them from the
        ego) starts braking only a reaction time after it did. Pairs in path at t = 0, and pairs
        whose driver has no reaction time, count at once, as before.
        """
        v = self._v
        assert v is not None
        if not v.reaction_s[mine].any():  # every other scenario: nothing to track on this hot path
            return in_path
        since = v.in_path_since[mine]  # (K, N) copy
        since = np.where(in_path, np.where(np.isnan(since), t, since), np.nan)
        if t == 0.0:
            since[in_path] = -np.inf
        v.in_path_since[mine] = since
        with np.errstate(invalid="ignore"):
            return in_path & (t - since >= v.reaction_s[mine, None] - 1e-9)

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
        merging = mine[zone]  # (Z,) slots
        rel = s_target[None, :] - s_target[merging, None]  # (Z, N) ahead of each merging vehicle
        others = on_target[None, :] & (np.arange(len(v.ids))[None, :] != merging[:, None])
        beside = others & (rel > -lag[None, :]) & (rel < 10.0 + v.extent[merging, 0][:, None])
        blocked[zone] = beside.any(axis=1)
        return blocked

    def _retire_finished(self) -> None:
        """Human vehicles that have driven off the end of their route leave the world."""
        v = self._v
        human = v.active & ~v.connected & ~v.parked
        for group in self._groups:
            slots = group.slots[human[group.slots]]
            end_x, end_y = group.end_xy
            past = (v.x[slots] - end_x) * group.end_cos + (v.y[slots] - end_y) * group.end_sin
            v.active[slots[past > 0.0]] = False

    def _boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """(M, 7) world boxes and (M,) slots of the active vehicles."""
        v = self._v
        slots = np.flatnonzero(v.active)
        boxes = np.stack(
            [v.x[slots], v.y[slots], np.zeros(len(slots)), *v.extent[slots].T, v.yaw[slots]], axis=1
        )
        return boxes, slots

    def _collisions(self) -> list[tuple[int, int]]:
        """Pairs of vehicle ids whose boxes overlap (BEV): footprints that intersect with a
        positive area (:func:`sim.box_ops.bev_overlap`), among those whose circles meet."""
        boxes, slots = self._boxes()
        if len(slots) < 2:
            return []
        centres = boxes[:, :2]
        reach = np.hypot(boxes[:, 3], boxes[:, 4]) / 2.0
        close = np.linalg.norm(centres[:, None] - centres[None], axis=-1) < reach[:, None] + reach[None]
        a, b = np.nonzero(np.triu(close, k=1))
        if len(a) == 0:
            return []
        overlap = bev_overlap(boxes[a], boxes[b])
        ids = self._v.ids[slots]
        return sorted((int(ids[i]), int(ids[j])) for i, j in zip(a[overlap], b[overlap], strict=True))

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
        assert self._static is not None and self.spec is not None, "reset() first"
        if self._ground is None:
            self._ground = self.spec.layout.ground_raster()
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
        # every agent's pose (T_from_xyz_yaw), velocity and extent at once, one row each
        yaw, speed = v.yaw[slots], v.speed[slots]
        c, s = np.cos(yaw), np.sin(yaw)
        T = np.zeros((len(slots), 4, 4))
        T[:, 0, 0], T[:, 0, 1], T[:, 0, 3] = c, -s, v.x[slots]
        T[:, 1, 0], T[:, 1, 1], T[:, 1, 3] = s, c, v.y[slots]
        T[:, 2, 2] = T[:, 3, 3] = 1.0
        velocity = np.stack([speed * c, speed * s, np.zeros(len(slots))], axis=1)
        extent = v.extent[slots]
        agents = [
            AgentState(
                id=agent_id,
                kind=v.kinds[slot],
                role=v.roles[slot],
                T_world_from_agent=T[k],
                velocity=velocity[k],
                extent=extent[k],
                steering=steering,
            )
            for k, (agent_id, slot, steering) in enumerate(
                zip(ids.tolist(), slots.tolist(), v.steering[slots].tolist(), strict=True)
            )
        ]
        scans: dict[int, LidarScan] = {}
        points_in_box: dict[int, np.ndarray] = {}
        if self.sensors_enabled:
            semantic = v.semantic[slots]
            for agent in agents:
                if not agent.connected:
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
