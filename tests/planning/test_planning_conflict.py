"""Path conflicts (sim/env_conflict.py) and the env's conflict features."""

import numpy as np
import pytest

from sim.env import EGO_FEATURES, EVAL_SEED_OFFSET, CoopDrivingEnv, EnvConfig, RewardConfig
from sim.env_conflict import CONFLICT_FEATURES, MARGIN_NORM_S, Conflict, conflict_features, first_conflict
from sim.env_lanes import MetaAction


def _straight_path(length: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
    """The ego drives east along y = 0 from x = 0 (its front), 1 m spacing."""
    s = np.arange(0.0, length + 1e-9, 1.0)
    return np.stack([s, np.zeros_like(s)], axis=1), s


def _box(x: float, y: float, yaw: float, length: float = 4.0, width: float = 2.0) -> np.ndarray:
    return np.array([x, y, 0.0, length, width, 1.5, yaw])


def test_a_crossing_car_gives_the_hand_computed_distance_and_times():
    path, s = _straight_path()
    # a car 20 m south of the path at x = 30, driving north at 10 m/s
    boxes = _box(30.0, -20.0, np.pi / 2)[None]
    conflict = first_conflict(path, s, ego_width=2.0, boxes=boxes, velocities=np.array([[0.0, 10.0]]))
    assert conflict is not None and conflict.index == 0
    # band half-width (2 + 2) / 2 + 0.5 = 2.5 m around x = 30: the ego's path enters it at x = 28
    assert conflict.distance_m == pytest.approx(28.0) and conflict.exit_m == pytest.approx(32.0)
    # the car's centre is 20 m from the path; it counts from 2 + 1 + 0.5 = 3.5 m before to 3.5 m after
    assert conflict.arrival_s == pytest.approx((20.0 - 3.5) / 10.0)
    assert conflict.clear_s == pytest.approx((20.0 + 3.5) / 10.0)


def test_parallel_stopped_and_passed_vehicles_are_no_conflict():
    path, s = _straight_path()
    boxes = np.stack(
        [
            _box(20.0, 0.0, 0.0),  # ahead in the ego's lane, same direction
            _box(40.0, 3.5, np.pi),  # oncoming in the next lane
            _box(30.0, -20.0, np.pi / 2),  # would cross, but stands still
            _box(30.0, 10.0, np.pi / 2),  # crossed already, driving away north
        ]
    )
    velocities = np.array([[8.0, 0.0], [-10.0, 0.0], [0.0, 0.0], [0.0, 10.0]])
    assert first_conflict(path, s, 2.0, boxes, velocities) is None
    assert first_conflict(path, s, 2.0, np.zeros((0, 7)), np.zeros((0, 2))) is None


def test_an_oblique_crossing_is_timed_over_the_whole_stretch_inside_the_band():
    """A car crossing at 45 degrees occupies the ego's path over a long stretch: it reaches the
    first point of that stretch earliest and leaves the last one latest, not at the centre."""
    s = np.arange(0.0, 50.0 + 1e-9, 0.1)
    path = np.stack([s, np.zeros_like(s)], axis=1)
    course = np.array([1.0, 1.0]) / np.sqrt(2.0)  # north-east, crossing y = 0 at x = 30
    centre = np.array([30.0, 0.0]) - 15.0 * course
    boxes = _box(*centre, np.pi / 4)[None]
    conflict = first_conflict(path, s, 2.0, boxes, (10.0 * course)[None])
    assert conflict is not None
    half_band = 2.5  # (2 + 2) / 2 + 0.5: the band is 2.5 / sin(45 deg) = 3.54 m either side along y = 0
    stretch = half_band / np.sin(np.pi / 4)
    assert conflict.distance_m == pytest.approx(30.0 - stretch, abs=0.1)
    assert conflict.exit_m == pytest.approx(30.0 + stretch, abs=0.1)
    # along the car's course those ends are 3.54 * cos(45 deg) = 2.5 m before and after x = 30
    along_span = stretch * np.cos(np.pi / 4)
    reach = 2.0 + 1.0 + 0.5
    assert conflict.arrival_s == pytest.approx((15.0 - along_span - reach) / 10.0, abs=0.01)
    assert conflict.clear_s == pytest.approx((15.0 + along_span + reach) / 10.0, abs=0.01)


def test_the_earliest_arrival_wins_not_the_nearest_point():
    path, s = _straight_path()
    boxes = np.stack([_box(10.0, -30.0, np.pi / 2), _box(40.0, -12.0, np.pi / 2)])
    velocities = np.array([[0.0, 10.0], [0.0, 10.0]])  # arrivals 2.65 s and 0.85 s
    conflict = first_conflict(path, s, 2.0, boxes, velocities)
    assert conflict.index == 1 and conflict.distance_m == pytest.approx(38.0)


def test_the_next_crossing_is_kept_and_bounds_the_go_after_margin():
    path, s = _straight_path()
    # two cars in the same lane crossing at x = 30, arriving at 0.85 s and 2.25 s
    boxes = np.stack([_box(30.0, -12.0, np.pi / 2), _box(30.0, -26.0, np.pi / 2)])
    velocities = np.array([[0.0, 10.0], [0.0, 10.0]])
    conflict = first_conflict(path, s, 2.0, boxes, velocities)
    assert conflict.index == 0 and conflict.following is not None and conflict.following.index == 1
    assert conflict.following.arrival_s == pytest.approx((26.0 - 3.5) / 10.0)
    alone = first_conflict(path, s, 2.0, boxes[:1], velocities[:1])
    assert alone.following is None
    # at 10 m/s the ego reaches the crossing (28 m) 2.95 s from now, after the first car has gone
    # (1.55 s), but its rear leaves (32 + 5 m) at 3.85 s, after the second arrives (2.25 s)
    f_alone = conflict_features(alone, 10.0, 10.0, 5.0)
    f_both = conflict_features(conflict, 10.0, 10.0, 5.0)
    assert f_alone[5] == pytest.approx(min((2.95 - 1.55) / MARGIN_NORM_S, 2.0))
    assert f_both[5] == pytest.approx(max((2.25 - 3.85) / MARGIN_NORM_S, -2.0))
    assert f_both[:5].tolist() == pytest.approx(f_alone[:5].tolist())


def test_features_are_normalised_and_default_to_far_and_late():
    assert conflict_features(None, 10.0, 13.9, 4.5).tolist() == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    conflict = Conflict(index=0, distance_m=25.0, exit_m=30.0, arrival_s=-1.0, clear_s=60.0)
    # at the speed limit already: 0.15 s of controller lag, then 25 m (in) and 30 + 5 m (out) at 10 m/s
    f = conflict_features(conflict, ego_speed=10.0, max_speed=10.0, ego_length=5.0)
    go_first = -1.0 - (0.15 + 3.5)  # the other vehicle is in the crossing already
    go_after = (0.15 + 2.5) - 60.0  # and stays for a minute
    assert f.tolist() == pytest.approx([1.0, 0.5, -0.2, 2.0, max(go_first / MARGIN_NORM_S, -2.0), -2.0])
    assert len(f) == len(CONFLICT_FEATURES)
    assert go_after < -4.0
    # a car that arrives in 4 s and clears in 5 s: going first at full speed leaves 0.35 s;
    # standing still, the ego needs longer and the margin shrinks
    later = Conflict(index=0, distance_m=25.0, exit_m=30.0, arrival_s=4.0, clear_s=5.0)
    assert conflict_features(later, 10.0, 10.0, 5.0)[4] == pytest.approx((4.0 - 3.65) / MARGIN_NORM_S)
    assert conflict_features(later, 0.0, 10.0, 5.0)[4] < conflict_features(later, 10.0, 10.0, 5.0)[4]


def _conflict_obs(env: CoopDrivingEnv, obs: np.ndarray) -> np.ndarray:
    n = len(EGO_FEATURES)
    return obs[n : n + len(CONFLICT_FEATURES)]


def test_env_conflict_features_see_the_red_light_runner_only_when_known():
    seed = EVAL_SEED_OFFSET
    plain = CoopDrivingEnv(EnvConfig(scenario="red_light", obs="oracle"), seed=0)
    oracle = CoopDrivingEnv(EnvConfig(scenario="red_light", obs="oracle", conflict_features=True), seed=0)
    ego_only = CoopDrivingEnv(EnvConfig(scenario="red_light", obs="ego_only", conflict_features=True), seed=0)
    assert oracle.obs_dim == plain.obs_dim + len(CONFLICT_FEATURES)
    obs, _ = oracle.reset(seed=seed)
    features = _conflict_obs(oracle, obs["cav_0"])
    assert features[0] == 1.0  # the runner crosses the ego's path ahead
    distance_m, arrival_s = features[1] * 50.0, features[2] * 5.0
    assert 10.0 < distance_m < 50.0 and 0.5 < arrival_s < 6.0
    assert oracle.observation_space("cav_0").contains(obs["cav_0"])
    # the same moment without sharing: the occluded runner is unknown, no conflict
    obs, _ = ego_only.reset(seed=seed)
    assert _conflict_obs(ego_only, obs["cav_0"]).tolist() == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    # one decision later the runner is 0.2 s closer
    obs, *_ = oracle.step({"cav_0": 1})
    assert _conflict_obs(oracle, obs["cav_0"])[2] * 5.0 == pytest.approx(arrival_s - 0.2, abs=0.02)


@pytest.mark.parametrize(("seed", "on_course"), [(EVAL_SEED_OFFSET + 2, True), (EVAL_SEED_OFFSET, False)])
def test_collision_course_cost_is_charged_only_when_no_way_through_is_clear(seed, on_course):
    """Seed +2: an early runner (pressing FASTER collides with it, going after it needs braking);
    seed +0: a late one (pressing FASTER passes before it)."""
    rewards = {}
    for cost in (0.0, -1.0):
        config = EnvConfig(scenario="red_light", obs="ego_only", reward=RewardConfig(conflict=cost))
        env = CoopDrivingEnv(config, seed=0)
        env.reset(seed=seed)
        _, reward, *_ = env.step({"cav_0": int(MetaAction.FASTER)})
        rewards[cost] = reward["cav_0"]
    # ground truth decides, not what the ego_only agent knows: 1 decision of 0.2 s, charged in
    # proportion to the deficit (the early runner's about 0.5 s, less the 0.1 s tolerance)
    if on_course:
        assert -0.2 < rewards[-1.0] - rewards[0.0] < -0.02
    else:
        assert rewards[-1.0] == rewards[0.0]
