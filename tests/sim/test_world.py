"""The embedded World: the shared World suite, every scenario, occlusion, traffic and collisions."""

import numpy as np
import pytest
import world_suite

from sim.roads import SignalPlan, make_layout
from sim.scenarios import (
    LEFT_TURN_TIMING,
    SCENARIOS,
    ActorSpec,
    ScenarioSpec,
    build_scenario,
    fastest_arrival_s,
    fastest_arrivals_on_route_s,
    route_crossing,
)
from sim.types import ActorKind, Role, VehicleControl
from sim.world import EmbeddedWorld, make_world


def _make(scenario: str) -> EmbeddedWorld:
    return make_world(scenario, lidar="tiny", traffic_density=0.5)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_world_suite_reset(scenario):
    world_suite.check_reset_frame(_make(scenario))


def test_world_suite_step():
    world_suite.check_step_advances_time(_make("overtaking"))


@pytest.mark.parametrize("scenario", ["overtaking", "merge"])
def test_world_suite_deterministic(scenario):
    world_suite.check_deterministic(_make, scenario)


def test_world_suite_actions():
    world_suite.check_ego_obeys_actions(_make("overtaking"))


def test_world_suite_bad_use():
    world_suite.check_rejects_bad_use(_make("red_light"))
    with pytest.raises(RuntimeError, match="reset"):
        _make("merge").step()


def test_different_seeds_differ():
    a = _make("random_traffic").reset(1)
    b = _make("random_traffic").reset(2)
    assert a.boxes_world.shape != b.boxes_world.shape or not np.allclose(a.boxes_world, b.boxes_world)


def test_bad_names_and_parameters_list_the_choices():
    with pytest.raises(ValueError, match="valid scenarios"):
        make_world("roundabout")
    with pytest.raises(ValueError, match="traffic_density"):
        make_world("merge", traffic_density=-1.0)
    with pytest.raises(ValueError, match="valid"):
        make_world("merge", trafic_density=1.0)  # typo
    with pytest.raises(ValueError, match="hdl64"):
        make_world("merge", lidar="hdl65")


