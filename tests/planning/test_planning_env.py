"""The multi-agent driving env (sim/env.py and its helpers): PettingZoo API, observation sources,
V2X, lanes and meta-actions, rewards and episode ends, intents and the safety supervisor."""

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from sim.env import (
    EGO_FEATURES,
    EVAL_SEED_OFFSET,
    INTENT_FEATURES,
    OBJECT_FEATURES,
    SCENARIO_TASKS,
    CoopDrivingEnv,
    EnvConfig,
)
from sim.env_lanes import (
    LaneMap,
    MetaAction,
    MetaControllerConfig,
    MetaState,
    plan_meta_trajectory,
    update_meta_state,
)
from sim.env_visibility import VisibilityCaster, VisibilityConfig
from sim.world import make_world

A = MetaAction


def _env(**kw) -> CoopDrivingEnv:
    return CoopDrivingEnv(EnvConfig(**kw), seed=0)


def _feature(obs: np.ndarray, name: str) -> float:
    return float(obs[EGO_FEATURES.index(name)])


@pytest.mark.parametrize(
    "kw",
    [
        {"scenario": "merge", "obs": "visible", "intent": True, "safety": True, "episode_s": 3.0},
        {"scenario": "overtaking", "obs": "ego_only", "action": "continuous", "episode_s": 3.0},
    ],
)
def test_pettingzoo_parallel_api(kw):
    env = _env(**kw)
    parallel_api_test(env, num_cycles=100)
    agent = env.possible_agents[0]
    assert env.observation_space(agent) is env.observation_space(agent)
    obs, _ = env.reset(seed=4)
    assert all(env.observation_space(a).contains(o) for a, o in obs.items())
    state = env.state()
    assert state.shape == env.state_space.shape and env.state_space.contains(state)
    expected = len(EGO_FEATURES) + 8 * (
        len(OBJECT_FEATURES) + (len(INTENT_FEATURES) if kw.get("intent") else 0)
    )
    assert env.obs_dim == expected


def test_agents_are_the_connected_vehicles_ego_first():
    env = _env(scenario="merge")
    _, infos = env.reset(seed=2)
    frame = env.frame
    assert env.agents == ["cav_0", "cav_1", "cav_2"]
    assert infos["cav_0"]["vehicle_id"] == frame.ego_id
    assert sorted(i["vehicle_id"] for i in infos.values()) == sorted(frame.connected_ids)
    assert _env(scenario="overtaking").possible_agents == ["cav_0"]  # the scenario's default: the ego


def test_same_seed_same_episode():
    def play(env):
        obs, _ = env.reset(seed=11)
        out = [np.concatenate([obs[a] for a in sorted(obs)])]
        rng = np.random.default_rng(0)
        while env.agents:
            obs, rew, _, _, _ = env.step({a: int(rng.integers(5)) for a in env.agents})
            out.append(np.concatenate([obs[a] for a in sorted(obs)] + [np.array(list(rew.values()))]))
        return out, env.bytes_sent

    a, bytes_a = play(_env(scenario="merge", episode_s=2.0, intent=True))
    b, bytes_b = play(_env(scenario="merge", episode_s=2.0, intent=True))
    assert bytes_a == bytes_b > 0
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_invalid_configs_say_why():
    with pytest.raises(ValueError, match=r"obs=perception needs perception\.checkpoint"):
        _env(obs="perception")
    with pytest.raises(ValueError, match="valid scenarios"):
        _env(scenario="roundabout")
    with pytest.raises(ValueError, match="safety needs discrete actions"):
        _env(action="continuous", safety=True)


def test_coarse_visibility_matches_the_worlds_lidar_with_the_same_rays():
    config = VisibilityConfig()
    world = make_world("left_turn", lidar=config.lidar_config())
    frame = world.reset(3)
    for _ in range(3):
        frame = world.step()
    caster = VisibilityCaster(world.static_geometry(), config)
    observers = np.array([k for k, a in enumerate(frame.agents) if a.connected])
    counts = caster.points_on_boxes(frame.boxes_world, observers)
    reference = np.stack([frame.points_in_box[frame.agents[k].id] for k in observers])
    assert (counts > 0).sum() > 0
    assert np.array_equal(counts > 0, reference > 0)
    # the number of returns per box agrees up to rays grazing an edge
    assert np.abs(counts - reference).sum() <= 0.02 * reference.sum() + 2


