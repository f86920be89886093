"""CarlaWorld over the recorded stand-in of the carla module (no CARLA server runs here), plus the
real client against a port where nothing listens.

Covers the shared World suite, the scenarios' meaning on the stand-in town, what the bridge asks
of the server (synchronous settings, Traffic Manager, LiDAR attributes), ground truth against the
stand-in's own state, and the failures CARLA users meet: version mismatch, a missed tick or
measurement, spawn failures, an exception or Ctrl-C in the middle of a run, no server at all.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import carla_standin as cs
import numpy as np
import pytest
import world_suite

from datasets.native import list_cavs, list_frames, read_agent_frame, read_manifest
from sim.carla_world import (
    CarlaCleanupError,
    CarlaConnectionError,
    CarlaSpawnError,
    CarlaTimeoutError,
    CarlaVersionError,
    CarlaWorld,
    lidar_attributes,
)
from sim.geometry import invert_T
from sim.scenarios import SCENARIOS, ScenarioParams
from sim.types import Role, VehicleControl

ROOT = Path(__file__).resolve().parents[2]
ORIGINAL_SETTINGS = (False, None, False)  # the stand-in server's settings before any client


@pytest.fixture(autouse=True)
def fresh_servers():
    cs.standin_reset()
    yield
    cs.standin_reset()


def _make(scenario: str = "overtaking", **kw) -> CarlaWorld:
    kw.setdefault("params", ScenarioParams(traffic_density=0.5))
    kw.setdefault("lidar", "tiny")
    kw.setdefault("timeout_s", 1.0)
    return CarlaWorld(scenario, carla_module=cs, **kw)


def _assert_restored(server, port: int = 8000) -> None:
    assert server.settings == ORIGINAL_SETTINGS
    assert server.tm_synchronous(port) is False
    assert server.live_actor_ids() == [], "actors left behind on the server"


# --------------------------------------------------------------------------------------------------
# the World suite
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_world_suite_reset(scenario):
    world = _make(scenario)
    world_suite.check_reset_frame(world)
    world.close()


def test_world_suite_step():
    with _make() as world:
        world_suite.check_step_advances_time(world)


@pytest.mark.parametrize("scenario", ["overtaking", "red_light"])
def test_world_suite_deterministic(scenario):
    world_suite.check_deterministic(_make, scenario)


def test_world_suite_actions():
    with _make() as world:
        world_suite.check_ego_obeys_actions(world)


def test_world_suite_bad_use():
    with _make("red_light") as world:
        with pytest.raises(RuntimeError, match="reset"):
            world.step()
        world_suite.check_rejects_bad_use(world)
        world.step()  # a rejected action leaves the world usable


# --------------------------------------------------------------------------------------------------
# what the server is asked for, and ground truth
# --------------------------------------------------------------------------------------------------


def test_synchronous_settings_traffic_manager_and_lidar_attributes():
    server = cs.standin_server()
    world = _make("merge", dt=0.05, tm_port=8123)
    assert server.settings == (True, 0.05, False)
    assert server.tm_synchronous(8123) is True
    frame = world.reset(7)
    assert ("tm.set_random_device_seed", 7) in server.calls
    # one LiDAR per connected vehicle, rotating once per tick, with the same points per sweep
    assert world.lidar.rotation_frequency == pytest.approx(20.0)
    assert world.lidar.points_per_second / 20.0 == pytest.approx(16 * 256)
    sensors = [server.actors[i] for i in server.live_actor_ids("sensor")]
    assert len(sensors) == len(frame.connected_ids) >= 3
    expected = lidar_attributes(world.lidar)
    for sensor in sensors:
        assert {k: sensor.attributes[k] for k in expected} == expected
    world.step()
    world.close()
    _assert_restored(server, 8123)
    world.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        world.reset(0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dt"):
        _make(dt=0.2)
    with pytest.raises(ValueError, match="valid scenarios"):
        _make("roundabout")
    assert cs.standin_server().calls == [], "bad arguments must be rejected before connecting"


def test_boxes_velocities_and_point_labels_agree_with_the_servers_truth():
    server = cs.standin_server()
    with _make("overtaking", lidar="vlp16") as world:
        world.reset(2)
        for _ in range(3):
            frame = world.step()
        truth = server.true_boxes()
        # every agent's box is the server's box (bounding boxes are off-centre in x and y there)
        actor_of = {}
        for agent in frame.agents:
            match = min(truth, key=lambda i: np.linalg.norm(truth[i][:2] - agent.box[:2]))
            assert np.allclose(agent.box, truth[match], atol=1e-6), (agent.box, truth[match])
            actor_of[agent.id] = match
            # velocity points along the heading (y mirrored correctly), no sideways component
            heading = np.array([np.cos(agent.yaw), np.sin(agent.yaw)])
            assert agent.velocity[:2] @ heading == pytest.approx(agent.speed, abs=1e-6)
        # per-point instance ids against the ids the stand-in's ray caster actually hit
        checked = 0
        for sensor_id in server.live_actor_ids("sensor"):
            agent_id = next(a for a, actor in actor_of.items() if actor == server.parent_of(sensor_id))
            scan = frame.scans[agent_id]
            true_ids = server.lidar_truth(sensor_id)
            ours = np.array([actor_of.get(i, -2) if i >= 0 else -1 for i in scan.instance_id])
            on_vehicles = true_ids >= 0
            assert on_vehicles.sum() > 50
            assert np.mean(ours[ours >= 0] == true_ids[ours >= 0]) > 0.995  # labelled points are right
            # vehicle points left unlabelled are only those in the lowest 5 cm of their box, which
            # the bridge leaves out on purpose (on a real server: ground returns around the wheels)
            missed = on_vehicles & (ours != true_ids)
            points_world = scan.points[missed, :3].astype(np.float64) @ scan.T_world_from_sensor[:3, :3].T
            points_world += scan.T_world_from_sensor[:3, 3]
            assert np.all(points_world[:, 2] < 0.05 + 1e-3), points_world[:, 2].max()
            assert missed.sum() < 0.1 * on_vehicles.sum()
            # the sensor sits on the roof of its vehicle, mount_z above the box's top
            agent = frame.agent(agent_id)
            T_agent_from_sensor = invert_T(agent.T_world_from_agent) @ scan.T_world_from_sensor
            mount = world.lidar
            assert np.allclose(T_agent_from_sensor[:3, 3], [mount.mount_x, mount.mount_y, agent.extent[2] + mount.mount_z])
            assert np.allclose(T_agent_from_sensor[:3, :3], np.eye(3), atol=1e-9)
            checked += 1
        assert checked == len(frame.connected_ids)
        assert set(frame.traffic_lights.values()) <= {"red", "yellow", "green"} and len(frame.traffic_lights) == 4


@pytest.mark.parametrize("scenario", ["overtaking", "left_turn", "red_light", "merge"])
def test_hidden_danger_is_invisible_to_ego_and_seen_by_another_cav(scenario):
    with _make(scenario, lidar="vlp16") as world:
        for seed in (0, 1):
            frame = world.reset(seed)
            assert frame.hidden_agent_ids
            index = {a.id: i for i, a in enumerate(frame.agents)}
            for hidden in frame.hidden_agent_ids:
                counts = {cav: int(c[index[hidden]]) for cav, c in frame.points_in_box.items()}
                assert counts[frame.ego_id] == 0, counts
                assert max(v for k, v in counts.items() if k != frame.ego_id) > 0, counts


def test_red_light_runner_ignores_lights_and_the_queue_is_held():
    server = cs.standin_server()
    with _make("red_light", params=ScenarioParams(traffic_density=0.0)) as world:
        frame = world.reset(0)
        runner = frame.hidden_agent_ids[0]
        queue = [a.id for a in frame.agents if a.kind.value in ("van", "truck", "bus")]
        assert len(queue) == 3
        start = {a.id: a.T_world_from_agent[:2, 3].copy() for a in frame.agents}
        for _ in range(10):
            frame = world.step()
        assert all(np.linalg.norm(frame.agent(q).T_world_from_agent[:2, 3] - start[q]) < 0.5 for q in queue)
        assert np.linalg.norm(frame.agent(runner).T_world_from_agent[:2, 3] - start[runner]) > 8.0
        tm = server.tms[8000]
        assert tm.ignore_lights and max(tm.ignore_lights.values()) == 100.0


def test_cav_count_is_respected_and_too_many_is_a_clear_error():
    with _make("random_traffic", params=ScenarioParams(cavs=4, traffic_density=1.0)) as world:
        assert len(world.reset(0).connected_ids) == 4
    server = cs.standin_server()
    with pytest.raises(ValueError, match="traffic_density"):
        _make("overtaking", params=ScenarioParams(cavs=30, traffic_density=0.0)).reset(0)
    _assert_restored(server)


# --------------------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------------------


def test_version_mismatch_is_a_clear_error_and_changes_nothing():
    server = cs.standin_server()
    server.faults.server_version = "0.9.15"
    with pytest.raises(CarlaVersionError, match=r"0\.9\.16.*0\.9\.15"):
        _make()
    assert [c for c in server.calls if c[0] == "apply_settings"] == []
    assert server.settings == ORIGINAL_SETTINGS


def test_missed_tick_is_a_clear_timeout_and_restores_settings():
    server = cs.standin_server()
    world = _make()
    world.reset(0)
    world.step()
    server.faults.fail_tick_in = 1
    with pytest.raises(CarlaTimeoutError, match=r"did not complete tick 2 .*restored") as info:
        world.step()
    assert "time-out" in str(info.value.__cause__)
    _assert_restored(server)
    with pytest.raises(RuntimeError, match="closed"):
        world.step()


def test_dropped_measurement_times_out_within_the_timeout_and_restores_settings():
    server = cs.standin_server()
    world = _make(timeout_s=0.5)
    world.reset(0)
    server.faults.drop_lidar_in = 1
    started = time.monotonic()
    with pytest.raises(CarlaTimeoutError, match="no LiDAR measurement of frame"):
        world.step()
    assert 0.5 <= time.monotonic() - started < 2.0
    _assert_restored(server)


def test_stale_measurements_are_skipped_by_frame_number():
    frames = []
    for stale in (False, True):
        cs.standin_reset()
        cs.standin_server().faults.stale_lidar = stale
        with _make() as world:
            world.reset(4)
            frames.append([world.step() for _ in range(3)][-1])
    a, b = frames
    for agent_id in a.scans:
        assert a.scans[agent_id].points.tobytes() == b.scans[agent_id].points.tobytes()


def test_spawn_failures_are_retried_elsewhere():
    server = cs.standin_server()
    server.faults.spawn_failures = 3  # the ego, the witness and the truck fail once
    with _make() as world:
        frame = world.reset(0)
        assert [c for c in server.calls if c[0] == "spawn_failed"] != []
        assert frame.agent(frame.ego_id).connected and frame.hidden_agent_ids
        assert len(server.live_actor_ids("vehicle")) == len(frame.agents)


def test_spawn_that_keeps_failing_is_a_clear_error_and_leaks_nothing():
    server = cs.standin_server()
    server.faults.spawn_failures = 10**6
    with pytest.raises(CarlaSpawnError, match=r"ego .*collision at spawn position"):
        _make(spawn_retries=2).reset(0)
    spawn_attempts = [c for c in server.calls if c[0] == "spawn_failed"]
    assert len(spawn_attempts) >= 3 * 4  # every scenario vehicle tried 1 + 2 times
    _assert_restored(server)


def test_exception_in_user_code_cleans_up():
    server = cs.standin_server()
    with pytest.raises(ZeroDivisionError):
        with _make() as world:
            world.reset(0)
            world.step({0: VehicleControl(acceleration=1.0)})
            assert server.live_actor_ids() != []
            _ = 1 / 0
    _assert_restored(server)


def test_ctrl_c_during_a_tick_cleans_up(monkeypatch):
    server = cs.standin_server()
    world = _make()
    world.reset(0)

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "tick", interrupted)
    with pytest.raises(KeyboardInterrupt):
        world.step()
    _assert_restored(server)


def test_cleanup_attempts_every_step_when_one_fails(monkeypatch):
    server = cs.standin_server()
    world = _make()
    world.reset(0)

    def broken(self, settings, seconds=0.0):
        raise RuntimeError("server refused the settings")

    monkeypatch.setattr(cs.World, "apply_settings", broken)
    with pytest.raises(CarlaCleanupError, match="refused"):
        world.close()
    assert server.live_actor_ids() == [] and server.tm_synchronous() is False


def test_no_server_listening_with_the_real_client():
    import carla

    with socket.socket() as s:  # a local port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(CarlaConnectionError, match=rf"127\.0\.0\.1:{port}.*time-out"):
        CarlaWorld("overtaking", host="127.0.0.1", port=port, timeout_s=1.0, carla_module=carla)
    assert time.monotonic() - started < 1.0 + 1.5


# --------------------------------------------------------------------------------------------------
# tools/generate.py --backend carla
# --------------------------------------------------------------------------------------------------


def test_generate_with_the_carla_backend_writes_the_native_layout(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    runs = {}
    for backend in ("carla", "embedded"):
        out = tmp_path / backend
        args = ["--scenario", "merge", "--frames", "2", "--seed", "1", "--out", str(out), "--lidar", "tiny",
                "--backend", backend]
        if backend == "carla":
            args += ["--host", "127.0.0.1", "--port", "2017", "--timeout", "2", "--carla-module", "carla_standin"]
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        runs[backend] = out / "train" / "merge_s000001"
    layouts = {}
    for backend, run in runs.items():
        cavs = list_cavs(run)
        assert len(cavs) >= 3 and list_frames(run, cavs) == [0, 1]
        manifest = read_manifest(run)
        assert manifest.scenario == "merge" and manifest.counts.frames_written == 2 and manifest.cavs == cavs
        frame = read_agent_frame(run / str(cavs[0]) / "000001.yaml")
        assert len(frame.points) > 100 and len(frame.boxes_world) > 0
        layouts[backend] = sorted(p.name for p in (run / str(cavs[0])).iterdir())
    assert layouts["carla"] == layouts["embedded"]
    # an unreachable server is a clear error, not a hang
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--scenario", "merge", "--frames", "1", "--out",
         str(tmp_path / "x"), "--backend", "carla", "--carla-module", "carla_nonexistent"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "carla_nonexistent" in done.stderr


def test_initial_speeds_point_along_the_lane():
    server = cs.standin_server()
    with _make("red_light") as world:  # the ego and the runner drive at right angles
        frame = world.reset(0)
        pushes = [c[1] for c in server.calls if c[0] == "set_target_velocity"]
        assert len(pushes) >= 2  # the ego and the runner start moving
        for _, forward, sideways in pushes:
            assert forward > 1.0 and abs(sideways) < 1e-6 * forward
        hidden = frame.agent(frame.hidden_agent_ids[0])
        assert hidden.speed > 5.0


def test_roles_come_from_the_scenario():
    with _make("left_turn") as world:
        frame = world.reset(3)
        roles = {a.id: a.role for a in frame.agents}
        assert roles[frame.ego_id] is Role.CONNECTED
        assert all(roles[h] is Role.HUMAN for h in frame.hidden_agent_ids)
