"""The ``perception`` observation source (sim/env_perception.py): a trained cooperative perception
checkpoint in the driving env's loop. Observations from detections, bytes of the model's
messages, the detection tracker's velocities, clear errors, and one real closed-loop evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sim.env import OBJECT_FEATURES, CoopDrivingEnv, EnvConfig
from sim.env_obs import PerceptionObsConfig
from sim.env_perception import DetectionTracker

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "perception" / "tiny.yaml"
SEED = 3


def _tool_fixtures():
    """The tool tests' helpers (tests/tools is not a package: imported by path, like there)."""
    sys.path.insert(0, str(ROOT / "tests" / "tools"))
    try:
        import dataset_fixtures
        import planner_fixtures
    finally:
        sys.path.pop(0)
    return dataset_fixtures, planner_fixtures


@pytest.fixture(scope="module")
def perception_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step tiny AttFuse run trained on two generated frames (tiny LiDAR, recorded in the
    data's manifests, which the source reads back). Its decoding threshold is 0, so that the
    barely trained head still returns boxes (as bench/perception_latency.py does for untrained
    models)."""
    root = tmp_path_factory.mktemp("perception_data")
    _tool_fixtures()[0].generate_tiny(root, seed=1)
    threads = torch.get_num_threads()
    args = ["--config", str(TINY), f"data.root={root}", "train.max_steps=1"]
    args += ["model.detection.score_threshold=0.0", "--out", str(root / "runs")]
    assert _tool_fixtures()[0].load_tool("train").main(args) == 0
    torch.set_num_threads(threads)
    return root / "runs" / "tiny"


def _config(run: Path, **perception) -> EnvConfig:
    return EnvConfig(
        scenario="red_light",
        obs="perception",
        controlled="ego",
        lateral_actions=False,
        conflict_features=True,
        perception=PerceptionObsConfig(checkpoint=str(run), **perception),
    )


def _objects(env: CoopDrivingEnv, obs: np.ndarray) -> np.ndarray:
    return obs[env.ego_dim :].reshape(env.config.k_nearest, env.object_dim)


def test_observations_come_from_the_detections(perception_run):
    # threshold 0: the barely trained model keeps every decoded box, none of them on a vehicle
    env = CoopDrivingEnv(_config(perception_run, score_threshold=0.0), seed=0)
    agent = env.possible_agents[0]
    obs, _ = env.reset(seed=SEED)
    assert env.source.lidar.channels == 16 and env.source.lidar.columns == 256  # the data's tiny LiDAR
    assert env.observation_space(agent).contains(obs[agent])
    assert env.bytes_sent > 0  # the connected witness sends compressed BEV cells to the ego
    sent = [env.bytes_sent]
    for _ in range(3):
        obs, _, _, _, _ = env.step({agent: 0})
        assert env.observation_space(agent).contains(obs[agent])
        sent.append(env.bytes_sent)
    assert np.all(np.diff(sent) > 0)

    # the object rows are the nearest detections, relative to the ego
    frame, vid = env.frame, env.vehicle_id(agent)
    me = frame.agent(vid)
    estimates = env.source.estimates(vid)
    assert len(estimates) > 0 and estimates.velocities.shape == (len(estimates), 2)
    c, s = np.cos(me.yaw), np.sin(me.yaw)
    rel = estimates.boxes[:, :2] - me.T_world_from_agent[:2, 3]
    x, y = c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]
    nearest = np.argsort(np.hypot(x, y), kind="stable")[: env.config.k_nearest]
    rows = _objects(env, obs[agent])
    present = rows[:, OBJECT_FEATURES.index("present")] == 1.0
    assert present.sum() == len(nearest)
    rng = env.config.obs_range_m
    np.testing.assert_allclose(rows[present, 1] * rng, x[nearest], atol=1e-3)
    np.testing.assert_allclose(rows[present, 2] * rng, y[nearest], atol=1e-3)
    # ... which are not where the vehicles are
    others = frame.boxes_world[frame.agent_ids != vid]
    gap = np.linalg.norm(estimates.boxes[nearest, None, :2] - others[None, :, :2], axis=-1).min(axis=1)
    assert np.all(gap > 0.05)

    # the critic's state stays ground truth: the oracle env's at the same seed and actions
    oracle = CoopDrivingEnv(replace(env.config, obs="oracle"), seed=0)
    oracle.reset(seed=SEED)
    for _ in range(3):
        oracle.step({agent: 0})
    np.testing.assert_array_equal(env.state(), oracle.state())
    env.close()
    oracle.close()


def test_a_model_that_detects_nothing_shows_no_vehicles(perception_run):
    env = CoopDrivingEnv(_config(perception_run, score_threshold=1.0), seed=0)
    agent = env.possible_agents[0]
    obs, _ = env.reset(seed=SEED)
    for _ in range(2):
        rows = _objects(env, obs[agent])
        assert not rows[:, OBJECT_FEATURES.index("present")].any()
        assert env.known_ids(agent) == []
        obs, _, _, _, _ = env.step({agent: 0})
    # the oracle sees vehicles there, and the conflict features still drive the conflict reward
    oracle = CoopDrivingEnv(replace(env.config, obs="oracle"), seed=0)
    obs_oracle, _ = oracle.reset(seed=SEED)
    assert _objects(oracle, obs_oracle[agent])[:, 0].any()
    env.close()
    oracle.close()


def test_tracker_velocity_on_a_hand_made_sequence():
    tracker = DetectionTracker(gate_m=2.0, smoothing=0.5)
    dt = 0.2
    jitter = np.array([[0.0, 0.0], [0.1, 0.0], [-0.1, 0.0], [0.1, 0.0], [0.0, 0.0]])  # parked car, m
    velocities = []
    for k in range(5):
        moving = np.array([10.0 * k * dt, 0.0])  # 10 m/s along x
        parked = np.array([5.0, 20.0]) + jitter[k]
        detections = np.stack([parked, moving]) if k % 2 else np.stack([moving, parked])  # any order
        v = tracker.update(k * dt, detections)
        velocities.append(v if k % 2 == 0 else v[::-1])  # rows: moving, parked
    velocities = np.array(velocities)  # (5, 2, 2)
    np.testing.assert_array_equal(velocities[0], 0.0)  # seen once: no velocity yet
    np.testing.assert_allclose(velocities[1:, 0], [[10.0, 0.0]] * 4, atol=1e-9)  # exact differences
    # the parked car: first difference 0.5 m/s, then halfway towards each new difference
    diffs = np.diff(jitter[:, 0]) / dt  # 0.5, -1, 1, -0.5
    expected = [diffs[0]]
    for d in diffs[1:]:
        expected.append(0.5 * d + 0.5 * expected[-1])
    np.testing.assert_allclose(velocities[1:, 1, 0], expected, atol=1e-9)
    assert len(tracker.tracks) == 2

    # a detection far from both tracks starts a third at rest; tracks not seen for long are dropped
    v = tracker.update(5 * dt, np.array([[10.0, 0.0], [5.0, 20.0], [-30.0, 0.0]]))
    np.testing.assert_allclose(v[0], [10.0, 0.0], atol=1e-9)
    np.testing.assert_array_equal(v[2], 0.0)
    assert len(tracker.tracks) == 3
    tracker.update(5 * dt + 1.0, np.zeros((0, 2)))
    assert tracker.tracks == []


def test_missing_or_unloadable_checkpoints_are_clear_errors(perception_run, tmp_path):
    with pytest.raises(ValueError, match=r"obs=perception needs perception\.checkpoint"):
        CoopDrivingEnv(EnvConfig(scenario="red_light", obs="perception"), seed=0)
    with pytest.raises(ValueError, match=r"no checkpoint\.pt and config\.yaml"):
        CoopDrivingEnv(_config(tmp_path / "nowhere"), seed=0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((perception_run / "config.yaml").read_text())
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load its weights"):
        CoopDrivingEnv(_config(broken), seed=0)
    with pytest.raises(ValueError, match="no LiDAR preset"):
        CoopDrivingEnv(_config(perception_run, lidar="hdl32"), seed=0)
    # without its training data the source cannot tell the LiDAR: it says which flag gives it
    moved = tmp_path / "moved"
    moved.mkdir()
    text = (perception_run / "config.yaml").read_text()
    data_root = str(perception_run.parents[1])
    assert data_root in text
    (moved / "config.yaml").write_text(text.replace(data_root, str(tmp_path / "gone")))
    (moved / "checkpoint.pt").write_bytes((perception_run / "checkpoint.pt").read_bytes())
    with pytest.raises(ValueError, match="--perception-lidar"):
        CoopDrivingEnv(_config(moved), seed=0)
    env = CoopDrivingEnv(_config(moved / "checkpoint.pt", lidar="tiny"), seed=0)  # the file works too
    env.close()


def test_eval_closed_loop_with_perception(perception_run, tmp_path):
    (tmp_path / "planner").mkdir()
    planner = _tool_fixtures()[1].untrained_red_light_checkpoint(tmp_path / "planner")
    out = tmp_path / "eval"
    args = ["--checkpoint", str(planner), "--episodes", "1", "--obs", "perception", "--out", str(out)]
    args += ["--perception-checkpoint", str(perception_run)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "eval_closed_loop.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["obs"] == "perception" and len(report["episodes"]) == 1
    overall = report["overall"]
    assert overall["success_rate"] + overall["collision_rate"] + overall["timeout_rate"] == pytest.approx(1.0)
    assert overall["bytes_per_second"] > 0  # the model's messages