def test_cooperation_reveals_the_hidden_vehicle_and_costs_bytes():
    known = {}
    for mode in ("oracle", "visible", "ego_only"):
        env = _env(scenario="overtaking", obs=mode)
        env.reset(seed=1)
        known[mode] = set(env.known_ids("cav_0"))
        hidden = env.frame.hidden_agent_ids
        assert (env.bytes_sent > 0) == (mode == "visible")
    assert known["ego_only"] <= known["visible"] <= known["oracle"]
    assert set(hidden) <= known["visible"] and not set(hidden) & known["ego_only"]


def test_lane_change_onto_the_oncoming_lane_to_overtake():
    env = _env(scenario="overtaking", obs="oracle")
    obs, _ = env.reset(seed=0)  # the hidden oncoming car comes late on this seed
    assert _feature(obs["cav_0"], "lane_left") == 1.0 and _feature(obs["cav_0"], "lane_right") == 0.0
    obs, *_ = env.step({"cav_0": int(A.LANE_LEFT)})
    for _ in range(16):  # at the truck's walking pace the lane change takes a while
        obs, *_ = env.step({"cav_0": int(A.IDLE)})
    assert not env.frame.collisions
    me = env.frame.agent(env.vehicle_id("cav_0"))
    assert me.T_world_from_agent[1, 3] > 1.0  # in the westbound lane (centre y = +1.75)
    assert _feature(obs["cav_0"], "target_offset") == pytest.approx(1.0)
    assert _feature(obs["cav_0"], "lane_left") == 0.0 and _feature(obs["cav_0"], "lane_right") == 1.0
    # no oncoming lanes on the highway: a left lane change from the ramp is ignored
    merge = _env(scenario="merge", obs="oracle")
    obs, _ = merge.reset(seed=0)
    assert _feature(obs["cav_0"], "lane_left") == 0.0
    merge.step({a: int(A.LANE_LEFT) for a in merge.agents})
    assert merge._tracks["cav_0"].meta.target_offset == 0.0


def test_a_merged_vehicle_keeps_its_lane_where_the_ramp_tapers():
    world = make_world("merge", lidar="tiny")
    world.sensors_enabled = False
    world.reset(0)
    ramp = world.layout.route("ramp")
    lanes = LaneMap(world.layout, allow_oncoming=False)
    config = MetaControllerConfig()
    s = float(ramp.project(np.array([[0.0, -8.75]]))[0][0])  # on the acceleration lane
    state = update_meta_state(MetaState(20.0, 0.0, 30.0), A.LANE_LEFT, ramp, s, 20.0, lanes, config)
    assert state.target_offset == pytest.approx(3.5, abs=0.01)
    while True:
        s += 2.0
        state = update_meta_state(state, None, ramp, s, 20.0, lanes, config)
        s_ahead = s + 21.0  # the look-ahead at 20 m/s
        heading = float(ramp.heading(s_ahead))
        point = ramp.point(s_ahead) + state.target_offset * np.array([-np.sin(heading), np.cos(heading)])
        assert point[1] == pytest.approx(-5.25, abs=0.05)  # E0's centre line, through the taper
        if point[0] > 90.0:
            break
    assert state.target_offset == pytest.approx(0.0, abs=0.05)  # the ramp has become E0


def test_rear_ending_the_truck_terminates_with_the_collision_penalty():
    env = _env(scenario="overtaking", obs="oracle")
    env.reset(seed=0)
    rewards = []
    while env.agents:
        _, rew, term, trunc, info = env.step({"cav_0": int(A.FASTER)})
        rewards.append(rew["cav_0"])
    episode = info["cav_0"]["episode"]
    assert term["cav_0"] and not trunc["cav_0"]
    assert episode["collision"] == 1.0 and episode["success"] == 0.0
    assert rewards[-1] < env.config.reward.collision + 0.5
    assert episode["driving_score"] == pytest.approx(0.6 * episode["route_completion"])


def test_reaching_the_goal_is_a_success_and_time_runs_out_otherwise():
    env = _env(scenario="merge", obs="oracle", goal_m=15.0, controlled="ego")
    env.reset(seed=0)
    while env.agents:
        _, _, term, _, info = env.step({"cav_0": int(A.IDLE)})
    assert term["cav_0"] and info["cav_0"]["episode"]["success"] == 1.0
    assert info["cav_0"]["episode"]["route_completion"] == 1.0
    env = _env(scenario="merge", obs="oracle", episode_s=1.0, controlled="ego")
    env.reset(seed=0)
    steps = 0
    while env.agents:
        _, _, term, trunc, info = env.step({"cav_0": int(A.SLOWER)})
        steps += 1
    assert trunc["cav_0"] and not term["cav_0"] and info["cav_0"]["episode"]["timeout"] == 1.0
    assert steps == 5  # 1 s at 2 ticks of 0.1 s per decision


