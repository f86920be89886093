"""Passing on a two-way road (sim/env_passing.py) and the env's passing features and head-on cost."""

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from sim.env import EGO_FEATURES, EVAL_SEED_OFFSET, CoopDrivingEnv, EnvConfig, RewardConfig
from sim.env_conflict import CONFLICT_FEATURES
from sim.env_lanes import MetaAction
from sim.env_passing import (
    LAG_S,
    PASSING_FEATURES,
    RETURN_S,
    fastest_distance_m,
    passing_features,
    passing_situation,
    time_to_gain_s,
)
from sim.scenarios import fastest_arrival_s

A = MetaAction
LANE = 3.5


def test_fastest_distance_inverts_fastest_arrival():
    assert LAG_S == pytest.approx(0.15)
    for distance, speed, max_speed in [
        (5.0, 4.0, 13.9),
        (40.0, 4.0, 13.9),
        (80.0, 0.0, 10.0),
        (30.0, 12.0, 10.0),
    ]:
        t = fastest_arrival_s(distance, speed, max_speed)
        assert fastest_distance_m(t, speed, max_speed) == pytest.approx(distance)
    assert fastest_distance_m(0.1, 5.0, 10.0) == 0.0  # nothing during the lag


def test_time_to_gain_on_a_leader_is_hand_computed():
    # ego and leader at 4 m/s, speed limit 14 m/s: after the 0.15 s lag the ego accelerates at
    # 4 m/s^2 for 2.5 s and gains 0.5 * 4 * 2.5^2 = 12.5 m, then 10 m/s; the leader drives on
    # 4 * 0.15 = 0.6 m during the lag
    assert time_to_gain_s(24.0, 4.0, 14.0, 4.0) == pytest.approx(0.15 + 2.5 + (24.6 - 12.5) / 10.0)
    assert time_to_gain_s(10.0, 4.0, 14.0, 4.0) == pytest.approx(0.15 + np.sqrt(2.0 * 4.0 * 10.6) / 4.0)
    t = time_to_gain_s(24.0, 4.0, 14.0, 4.0)
    assert fastest_distance_m(t, 4.0, 14.0) - 4.0 * t == pytest.approx(24.0)
    assert time_to_gain_s(0.0, 4.0, 14.0, 4.0) == 0.0
    assert time_to_gain_s(5.0, 14.0, 14.0, 14.0) == np.inf  # a leader at the speed limit


def _situation(ego_front_s=100.0, ego_offset=0.0, rows=()):
    """Ego: 5 m long, 4 m/s, limit 14 m/s; ``rows``: (centre s, offset, speed along, length)."""
    arr = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return passing_situation(
        ego_front_s=ego_front_s,
        ego_length=5.0,
        ego_offset=ego_offset,
        ego_speed=4.0,
        max_speed=14.0,
        s=arr[:, 0],
        offset=arr[:, 1],
        speed_along=arr[:, 2],
        length=arr[:, 3],
        lane_width=LANE,
    )


TRUCK = (110.5, 0.0, 4.0, 9.0)  # rear 106 (6 m ahead of the ego's front), front 115
ONCOMING = (202.25, LANE, -12.0, 4.5)  # front (the end facing the ego) at 200 m
FOLLOWER = (88.0, 0.0, 10.0, 4.5)  # behind the ego in its lane
PARKED = (130.0, -3.0, 0.0, 4.5)  # on the parking strip to the right


