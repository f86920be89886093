"""Routes and road layouts: arc-length queries, projections, signals, connectivity."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.roads import LAYOUTS, SignalPlan, make_layout
from sim.routes import CURVE_APPROACH_DECEL, CURVE_LATERAL_ACCEL, Route, arc, line, polyline


@given(st.floats(0.0, 1.0), st.floats(-3.0, 3.0))
@settings(max_examples=60, deadline=None)
def test_project_inverts_point_with_lateral_offset(fraction, offset):
    route = Route("r", polyline(line((0, 0), (20, 0)), arc((20, 10), 10.0, -np.pi / 2, 0.0)))
    s = fraction * route.length
    heading = route.heading(s)
    p = route.point(s) + offset * np.array([-np.sin(heading), np.cos(heading)])
    s_back, lateral = route.project(p[None])
    # on the arc, offsets towards the centre can snap to another point only if |offset| > radius
    assert s_back[0] == pytest.approx(s, abs=0.05 + abs(offset) * 0.05)
    assert lateral[0] == pytest.approx(offset, abs=0.05)


def test_straight_runs_keep_only_their_ends():
    route = Route("r", polyline(line((0, 0), (50, 0)), line((50, 0), (50, 30))))
    assert route.xy.tolist() == [[0.0, 0.0], [50.0, 0.0], [50.0, 30.0]]
    assert route.length == pytest.approx(80.0)
    assert route.point(65.0).tolist() == pytest.approx([50.0, 15.0])


def test_route_rejects_bad_input():
    with pytest.raises(ValueError):
        Route("bad", np.zeros((1, 2)))
    with pytest.raises(ValueError):
        Route("dup", np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))


def test_signal_plan_phases():
    plan = SignalPlan(green=10, yellow=3, all_red=2, offset=0)
    assert plan.cycle == 30
    assert [plan.state(0, t) for t in (0, 9.9, 10, 12.9, 13, 14.9)] == ["green"] * 2 + ["yellow"] * 2 + [
        "red"
    ] * 2
    assert [plan.state(1, t) for t in (0, 14.9, 15, 25, 28)] == ["red", "red", "green", "yellow", "red"]
    # never both green
    for t in np.arange(0, 60, 0.1):
        assert not (plan.state(0, t) == "green" and plan.state(1, t) == "green")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_are_drivable(name):
    layout = make_layout(name, np.random.default_rng(0))
    assert layout.routes
    for route in layout.routes.values():
        # no kinks sharper than a turn of radius ~3 m sampled at 0.5 m
        turn = np.abs(np.diff(np.unwrap(np.arctan2(route.seg_dir[:, 1], route.seg_dir[:, 0]))))
        assert turn.max(initial=0.0) < 0.2, route.name
    assert layout.static_boxes.shape[1] == 7 and np.all(layout.static_boxes[:, 3:6] > 0)
    assert len(layout.static_semantic) == len(layout.static_boxes)


def test_intersection_turns_end_in_the_right_lanes():
    layout = make_layout("intersection", np.random.default_rng(0))
    left = layout.route("S_left")  # northbound, turns west
    assert np.degrees(left.heading(0.0)) == pytest.approx(90.0)
    assert np.degrees(left.heading(left.length)) == pytest.approx(180.0, abs=1.0)
    assert left.xy[-1, 1] == pytest.approx(1.75)  # inner westbound lane
    right = layout.route("E_right")  # from the east heading west, turns north
    assert np.degrees(right.heading(right.length)) == pytest.approx(90.0, abs=1.0)
    assert right.xy[-1, 0] == pytest.approx(5.25)  # outer northbound lane


def test_highway_ramp_joins_the_right_lane():
    layout = make_layout("highway", np.random.default_rng(0))
    ramp, e0 = layout.route("ramp"), layout.route("E0")
    target, s_start, s_end = ramp.merge
    assert target == "E0" and 0 < s_start < s_end < ramp.length
    _, lateral = e0.project(ramp.point(ramp.length - np.arange(0.0, 100.0, 10.0)))
    assert np.allclose(lateral, 0.0, atol=1e-6)


def test_bad_layout_name_lists_choices():
    with pytest.raises(ValueError, match="valid layouts"):
        make_layout("roundabout", np.random.default_rng(0))


def test_curve_speed_keeps_lateral_acceleration_and_brakes_ahead_of_the_curve():
    radius = 10.0
    route = Route("r", polyline(line((0, 0), (40, 0)), arc((40, radius), radius, -np.pi / 2, 0.0)))
    v_arc = np.sqrt(CURVE_LATERAL_ACCEL * radius)
    s_arc = 40.0 + 0.5 * np.pi * radius * np.array([0.2, 0.5, 0.8])
    assert route.curve_speed(s_arc) == pytest.approx(np.full(3, v_arc), rel=0.02)
    # on the straight: the speed from which braking at CURVE_APPROACH_DECEL meets the curve's
    for d in (5.0, 20.0):
        expected = np.sqrt(route.curve_speed(40.0 + 0.5) ** 2 + 2.0 * CURVE_APPROACH_DECEL * (d + 0.5))
        assert route.curve_speed(40.0 - d) == pytest.approx(expected, rel=0.02)
    # the scalar path (one float) gives what the array path gives
    for s in (3.0, 39.7, 45.2, route.length):
        assert route.curve_speed(float(s)) == pytest.approx(float(route.curve_speed(np.array([s]))[0]), abs=1e-12)
    assert route.min_curve_speed(0.0, 20.0) == pytest.approx(route.curve_speed(20.0))
    assert route.min_curve_speed(0.0, route.length) == pytest.approx(v_arc, rel=0.02)
    straight = Route("s", line((0, 0), (100, 0)))
    assert straight.min_curve_speed(0.0, 100.0) > 50.0  # no curve: no limit below any speed limit


def test_intersection_turns_have_realistic_curve_speeds():
    layout = make_layout("intersection", np.random.default_rng(0))
    left = layout.route("S_left").min_curve_speed(0.0, layout.route("S_left").length)
    right = layout.route("S_right").min_curve_speed(0.0, layout.route("S_right").length)
    assert 5.0 < left < 8.0  # 18-29 km/h through a left turn
    assert 3.0 < right < left
    assert layout.route("S_straight").min_curve_speed(0.0, 300.0) > layout.route("S_straight").speed_limit