def test_intents_travel_over_v2x_into_the_neighbours_observations():
    env = _env(scenario="merge", obs="oracle", intent=True)
    obs, _ = env.reset(seed=0)
    assert env.bytes_sent == 0
    obs, *_ = env.step({a: int(A.IDLE) for a in env.agents})
    assert env.bytes_sent > 0
    width = len(OBJECT_FEATURES) + len(INTENT_FEATURES)
    objects = obs["cav_0"][len(EGO_FEATURES) :].reshape(8, width)
    has_intent = objects[:, len(OBJECT_FEATURES)]
    assert has_intent.sum() >= 1  # the other connected vehicles' plans
    row = objects[np.argmax(has_intent)]
    # the planned position 0.5 s ahead lies ahead of the vehicle's current position
    # (both relative to the agent; vehicles drive east)
    assert row[len(OBJECT_FEATURES) + 1] > row[1]


def test_safety_supervisor_prevents_rear_ending_the_truck():
    outcomes = {}
    for safety in (False, True):
        env = _env(scenario="overtaking", obs="visible", safety=safety, episode_s=4.0)
        env.reset(seed=0)
        overrides = 0
        while env.agents:
            _, _, _, _, info = env.step({"cav_0": int(A.FASTER)})
            overrides += int(info["cav_0"]["safety_override"])
        outcomes[safety] = (info["cav_0"]["episode"]["collision"], overrides)
    assert outcomes[False] == (1.0, 0)
    assert outcomes[True][0] == 0.0 and outcomes[True][1] > 0


def test_planned_trajectories_follow_the_lane_at_the_target_speed():
    world = make_world("overtaking", lidar="tiny")
    world.sensors_enabled = False
    world.reset(0)
    route = world.layout.route("E")  # straight, y = -1.75, heading east
    lanes = LaneMap(world.layout, allow_oncoming=True)
    config = MetaControllerConfig()
    s = 100.0
    x, y = route.point(s)
    now = MetaState(target_speed=10.0, target_offset=0.0, max_speed=13.9)
    states = [
        update_meta_state(now, a, route, s, 10.0, lanes, config) for a in (A.IDLE, A.SLOWER, A.LANE_LEFT)
    ]
    plans = plan_meta_trajectory(states, route, s, x, y, 0.0, 10.0, 2.76, 0.1, 15, config)
    assert plans.shape == (3, 15, 4)
    idle, slower, left = plans
    assert np.allclose(idle[:, 3], 10.0) and np.allclose(idle[:, 1], -1.75, atol=1e-6)
    assert np.allclose(np.diff(idle[:, 0]), 1.0, atol=1e-6)  # 10 m/s x 0.1 s
    assert np.all(np.diff(slower[:, 3]) < 0) and slower[-1, 0] < idle[-1, 0]
    assert left[-1, 1] > -1.0 and np.all(np.diff(left[:, 1]) > -1e-9)  # moving into the oncoming lane


def test_world_queries_for_planners():
    world = make_world("overtaking", lidar="tiny")
    with pytest.raises(RuntimeError, match="reset"):
        world.route_of(0)
    frame = world.reset(2)
    assert world.route_of(frame.ego_id).name == "E"
    parked = [a.id for a in frame.agents if a.role.value == "parked"]
    if parked:
        with pytest.raises(ValueError, match="parked"):
            world.route_of(parked[0])
    with pytest.raises(ValueError, match="no agent"):
        world.route_of(10_000)
    assert world.static_geometry().num_triangles > 0
    assert world.signal_state(0, 0.0) in ("green", "yellow", "red")


