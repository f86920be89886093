"""Road layouts of the embedded simulator: lanes as routes, signals, and static geometry.

Three layouts, all right-hand traffic in our right-handed world frame (x east, y north, z up):

- ``two_lane_road``: a straight two-lane two-way urban road along x with parking strips,
  sidewalks and buildings on both sides.
- ``intersection``: two such roads (two lanes per direction: inner for left turns and through,
  outer for through and right turns) crossing at the origin, with a fixed-time two-phase signal.
- ``highway``: two lanes per direction along x with a median barrier, and an on-ramp joining the
  eastbound carriageway from the south through an acceleration lane, screened by a noise wall.

Layouts are built from a ``numpy.random.Generator`` (building sizes and gaps vary by seed) and are
plain data: routes, signal plan, road surface strips and static boxes (buildings, walls, curbs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sim.routes import Route, arc, line, polyline
from sim.types import Semantic

__all__ = ["LANE_WIDTH", "LAYOUTS", "GroundRaster", "RoadLayout", "SignalPlan", "make_layout"]

LANE_WIDTH = 3.5
URBAN_SPEED = 13.9  # 50 km/h
HIGHWAY_SPEED = 27.8  # 100 km/h


@dataclass(frozen=True)
class SignalPlan:
    """Fixed-time two-phase plan: signal 0 (north-south) then signal 1 (east-west).

    One cycle is ``2 * (green + yellow + all_red)`` seconds; ``offset`` shifts the start so that
    at t = 0 the cycle is ``offset`` seconds in.
    """

    green: float = 12.0
    yellow: float = 3.0
    all_red: float = 1.0
    offset: float = 0.0

    @property
    def cycle(self) -> float:
        return 2.0 * (self.green + self.yellow + self.all_red)

    def state(self, signal_id: int, t: float) -> str:
        """``"green"``, ``"yellow"`` or ``"red"`` for signal 0 or 1 at time ``t``."""
        half = self.green + self.yellow + self.all_red
        phase = (t + self.offset) % self.cycle
        local = phase - (half if signal_id == 1 else 0.0)
        if 0.0 <= local < self.green:
            return "green"
        if self.green <= local < self.green + self.yellow:
            return "yellow"
        return "red"


@dataclass(frozen=True)
class GroundRaster:
    """Semantic class of the ground (ROAD or TERRAIN) on a regular grid.

    Attributes:
        origin_xy: world (x, y) of the grid's corner (cell [0, 0]'s lower-left corner).
        resolution: metres per cell.
        semantic: (rows, cols) uint8, row index along y, column index along x.
    """

    origin_xy: tuple[float, float]
    resolution: float
    semantic: np.ndarray

    def lookup(self, xy: np.ndarray) -> np.ndarray:
        """(N,) uint8 class at world points (N, 2); outside the grid: TERRAIN."""
        col = np.floor((xy[:, 0] - self.origin_xy[0]) / self.resolution).astype(np.int64)
        row = np.floor((xy[:, 1] - self.origin_xy[1]) / self.resolution).astype(np.int64)
        rows, cols = self.semantic.shape
        inside = (row >= 0) & (row < rows) & (col >= 0) & (col < cols)
        out = np.full(len(xy), Semantic.TERRAIN, dtype=np.uint8)
        out[inside] = self.semantic[row[inside], col[inside]]
        return out


@dataclass
class RoadLayout:
    """A road network and its static scenery.

    Attributes:
        name: one of :data:`LAYOUTS`.
        routes: drivable centrelines by name.
        surfaces: road-surface strips as (K, 2) left edge / right edge pairs, each (K, 2) float64;
            they label the flat ground as ROAD through :meth:`ground_raster`.
        static_boxes: (B, 7) bottom-centre boxes of buildings, walls and curbs.
        static_semantic: (B,) uint8 semantic class of each static box.
        signals: signal ids present (empty when the layout has no traffic lights).
        signal_plan: timing of the signals.
        extent: (x_min, x_max, y_min, y_max) of the ground plane.
        parking_spots: (P, 3) x, y, yaw where vehicles may be parked.
    """

    name: str
    routes: dict[str, Route]
    surfaces: list[tuple[np.ndarray, np.ndarray]]
    static_boxes: np.ndarray
    static_semantic: np.ndarray
    signals: tuple[int, ...] = ()
    signal_plan: SignalPlan = field(default_factory=SignalPlan)
    extent: tuple[float, float, float, float] = (-300.0, 300.0, -300.0, 300.0)
    parking_spots: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    def ground_raster(self, resolution: float = 0.25) -> GroundRaster:
        """Rasterise the road surfaces over the layout's extent (see :class:`GroundRaster`)."""
        from PIL import Image, ImageDraw  # Pillow: polygon fill, a dependency of matplotlib

        x0, x1, y0, y1 = self.extent
        width = int(np.ceil((x1 - x0) / resolution))
        height = int(np.ceil((y1 - y0) / resolution))
        image = Image.new("L", (width, height), int(Semantic.TERRAIN))
        draw = ImageDraw.Draw(image)
        for left, right in self.surfaces:
            for k in range(len(left) - 1):
                quad = np.stack([left[k], left[k + 1], right[k + 1], right[k]])
                pixels = (quad - np.array([x0, y0])) / resolution  # column = x, row = y
                draw.polygon([tuple(p) for p in pixels], fill=int(Semantic.ROAD))
        return GroundRaster(
            origin_xy=(x0, y0), resolution=resolution, semantic=np.asarray(image, dtype=np.uint8)
        )

    def route(self, name: str) -> Route:
        try:
            return self.routes[name]
        except KeyError:
            raise ValueError(
                f"layout {self.name!r} has no route {name!r}; routes: {sorted(self.routes)}"
            ) from None