def test_passing_a_truck_with_an_oncoming_car_is_hand_computed():
    p = _situation(rows=[FOLLOWER, TRUCK, ONCOMING, PARKED])
    assert p.leader == 1 and p.oncoming == 2
    assert p.leader_gap_m == pytest.approx(6.0) and p.leader_speed == 4.0
    assert p.to_gain_m == pytest.approx(115.0 + 4.0 - 95.0)  # rear 4 m past the truck's front
    pass_s = 0.15 + 2.5 + (24.6 - 12.5) / 10.0  # as in the test above
    assert p.back_s == pytest.approx(pass_s + RETURN_S)
    # the ego's front by then: 22.5 m while accelerating, then 14 m/s
    back_m = 4.0 * 2.5 + 0.5 * 4.0 * 2.5**2 + 14.0 * (p.back_s - 0.15 - 2.5)
    assert p.back_m == pytest.approx(back_m)
    assert p.oncoming_distance_m == pytest.approx(100.0) and p.oncoming_speed == 12.0
    assert p.meet_s == pytest.approx(100.0 / 16.0)
    margin = (100.0 - back_m) / 12.0 - p.back_s  # about -1.63 s: the car is too close to pass now
    assert p.margin_s == pytest.approx(margin) and -1.7 < margin < -1.6
    f = passing_features(p, ego_speed=4.0, max_speed=14.0)
    assert len(f) == len(PASSING_FEATURES)
    assert f.tolist() == pytest.approx(
        [1.0, 6.0 / 25.0, 0.0, 4.0 / 14.0, 24.0 / 25.0, 1.0, 2.0, 1.25, margin]
    )


def test_without_a_leader_or_oncoming_vehicle_the_features_say_far_and_free():
    p = _situation(rows=[FOLLOWER, PARKED])
    assert p.leader is None and p.oncoming is None and p.to_gain_m == 0.0
    assert p.back_s == pytest.approx(RETURN_S) and p.margin_s == np.inf
    assert passing_features(p, 4.0, 14.0).tolist() == [0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 2.0, 2.0, 2.0]
    # an oncoming car far away leaves a margin beyond the clip; one that has passed is gone
    far = _situation(rows=[TRUCK, (302.25, LANE, -12.0, 4.5)])
    assert far.margin_s > 2.0 and passing_features(far, 4.0, 14.0)[-1] == 2.0
    passed = _situation(rows=[TRUCK, (90.0, LANE, -12.0, 4.5)])  # its far end behind the ego's rear
    assert passed.oncoming is None


def test_out_in_the_passing_lane_the_leader_is_the_vehicle_beside():
    witness = (150.0, 0.0, 10.0, 4.5)  # rear 147.75
    # beside the truck (its rear behind the ego's front): still 115 + 4 - 107 = 12 m to gain
    p = _situation(ego_front_s=112.0, ego_offset=LANE, rows=[TRUCK, witness, ONCOMING])
    assert p.leader == 0 and p.leader_gap_m == pytest.approx(-6.0) and p.to_gain_m == pytest.approx(12.0)
    # past it with room to cut in: the witness 22.75 m ahead is the next vehicle, not one being
    # passed, so the margin is that of the return alone
    p = _situation(ego_front_s=125.0, ego_offset=LANE, rows=[TRUCK, witness, ONCOMING])
    assert p.leader is None and p.to_gain_m == 0.0 and p.back_s == pytest.approx(RETURN_S)
    assert p.margin_s == pytest.approx((75.0 - fastest_distance_m(RETURN_S, 4.0, 14.0)) / 12.0 - RETURN_S)
    # back in its lane at the same place the witness is the leader to follow
    p = _situation(ego_front_s=125.0, ego_offset=0.0, rows=[TRUCK, witness, ONCOMING])
    assert p.leader == 1 and p.leader_gap_m == pytest.approx(22.75)
    # a follower in the own lane is never the leader
    assert _situation(rows=[FOLLOWER]).leader is None


def _passing_obs(env: CoopDrivingEnv, obs: np.ndarray) -> dict[str, float]:
    start = env.ego_dim - len(PASSING_FEATURES)
    return dict(zip(PASSING_FEATURES, obs[start : env.ego_dim].tolist(), strict=True))