@pytest.mark.parametrize("scenario", ["red_light", "left_turn"])
def test_no_fixed_timing_succeeds_on_every_seed(scenario):
    """Braking for a fixed time and then driving at full speed: going at once meets an early
    hidden vehicle on some seeds, a short wait meets a late one, a long wait runs out of time
    (or, in the left turn, meets the second oncoming car)."""
    env = _env(scenario=scenario, obs="oracle")
    step_s = env.dt * env.config.decision_ticks
    long_wait_s = {"red_light": 1.6, "left_turn": 2.8}[scenario]
    for delay_s in (0.0, 0.6, long_wait_s):
        outcomes = []
        for seed in range(8):  # the first held-out seeds, as bench/scripted_policies.py plays
            env.reset(seed=EVAL_SEED_OFFSET + seed)
            t = 0.0
            while env.agents:
                action = A.SLOWER if t < delay_s - 1e-9 else A.FASTER
                _, _, _, _, info = env.step({"cav_0": int(action)})
                t += step_s
            outcomes.append(info["cav_0"]["episode"])
        successes = sum(e["success"] for e in outcomes)
        if delay_s < 1.0:
            assert 0 < successes < len(outcomes), (delay_s, outcomes)
            assert all(e["success"] or e["collision"] for e in outcomes)
        else:
            assert successes == 0, outcomes
            if scenario == "red_light":
                assert any(e["timeout"] for e in outcomes), outcomes