def _strip(xy: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Left and right edges, each (K, 2), of a strip of ``width`` around a polyline."""
    d = np.gradient(xy, axis=0)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1)  # left of travel
    return xy + normal * width / 2.0, xy - normal * width / 2.0


def _box(x0: float, x1: float, y0: float, y1: float, height: float, z: float = 0.0) -> np.ndarray:
    """Axis-aligned bottom-centre box covering [x0, x1] x [y0, y1]."""
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, z, abs(x1 - x0), abs(y1 - y0), height, 0.0])


def _building_row(
    rng: np.random.Generator, x_start: float, x_end: float, y_near: float, side: float
) -> list[np.ndarray]:
    """Buildings along x in [x_start, x_end], front facade at |y| = y_near on ``side`` (+1 or -1)."""
    boxes = []
    x = x_start + rng.uniform(0.0, 6.0)
    while x < x_end - 8.0:
        length = min(rng.uniform(10.0, 30.0), x_end - x)
        depth = rng.uniform(10.0, 20.0)
        height = rng.uniform(6.0, 20.0)
        y0 = side * y_near
        boxes.append(_box(x, x + length, y0, y0 + side * depth, height))
        x += length + rng.uniform(2.0, 12.0)
    return boxes


def _rotate_box(box: np.ndarray, quarter_turns: int) -> np.ndarray:
    """Rotate a box about the origin by a multiple of 90 degrees."""
    a = quarter_turns * np.pi / 2.0
    c, s = round(np.cos(a)), round(np.sin(a))
    out = box.copy()
    out[0], out[1] = c * box[0] - s * box[1], s * box[0] + c * box[1]
    out[6] = box[6] + a
    return out


def _rotate_xy(xy: np.ndarray, quarter_turns: int) -> np.ndarray:
    a = quarter_turns * np.pi / 2.0
    c, s = round(np.cos(a)), round(np.sin(a))
    return np.stack([c * xy[:, 0] - s * xy[:, 1], s * xy[:, 0] + c * xy[:, 1]], axis=1)


# --------------------------------------------------------------------------------------------------


def two_lane_road(rng: np.random.Generator, half_length: float = 250.0) -> RoadLayout:
    """Straight two-way road along x: eastbound lane at y = -1.75, westbound at y = +1.75.

    Cross-section (|y|): lanes 0-3.5, parking strip 3.5-6, sidewalk 6-9 (0.15 m curb), buildings
    from 11.
    """
    L = half_length
    routes = {
        "E": Route("E", line((-L, -LANE_WIDTH / 2), (L, -LANE_WIDTH / 2)), URBAN_SPEED),
        "W": Route("W", line((L, LANE_WIDTH / 2), (-L, LANE_WIDTH / 2)), URBAN_SPEED),
    }
    surfaces = [_strip(line((-L, 0.0), (L, 0.0), step=50.0), 12.0)]
    boxes = [_box(-L, L, 6.0, 9.0, 0.15), _box(-L, L, -9.0, -6.0, 0.15)]
    semantic = [Semantic.SIDEWALK, Semantic.SIDEWALK]
    for side in (1.0, -1.0):
        row = _building_row(rng, -L, L, 11.0, side)
        boxes += row
        semantic += [Semantic.BUILDING] * len(row)
    spots = [
        (x, side * 4.75, 0.0 if side < 0 else np.pi)
        for side in (1, -1)
        for x in np.arange(-L + 10, L - 10, 7.0)
    ]
    return RoadLayout(
        name="two_lane_road",
        routes=routes,
        surfaces=surfaces,
        static_boxes=np.stack(boxes),
        static_semantic=np.array(semantic, dtype=np.uint8),
        extent=(-L - 20, L + 20, -60.0, 60.0),
        parking_spots=np.array(spots, dtype=np.float64),
    )


# Intersection geometry: two lanes per direction, inner lane centre 1.75 m, outer 5.25 m from the
# road axis; stop lines 9 m from the centre; the box |x|, |y| <= 7 is the conflict area.
_INNER, _OUTER, _STOP, _HALF = 1.75, 5.25, 9.0, 7.0


def _approach_routes(arm: float) -> dict[str, np.ndarray]:
    """Routes of the approach from the south (heading north), before rotation."""
    return {
        # left: inner northbound lane -> inner westbound lane, arc centred on (-STOP, -STOP)
        "left": polyline(
            line((_INNER, -arm), (_INNER, -_STOP)),
            arc((-_STOP, -_STOP), _STOP + _INNER, 0.0, np.pi / 2),
            line((-_STOP, _INNER), (-arm, _INNER)),
        ),
        "straight_inner": line((_INNER, -arm), (_INNER, arm)),
        "straight": line((_OUTER, -arm), (_OUTER, arm)),
        # right: outer northbound lane -> outer eastbound lane, arc centred on (STOP, -STOP)
        "right": polyline(
            line((_OUTER, -arm), (_OUTER, -_STOP)),
            arc((_STOP, -_STOP), _STOP - _OUTER, np.pi, np.pi / 2),
            line((_STOP, -_OUTER), (arm, -_OUTER)),
        ),
    }


APPROACHES = ("S", "E", "N", "W")  # quarter turns 0..3 of the south approach


def intersection(rng: np.random.Generator, arm: float = 200.0) -> RoadLayout:
    """Four-way signalised intersection at the origin.

    Route names are ``<approach>_<movement>``: approach S, E, N, W (where the vehicle comes from),
    movement left / straight_inner / straight / right. Signal 0 controls S and N, signal 1 E and W;
    stop lines sit 9 m before the centre.
    """
    routes: dict[str, Route] = {}
    for k, approach in enumerate(APPROACHES):
        signal = k % 2
        for movement, xy in _approach_routes(arm).items():
            name = f"{approach}_{movement}"
            routes[name] = Route(name, _rotate_xy(xy, k), URBAN_SPEED, stop_lines=((arm - _STOP, signal),))
    surfaces = [
        _strip(line((-arm, 0.0), (arm, 0.0), step=50.0), 2 * _HALF),
        _strip(line((0.0, -arm), (0.0, arm), step=50.0), 2 * _HALF),
    ]
    boxes: list[np.ndarray] = []
    semantic: list[int] = []
    for k in range(4):
        # sidewalks along the east arm, both sides, rotated to each arm
        for side in (1.0, -1.0):
            boxes.append(_rotate_box(_box(_HALF + 3.0, arm, side * _HALF, side * (_HALF + 3.0), 0.15), k))
            semantic.append(Semantic.SIDEWALK)
            # the left row (side +1) fills the corner; the right row starts past the corner block
            # that the next arm's left row already fills
            x_start = _HALF + 5.0 if side > 0 else _HALF + 27.0
            row = _building_row(rng, x_start, arm, _HALF + 5.0, side)
            boxes += [_rotate_box(b, k) for b in row]
            semantic += [Semantic.BUILDING] * len(row)
    return RoadLayout(
        name="intersection",
        routes=routes,
        surfaces=surfaces,
        static_boxes=np.stack(boxes),
        static_semantic=np.array(semantic, dtype=np.uint8),
        signals=(0, 1),
        extent=(-arm - 20, arm + 20, -arm - 20, arm + 20),
    )


def highway(rng: np.random.Generator, half_length: float = 300.0) -> RoadLayout:
    """Highway along x with an on-ramp from the south.

    Eastbound lanes: ``E0`` (right, y = -5.25) and ``E1`` (left, y = -1.75); westbound ``W0``
    (y = +5.25) and ``W1`` (y = +1.75); a median barrier on y = 0. The on-ramp route ``ramp`` comes
    in at y = -38.75, climbs to an acceleration lane at y = -8.75 (x in [-60, 40]) and merges into
    ``E0`` between x = 40 and x = 80. A 3 m noise wall at y = -12 screens the ramp from the
    carriageway before the acceleration lane.
    """
    L = half_length
    y_e0, y_e1, y_acc = -1.5 * LANE_WIDTH, -0.5 * LANE_WIDTH, -2.5 * LANE_WIDTH
    x = np.arange(-140.0, -60.0 + 1e-9, 0.5)
    ramp_rise = np.stack([x, y_acc - 30.0 * (1.0 + np.cos(np.pi * (x + 140.0) / 80.0)) / 2.0], axis=1)
    x = np.arange(40.0, 80.0 + 1e-9, 0.5)
    taper = np.stack([x, y_acc + (y_e0 - y_acc) * (1.0 - np.cos(np.pi * (x - 40.0) / 40.0)) / 2.0], axis=1)
    ramp_xy = polyline(
        line((-L, y_acc - 30.0), (-140.0, y_acc - 30.0)),
        ramp_rise,
        line((-60.0, y_acc), (40.0, y_acc)),
        taper,
        line((80.0, y_e0), (L, y_e0)),
    )
    routes = {
        "E0": Route("E0", line((-L, y_e0), (L, y_e0)), HIGHWAY_SPEED),
        "E1": Route("E1", line((-L, y_e1), (L, y_e1)), HIGHWAY_SPEED),
        "W0": Route("W0", line((L, -y_e0), (-L, -y_e0)), HIGHWAY_SPEED),
        "W1": Route("W1", line((L, -y_e1), (-L, -y_e1)), HIGHWAY_SPEED),
    }
    ramp = Route("ramp", ramp_xy, 22.2)
    s_acc_start, _ = ramp.project(np.array([[-60.0, y_acc]]))
    s_acc_end, _ = ramp.project(np.array([[40.0, y_acc]]))
    routes["ramp"] = Route("ramp", ramp_xy, 22.2, merge=("E0", float(s_acc_start[0]), float(s_acc_end[0])))
    surfaces = [
        _strip(line((-L, -LANE_WIDTH), (L, -LANE_WIDTH), step=50.0), 2 * LANE_WIDTH + 3.0),
        _strip(line((-L, LANE_WIDTH), (L, LANE_WIDTH), step=50.0), 2 * LANE_WIDTH + 3.0),
        _strip(polyline(ramp_xy[ramp_xy[:, 0] <= 80.0]), LANE_WIDTH + 1.0),
    ]
    boxes = [
        _box(-L, L, -0.3, 0.3, 0.9),  # median barrier
        _box(-200.0, -82.0, -12.3, -11.7, 3.0),  # noise wall between ramp and carriageway
    ]
    semantic = [Semantic.BUILDING, Semantic.BUILDING]
    for side, y_near in ((1.0, 20.0), (-1.0, 55.0)):
        row = _building_row(rng, -L, L, y_near, side)
        boxes += row
        semantic += [Semantic.BUILDING] * len(row)
    return RoadLayout(
        name="highway",
        routes=routes,
        surfaces=surfaces,
        static_boxes=np.stack(boxes),
        static_semantic=np.array(semantic, dtype=np.uint8),
        extent=(-L - 20, L + 20, -80.0, 60.0),
    )


LAYOUTS = {"two_lane_road": two_lane_road, "intersection": intersection, "highway": highway}


def make_layout(name: str, rng: np.random.Generator) -> RoadLayout:
    """Build a layout by name; ``ValueError`` lists the valid names."""
    match name:
        case "two_lane_road":
            return two_lane_road(rng)
        case "intersection":
            return intersection(rng)
        case "highway":
            return highway(rng)
    raise ValueError(f"unknown road layout {name!r}; valid layouts: {sorted(LAYOUTS)}")
