"""Bird's-eye-view plots of a cooperative frame with matplotlib.

Draws every agent's LiDAR points in its own colour and the ground-truth boxes by what the agents
saw of them:

- seen by the ego (at least one ego point on the box): solid, :data:`COLOUR_SEEN_BY_EGO`;
- occluded from the ego but seen by another agent: solid, :data:`COLOUR_SEEN_BY_OTHERS` (the case
  cooperative perception exists for);
- seen by nobody: dashed, :data:`COLOUR_UNSEEN`;
- the agents' own boxes: thick, in the agent's point colour.

Everything is in one frame of the caller's choice (world, or the ego's), in metres, with equal
axes. Works on any matplotlib ``Axes``; :func:`new_bev_figure` makes one on the Agg canvas without
touching pyplot's global state, so it runs headless.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Polygon

from sim.geometry import box_corners

__all__ = [
    "COLOUR_SEEN_BY_EGO",
    "COLOUR_SEEN_BY_OTHERS",
    "COLOUR_UNSEEN",
    "SEEN_BY_EGO",
    "SEEN_BY_OTHERS_ONLY",
    "UNSEEN",
    "new_bev_figure",
    "render_bev",
    "visibility_classes",
]

SEEN_BY_EGO = 0
SEEN_BY_OTHERS_ONLY = 1
UNSEEN = 2

COLOUR_SEEN_BY_EGO = "#2ca02c"  # green
COLOUR_SEEN_BY_OTHERS = "#d62728"  # red
COLOUR_UNSEEN = "#7f7f7f"  # grey
_AGENT_COLOURS = ("#1f77b4", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22")


def visibility_classes(
    num_points_by_agent: Mapping[int, np.ndarray], ego_id: int, num_boxes: int
) -> np.ndarray:
    """Classify boxes by who saw them.

    Args:
        num_points_by_agent: agent id -> (M,) points of its scan on each box (or a boolean
            visibility mask); agents missing here saw nothing.
        ego_id: the agent whose view counts as "the ego's".
        num_boxes: M.

    Returns:
        (M,) int array of :data:`SEEN_BY_EGO`, :data:`SEEN_BY_OTHERS_ONLY` or :data:`UNSEEN`.
    """
    seen_ego = np.zeros(num_boxes, dtype=bool)
    seen_others = np.zeros(num_boxes, dtype=bool)
    for agent_id, counts in num_points_by_agent.items():
        counts = np.asarray(counts).reshape(-1)
        if counts.shape != (num_boxes,):
            raise ValueError(
                f"visibility of agent {agent_id} has {counts.shape[0]} entries for {num_boxes} boxes"
            )
        if agent_id == ego_id:
            seen_ego |= counts > 0
        else:
            seen_others |= counts > 0
    out = np.full(num_boxes, UNSEEN, dtype=np.int64)
    out[seen_others] = SEEN_BY_OTHERS_ONLY
    out[seen_ego] = SEEN_BY_EGO
    return out


def new_bev_figure(size_in: float = 9.0, dpi: int = 110) -> tuple[Figure, Axes]:
    """A square figure on the Agg canvas (no pyplot, no display) and its axes."""
    fig = Figure(figsize=(size_in, size_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax


def _agent_colour(index: int) -> str:
    return _AGENT_COLOURS[index % len(_AGENT_COLOURS)]


def render_bev(
    ax: Axes,
    points_world_by_agent: Mapping[int, np.ndarray],
    boxes_world: np.ndarray,
    box_ids: np.ndarray,
    num_points_by_agent: Mapping[int, np.ndarray] | None,
    ego_id: int,
    *,
    view_range_m: float | None = None,
    centre_xy: tuple[float, float] | None = None,
    max_points_per_agent: int = 30000,
    point_size: float = 1.5,
    title: str | None = None,
) -> None:
    """Draw one cooperative frame from above.

    Args:
        ax: matplotlib axes to draw into.
        points_world_by_agent: agent id -> (N, 3+) points (x, y used), all in one frame.
        boxes_world: (M, 7) boxes (mmdet3d convention) in the same frame.
        box_ids: (M,) actor id of each box; boxes whose id is a key of ``points_world_by_agent``
            are drawn as that agent's own box.
        num_points_by_agent: agent id -> (M,) points (or bool mask) of that agent's scan on each
            box; None draws every non-agent box as unseen.
        ego_id: the agent whose view decides "seen by the ego"; drawn first in the legend.
        view_range_m: half width of the square shown around ``centre_xy``; None fits the data.
        centre_xy: centre of the view (default: the ego's box if present, else the origin).
        max_points_per_agent: evenly strided subsample above this many points (plot speed).
        point_size: marker area in points^2.
        title: axes title.
    """
    boxes = np.asarray(boxes_world, dtype=np.float64).reshape(-1, 7)
    ids = np.asarray(box_ids).reshape(-1)
    if len(ids) != len(boxes):
        raise ValueError(f"{len(ids)} box ids for {len(boxes)} boxes")
    if max_points_per_agent < 1:
        raise ValueError("max_points_per_agent must be >= 1")
    agent_order = sorted(points_world_by_agent, key=lambda a: (a != ego_id, a))
    colour_of = {agent: _agent_colour(i) for i, agent in enumerate(agent_order)}

    handles: list = []
    for agent in agent_order:
        pts = np.asarray(points_world_by_agent[agent])
        if pts.ndim != 2 or pts.shape[1] < 2:
            raise ValueError(f"points of agent {agent} must be (N, 3+), got {pts.shape}")
        stride = max(1, int(np.ceil(len(pts) / max_points_per_agent)))
        sub = pts[::stride]
        ax.scatter(sub[:, 0], sub[:, 1], s=point_size, c=colour_of[agent], marker=".", linewidths=0, zorder=1)
        label = f"points of agent {agent}" + (" (ego)" if agent == ego_id else "")
        handles.append(
            Line2D([], [], linestyle="none", marker="o", markersize=5, color=colour_of[agent], label=label)
        )

    classes = (
        visibility_classes(num_points_by_agent, ego_id, len(boxes))
        if num_points_by_agent is not None
        else np.full(len(boxes), UNSEEN, dtype=np.int64)
    )
    style = {
        SEEN_BY_EGO: (COLOUR_SEEN_BY_EGO, "-"),
        SEEN_BY_OTHERS_ONLY: (COLOUR_SEEN_BY_OTHERS, "-"),
        UNSEEN: (COLOUR_UNSEEN, "--"),
    }
    corners = box_corners(boxes)[:, :4, :2] if len(boxes) else np.zeros((0, 4, 2))  # (M, 4, 2) bottom face
    for i in range(len(boxes)):
        agent = int(ids[i])
        if agent in colour_of:
            colour, linestyle, width = colour_of[agent], "-", 2.2
        else:
            colour, linestyle = style[int(classes[i])]
            width = 1.3
        ax.add_patch(
            Polygon(
                corners[i],
                closed=True,
                fill=False,
                edgecolor=colour,
                linestyle=linestyle,
                linewidth=width,
                zorder=3,
            )
        )
        front = corners[i, [0, 3]].mean(axis=0)  # middle of the front edge: shows the heading
        ax.plot(
            [boxes[i, 0], front[0]], [boxes[i, 1], front[1]], color=colour, linewidth=width * 0.7, zorder=3
        )

    for cls, label in (
        (SEEN_BY_EGO, "seen by the ego"),
        (SEEN_BY_OTHERS_ONLY, "occluded, seen by others"),
        (UNSEEN, "seen by nobody"),
    ):
        colour, linestyle = style[cls]
        count = int(np.sum((classes == cls) & ~np.isin(ids, list(colour_of))))
        handles.append(Line2D([], [], color=colour, linestyle=linestyle, label=f"{label} ({count})"))

    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    if view_range_m is not None:
        if centre_xy is None:
            own = np.flatnonzero(ids == ego_id)
            centre_xy = (float(boxes[own[0], 0]), float(boxes[own[0], 1])) if len(own) else (0.0, 0.0)
        cx, cy = centre_xy
        ax.set_xlim(cx - view_range_m, cx + view_range_m)
        ax.set_ylim(cy - view_range_m, cy + view_range_m)
        ax.set_aspect("equal", adjustable="box")
    else:
        ax.set_aspect("equal", adjustable="datalim")
        ax.autoscale_view()
    ax.legend(handles=handles, loc="upper right", fontsize="small", framealpha=0.85)
    if title:
        ax.set_title(title)