def _run_bench(script: str, *args: str):
    """Run ``bench/<script>`` with ``args`` from the repository root; the CompletedProcess."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, str(root / "bench" / script), *args], cwd=root, capture_output=True, text=True, timeout=300
    )


def test_scripted_policies_bench_runs_and_the_informed_policy_succeeds(tmp_path):
    """bench/scripted_policies.py end to end on two held-out red_light seeds."""
    import json

    out = tmp_path / "scripted.json"
    args = ["--scenarios", "red_light", "--episodes", "2", "--delays", "0", "--json", str(out)]
    result = _run_bench("scripted_policies.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| red_light | informed visible | 2 |" in result.stdout
    rows = {r["policy"]: r for r in json.loads(out.read_text())}
    informed = {f"informed {m}" for m in ("ego_only", "visible", "oracle")}
    rules = {f"feature rule {m}" for m in ("ego_only", "visible", "oracle")}
    holds = {f"hold d={d:g}s, informed ego_only" for d in (0.4, 0.8, 1.2)}
    brakes = {f"brake d={d:g}s, informed ego_only" for d in (0.8, 1.2, 1.6, 2.0)}
    creeps = {f"creep v<={v:g}, d={d:g}s, informed ego_only" for v, d in ((1, 3), (1, 4), (3, 3), (3, 4))}
    assert set(rows) == {"stop", "blind d=0s"} | informed | holds | brakes | creeps | rules
    assert rows["informed visible"]["success"] == 1.0
    assert rows["feature rule visible"]["success"] == 1.0
    assert rows["stop"]["timeout"] == 1.0
    # braking for 2 s of red_light's 5.4 s leaves too little time to reach the goal
    assert rows["brake d=2s, informed ego_only"]["timeout"] == 1.0
    # under the default reward succeeding out-earns waiting out the clock
    assert rows["informed visible"]["mean_return"] > rows["stop"]["mean_return"] + 1.0
    for r in rows.values():
        assert r["success"] + r["collision"] + r["timeout"] == pytest.approx(1.0)
        # success times are there exactly when something succeeded, within red_light's 5.4 s
        if r["success"] > 0:
            assert 0.0 < r["success_time_s"] <= r["success_time_max_s"] <= 5.4 + 1e-6
        else:
            assert r["success_time_s"] is None and r["success_time_max_s"] is None


def test_longitudinal_action_set_maps_to_idle_faster_slower():
    env = _env(scenario="red_light", obs="oracle", lateral_actions=False)
    assert env.action_space("cav_0").n == 3
    assert env.meta_actions == (A.IDLE, A.FASTER, A.SLOWER)
    obs, _ = env.reset(seed=1)
    target = _feature(obs["cav_0"], "target_speed")
    obs, *_ = env.step({"cav_0": 1})  # FASTER
    assert _feature(obs["cav_0"], "target_speed") > target
    obs, *_ = env.step({"cav_0": 2})  # SLOWER
    obs, *_ = env.step({"cav_0": 2})
    assert _feature(obs["cav_0"], "target_speed") < target
    assert _feature(obs["cav_0"], "target_offset") == 0.0  # no index changes lanes
    with pytest.raises(ValueError, match=r"outside Discrete\(3\)"):
        env.step({"cav_0": 3})
    with pytest.raises(ValueError, match="safety needs lateral_actions"):
        EnvConfig(scenario="merge", safety=True, lateral_actions=False).validate()


def test_a_new_time_limit_applies_from_the_next_episode():
    env = _env(scenario="red_light", obs="oracle", episode_s=1.0)
    env.reset(seed=0)
    env.set_time_limit(2.0)
    steps = 0
    while env.agents:  # this episode keeps its 1 s
        env.step({"cav_0": int(A.SLOWER)})
        steps += 1
    assert steps == 5
    obs, _ = env.reset(seed=0)
    assert _feature(obs["cav_0"], "time_left") == 1.0
    obs, *_ = env.step({"cav_0": int(A.SLOWER)})
    assert _feature(obs["cav_0"], "time_left") == pytest.approx(0.9)  # 0.2 s of 2 s
    with pytest.raises(ValueError, match="episode_s must be > 0"):
        env.set_time_limit(0.0)


def test_task_time_limits_bench_counts_every_agent_episode_within_the_limit():
    """bench/task_time_limits.py end to end on two held-out red_light seeds (one agent each)."""
    result = _run_bench("task_time_limits.py", "--scenario", "red_light", "--episodes", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| always")]
    assert [r[0].strip() for r in rows] == [
        "always FASTER", "always FASTER + safety", "always IDLE", "always IDLE + safety"
    ]
    limit = SCENARIO_TASKS["red_light"].episode_s
    for name, success, collision, timeout, times in rows:
        assert int(success) + int(collision) + int(timeout) == 2, name
        if int(success):
            slowest = float(times.split("/")[-1])
            assert 0 < slowest <= limit + 1e-9, name


def test_env_bench_interleaves_rounds_and_prints_every_configuration():
    """bench/env_bench.py end to end at a tiny size: medians over two interleaved rounds."""
    import re

    result = _run_bench("env_bench.py", "--steps", "5", "--highway-steps", "5", "--rounds", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "highway-env merge-v0:" in result.stdout and "median of 2 rounds" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("CoopDrivingEnv merge")]
    assert [re.search(r"obs=(\w+), (\d) tick", line).groups() for line in lines] == [
        ("visible", "1"), ("visible", "2"), ("oracle", "1")
    ]
    for line in lines:
        low, high = map(float, re.search(r"\(rounds ([\d.]+)-([\d.]+)\)", line).groups())
        median = float(re.search(r"ratio to highway-env: ([\d.]+)x per step", line).group(1))
        assert 0 < low <= median <= high
    bad = _run_bench("env_bench.py", "--rounds", "0")
    assert bad.returncode == 2 and "--rounds" in bad.stderr


def test_exploring_starts_begin_episodes_partway_in_after_faster_decisions():
    """``exploring_starts=K``: each reset drives 0..K FASTER decisions before handing over
    (seeded: the same seed gives the same start), the ego is then further along and faster than at
    the scenario's own start, the API holds, and evaluation configs turn it off."""
    from dataclasses import replace

    from models.planning.experiment import PlannerConfig, env_config_for_eval

    def ego_state(env):
        return next(a for a in env.frame.agents if a.id == env.vehicle_id("cav_0"))

    base = EnvConfig(scenario="red_light", controlled="ego", lateral_actions=False, conflict_features=True)
    plain = CoopDrivingEnv(base, seed=0)
    explored = CoopDrivingEnv(replace(base, exploring_starts=5), seed=0)
    decision_s = 0.1 * base.decision_ticks
    starts = []
    for seed in range(8):
        plain.reset(seed=seed)
        obs, infos = explored.reset(seed=seed)
        t = explored.frame.time_s
        k = round(t / decision_s)
        assert k * decision_s == pytest.approx(t) and 0 <= k <= 5
        starts.append(k)
        assert set(obs) == set(infos) == {"cav_0"} and explored.agents == ["cav_0"]
        if k:
            assert explored.vehicle_id("cav_0") == plain.vehicle_id("cav_0")
            before, after = ego_state(plain), ego_state(explored)
            assert np.linalg.norm(after.T_world_from_agent[:2, 3] - before.T_world_from_agent[:2, 3]) > 1.0
            assert after.speed > before.speed  # FASTER from the scenario's start speed
        explored.reset(seed=seed)
        assert explored.frame.time_s == pytest.approx(t)  # the same seed, the same start
    assert len(set(starts)) >= 3
    parallel_api_test(CoopDrivingEnv(replace(base, exploring_starts=3), seed=1), num_cycles=30)
    config = PlannerConfig(env=replace(base, exploring_starts=5))
    assert env_config_for_eval(config, None, None).exploring_starts == 0
    with pytest.raises(ValueError, match="exploring_starts"):
        replace(base, exploring_starts=-1).validate()
    with pytest.raises(ValueError, match="exploring_starts needs discrete"):
        replace(base, exploring_starts=2, action="continuous").validate()