@pytest.mark.parametrize("scenario", ["overtaking", "left_turn", "red_light", "merge"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hidden_danger_is_invisible_to_ego_and_seen_by_another_cav(scenario, seed):
    world = make_world(scenario, lidar="hdl64")
    frame = world.reset(seed)
    assert frame.hidden_agent_ids, "scenario names no hidden actor"
    index = {a.id: i for i, a in enumerate(frame.agents)}
    for hidden in frame.hidden_agent_ids:
        i = index[hidden]
        ego_points = frame.points_in_box[frame.ego_id][i]
        others = {cav: int(c[i]) for cav, c in frame.points_in_box.items() if cav != frame.ego_id}
        assert ego_points == 0, f"ego sees the hidden actor with {ego_points} points"
        assert max(others.values()) > 0, f"no other connected vehicle sees it: {others}"


@pytest.mark.parametrize("cavs", [2, 4])
def test_cav_count_is_respected(cavs):
    frame = make_world("merge", lidar="tiny", cavs=max(cavs, 3)).reset(0)
    assert len(frame.connected_ids) == max(cavs, 3)
    frame = make_world("random_traffic", lidar="tiny", cavs=cavs).reset(0)
    assert len(frame.connected_ids) == cavs


def test_traffic_stops_at_red_and_runner_does_not():
    world = make_world("red_light", lidar="tiny", traffic_density=0.0)
    frame = world.reset(0)
    runner = frame.hidden_agent_ids[0]
    stop_y = -9.0  # south stop line of the crossing road
    crossed = False
    for _ in range(60):
        frame = world.step()
        if frame.agent(runner).T_world_from_agent[1, 3] > stop_y:
            crossed = True
    assert crossed, "the red-light runner must cross its red light"
    assert frame.traffic_lights[0] == "red"  # its signal stayed red meanwhile


def test_human_traffic_never_enters_the_intersection_on_red():
    world = make_world("random_traffic", lidar="tiny", traffic_density=1.5)
    world.reset(5)
    plan = world.spec.signal_plan
    last_front: dict[int, float] = {}
    crossings = violations = 0
    for _ in range(200):
        frame = world.step()
        for a in frame.agents:
            if a.role is not Role.HUMAN:
                continue
            route = world.layout.route(world.spec.actors[a.id].route)
            s_stop, signal = route.stop_lines[0]
            front = route.project(a.T_world_from_agent[None, :2, 3])[0][0] + a.extent[0] / 2
            before = last_front.get(a.id)
            last_front[a.id] = front
            if before is not None and before <= s_stop < front:
                crossings += 1
                # red now and already red 1.5 s ago: not a late decision on yellow
                if (
                    plan.state(signal, frame.time_s) == "red"
                    and plan.state(signal, frame.time_s - 1.5) == "red"
                ):
                    violations += 1
    assert crossings > 3, "the test needs traffic through the intersection"
    assert violations == 0


def test_rear_end_collision_is_reported():
    world = make_world("overtaking", lidar="tiny", traffic_density=0.0)
    frame = world.reset(0)
    ego = frame.ego_id
    truck = next(a.id for a in frame.agents if a.kind.value == "truck")
    collisions = set()
    for _ in range(40):
        frame = world.step({ego: VehicleControl(acceleration=4.0)})
        collisions |= set(frame.collisions)
    assert (min(ego, truck), max(ego, truck)) in collisions


def test_no_collisions_in_autopilot_traffic():
    world = make_world("merge", lidar="tiny")
    world.reset(0)
    for _ in range(80):
        frame = world.step()
        assert not frame.collisions, frame.collisions


@pytest.mark.parametrize(
    ("scenario", "ego_route", "hidden_route"),
    [("red_light", "W_straight_inner", "S_straight")],
)
def test_hidden_vehicle_timing_varies_so_no_fixed_delay_fits_every_seed(scenario, ego_route, hidden_route):
    """The hidden vehicle reaches the ego's path sometimes about when the ego would at full speed
    and sometimes clearly later, so neither going at once nor any one delay suits every seed."""
    offsets = []
    for seed in range(12):
        spec = build_scenario(scenario, np.random.default_rng(seed))
        ego, hidden = spec.actors[spec.ego_index], spec.actors[spec.hidden_indices[0]]
        route = spec.layout.route(ego_route)
        s_ego, s_hidden = route_crossing(spec.layout, ego_route, hidden_route, (150.0, 230.0))
        t_ego = fastest_arrival_s(s_ego - ego.s, ego.speed, route.speed_limit)
        offsets.append((s_hidden - hidden.s) / hidden.speed - t_ego)
    offsets = np.array(offsets)
    early, late = offsets < 0.3, offsets > 0.5
    assert np.all(early | late), offsets  # nothing in between: the modes are told apart by timing
    assert 3 <= early.sum() <= 9, offsets  # both happen on a handful of seeds


def test_left_turn_hides_a_stream_of_oncoming_cars_a_short_gap_apart():
    """The first car meets a fast ego on some seeds and a hedging one on others; each next one
    follows 1.6-2.0 s later, so only an ego that knows their times fits between them, and they
    react to a vehicle pulling into their lane only after a reaction time."""
    timing = LEFT_TURN_TIMING
    firsts, gaps = [], []
    for seed in range(12):
        spec = build_scenario("left_turn", np.random.default_rng(seed))
        cars = [a for a in spec.actors if a.tag == "hidden"]
        assert len(cars) == timing.cars == 3
        assert spec.hidden_indices == (3, 4)  # the third is far enough to show past the bus at t = 0
        ego = spec.actors[spec.ego_index]
        route = spec.layout.route("S_left")
        s_ego, s_hidden = route_crossing(spec.layout, "S_left", "N_straight", (150.0, 230.0))
        (t_ego,) = fastest_arrivals_on_route_s(route, ego.s, [s_ego - ego.s], ego.speed, route.speed_limit)
        assert all(c.reaction_s == timing.reaction_s > 0 for c in cars)
        times = [(s_hidden - c.s) / c.speed for c in cars]
        firsts.append(times[0] - t_ego)
        gaps += list(np.diff(times))
        bus = next(a for a in spec.actors if a.tag == "occluder")
        assert bus.pose is not None and bus.pose[2] == pytest.approx(-np.pi / 2, abs=1e-6)  # wheels straight
    firsts, gaps = np.array(firsts), np.array(gaps)
    lo, hi = timing.first_offset_s
    assert np.all((firsts >= lo - 1e-6) & (firsts <= hi + 1e-6)), firsts
    # an ego going at once meets a first car in [-1.3, -0.1] s (measured): it does on some seeds,
    # a hedging ego on others
    assert firsts.min() < -0.5 and firsts.max() > -0.1, firsts
    assert np.all((gaps >= timing.gap_s[0] - 1e-6) & (gaps <= timing.gap_s[1] + 0.6)), gaps


def _brake_onset_after_cut_in(reaction_s: float, monkeypatch) -> float:
    """Seconds from a stopped connected car steering into a human car's lane, 35 m ahead of it,
    to that car's first braking (intersection, south approach: the human goes straight, the
    connected car starts in the left-turn lane beside it)."""
    import sim.world

    layout = make_layout("intersection", np.random.default_rng(0))
    stop = layout.route("S_straight").stop_lines[0][0]
    human = ActorSpec(
        ActorKind.CAR, Role.HUMAN, np.array([4.6, 1.85, 1.5]), route="S_straight", s=stop - 80.0,
        speed=10.0, desired_speed=10.0, reaction_s=reaction_s,
    )
    cutter = ActorSpec(
        ActorKind.CAR, Role.CONNECTED, np.array([4.6, 1.85, 1.5]), route="S_left", s=stop - 45.0, speed=0.0
    )
    spec = ScenarioSpec("red_light", layout, [cutter, human], signal_plan=SignalPlan(offset=0.0))
    monkeypatch.setattr(sim.world, "build_scenario", lambda *args, **kw: spec)
    world = make_world("red_light", lidar="tiny")
    frame = world.reset(0)
    route = layout.route("S_straight")
    lateral = float(route.project(frame.agent(0).T_world_from_agent[None, :2, 3])[1][0])
    steer = -0.5 if lateral > 0 else 0.5  # towards the human's lane
    entered = braked = None
    speed = frame.agent(1).speed
    for k in range(40):
        t = frame.time_s
        control = VehicleControl(acceleration=3.0, steering=steer) if k < 12 else VehicleControl(acceleration=-8.0)
        frame = world.step({0: control})
        _, lat = route.project(frame.agent(0).T_world_from_agent[None, :2, 3])
        if entered is None and abs(lat[0]) < 1.85 + 0.3:
            entered = t
        if braked is None and frame.agent(1).speed < speed - 1e-3:
            braked = t
        speed = frame.agent(1).speed
    assert entered is not None and braked is not None, (entered, braked)
    return braked - entered


def test_drivers_react_to_a_vehicle_pulling_into_their_lane_after_their_reaction_time(monkeypatch):
    # the driver model sees the car in its lane on the tick after it got there (dt = 0.1 s)
    assert _brake_onset_after_cut_in(0.0, monkeypatch) == pytest.approx(0.1, abs=0.05)
    assert _brake_onset_after_cut_in(1.5, monkeypatch) == pytest.approx(1.6, abs=0.05)


def test_fastest_arrival_matches_the_simple_kinematics():
    assert fastest_arrival_s(0.0, 5.0, 10.0) == pytest.approx(0.15)
    # already at the limit: distance / speed
    assert fastest_arrival_s(30.0, 10.0, 10.0) == pytest.approx(0.15 + 3.0)
    # from rest: 4 m/s^2 for 2.5 s covers 12.5 m, then 10 m/s
    assert fastest_arrival_s(22.5, 0.0, 10.0) == pytest.approx(0.15 + 2.5 + 1.0)


def test_fastest_arrival_on_a_route_slows_for_its_curves():
    layout = make_layout("intersection", np.random.default_rng(0))
    straight, left = layout.route("S_straight"), layout.route("S_left")
    distances = [0.0, 10.0, 25.0, 40.0]
    # without a curve on the way it is the simple model
    on_straight = fastest_arrivals_on_route_s(straight, 150.0, distances, 7.5, straight.speed_limit)
    assert on_straight == pytest.approx([fastest_arrival_s(d, 7.5, straight.speed_limit) for d in distances])
    # through a left turn it is slower, still increasing with distance, and in any order asked
    stop = left.stop_lines[0][0]
    on_left = fastest_arrivals_on_route_s(left, stop - 8.0, distances, 7.5, left.speed_limit)
    assert on_left[0] == pytest.approx(fastest_arrival_s(0.0, 7.5, left.speed_limit))
    assert all(a > b for a, b in zip(on_left[2:], on_straight[2:], strict=True))
    assert np.all(np.diff(on_left) > 0)
    assert fastest_arrivals_on_route_s(left, stop - 8.0, distances[::-1], 7.5, left.speed_limit) == on_left[::-1]
    # never faster than the curve speed allows: 40 m, of which ~17 m on the arc at <= 6.6 m/s
    v_turn = left.min_curve_speed(stop, stop + 30.0)
    assert on_left[-1] > 17.0 / v_turn


def test_world_drivers_slow_down_for_turns():
    """Driven by the World's driver model, the left_turn ego (desired 8 m/s) takes the turn at
    no more than the route's curve speed (6.6 m/s), slowing down before it."""
    world = make_world("left_turn", lidar="tiny")
    world.sensors_enabled = False
    frame = world.reset(seed=1)
    ego_id = frame.ego_id
    route = world.route_of(ego_id)
    stop = route.stop_lines[0][0]
    v_turn = route.min_curve_speed(stop, stop + 30.0)
    on_arc = []
    for _ in range(60):
        frame = world.step()
        me = next((a for a in frame.agents if a.id == ego_id), None)
        if me is None:
            break
        s = float(route.project(me.T_world_from_agent[None, :2, 3])[0][0])
        if stop + 3.0 < s < stop + 15.0:
            on_arc.append(me.speed)
    assert len(on_arc) > 5
    assert max(on_arc) < v_turn + 0.3, (max(on_arc), v_turn)
    assert max(on_arc) > v_turn - 0.5  # it does not crawl either (later it may brake for a crossing car)