def test_env_passing_features_see_the_oncoming_car_only_when_known():
    """Seed +0: an early oncoming car, hidden from the ego by the truck, seen by the witness."""
    seed = EVAL_SEED_OFFSET
    plain = CoopDrivingEnv(EnvConfig(scenario="overtaking", obs="oracle"), seed=0)
    both = CoopDrivingEnv(
        EnvConfig(scenario="overtaking", obs="oracle", conflict_features=True, passing_features=True), seed=0
    )
    assert both.obs_dim == plain.obs_dim + len(CONFLICT_FEATURES) + len(PASSING_FEATURES)
    assert both.ego_dim == len(EGO_FEATURES) + len(CONFLICT_FEATURES) + len(PASSING_FEATURES)
    seen = {}
    for mode in ("oracle", "visible", "ego_only"):
        env = CoopDrivingEnv(EnvConfig(scenario="overtaking", obs=mode, passing_features=True), seed=0)
        obs, _ = env.reset(seed=seed)
        assert env.observation_space("cav_0").contains(obs["cav_0"])
        seen[mode] = _passing_obs(env, obs["cav_0"])
    for mode in ("oracle", "visible", "ego_only"):  # the truck 5-7 m ahead, at the ego's speed
        f = seen[mode]
        assert f["passing_leader"] == 1.0 and 5.0 < f["passing_leader_gap"] * 25.0 < 7.5
        assert f["passing_leader_closing"] == pytest.approx(0.0, abs=0.01)
        assert f["passing_leader_speed"] < 0.4
    for mode in ("oracle", "visible"):  # pulling out now meets the oncoming car head-on
        assert seen[mode]["passing_oncoming"] == 1.0 and seen[mode]["passing_margin"] == -2.0
    assert seen["ego_only"]["passing_oncoming"] == 0.0 and seen["ego_only"]["passing_margin"] == 2.0
    # the ego's own features are unchanged by the flag
    obs_plain, _ = plain.reset(seed=seed)
    obs_both, _ = both.reset(seed=seed)
    n = len(EGO_FEATURES)
    assert obs_both["cav_0"][:n].tolist() == obs_plain["cav_0"][:n].tolist()
    assert obs_both["cav_0"][both.ego_dim :].tolist() == obs_plain["cav_0"][n:].tolist()


def test_env_with_passing_features_passes_the_pettingzoo_api_test():
    env = CoopDrivingEnv(
        EnvConfig(scenario="overtaking", obs="visible", passing_features=True, episode_s=3.0), seed=0
    )
    parallel_api_test(env, num_cycles=40)
    obs, _ = env.reset(seed=3)
    assert env.observation_space("cav_0").contains(obs["cav_0"])
    state = env.state()
    assert state.shape == env.state_space.shape and env.state_space.contains(state)


@pytest.mark.parametrize(("seed", "early"), [(EVAL_SEED_OFFSET, True), (EVAL_SEED_OFFSET + 1, False)])
def test_head_on_cost_is_charged_for_pulling_out_in_front_of_an_oncoming_car(seed, early):
    """Seed +0: an early oncoming car (pulling out at once meets it); seed +1: a late one."""
    rewards = {}
    for cost in (0.0, -1.0):
        for action in (A.LANE_LEFT, A.IDLE):
            config = EnvConfig(scenario="overtaking", obs="ego_only", reward=RewardConfig(head_on=cost))
            env = CoopDrivingEnv(config, seed=0)
            env.reset(seed=seed)
            _, reward, *_ = env.step({"cav_0": int(action)})
            rewards[cost, action] = reward["cav_0"]
    # from ground truth, not what the ego_only agent knows: the early car's margin is beyond the
    # 1 s deficit cap, so one decision of 0.2 s costs 0.2
    if early:
        assert rewards[-1.0, A.LANE_LEFT] - rewards[0.0, A.LANE_LEFT] == pytest.approx(-0.2)
    else:
        assert rewards[-1.0, A.LANE_LEFT] == rewards[0.0, A.LANE_LEFT]
    assert rewards[-1.0, A.IDLE] == rewards[0.0, A.IDLE]  # staying in the own lane is never charged
