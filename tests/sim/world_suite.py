"""Backend-independent checks of the :class:`sim.types.World` protocol.

Every backend (embedded, CARLA through its stand-in) runs these through its own test module by
passing a factory ``make(scenario) -> World``.
"""

from __future__ import annotations

import numpy as np

from sim.geometry import invert_T, transform_points
from sim.types import SceneFrame, VehicleControl, World


def check_reset_frame(world: World, seed: int = 0) -> SceneFrame:
    assert isinstance(world, World)
    frame = world.reset(seed)
    frame.validate()
    assert frame.frame == 0 and frame.time_s == 0.0
    ego = frame.agent(frame.ego_id)
    assert ego.connected
    assert set(frame.scans) == set(frame.connected_ids)
    ids = set(frame.agent_ids.tolist())
    for agent_id, scan in frame.scans.items():
        assert len(scan.points) > 100, f"agent {agent_id} sees almost nothing"
        assert np.isfinite(scan.points).all()
        rng = np.linalg.norm(scan.points[:, :3], axis=1)
        assert rng.max() <= scan.config.range + 1e-3
        hit = scan.instance_id[scan.instance_id >= 0]
        assert set(hit.tolist()) <= ids, "points hit unknown actors"
        assert agent_id not in set(hit.tolist()), "a LiDAR sees its own vehicle"
        # the sensor sits on its vehicle's roof
        T_agent_from_sensor = invert_T(frame.agent(agent_id).T_world_from_agent) @ scan.T_world_from_sensor
        assert abs(T_agent_from_sensor[0, 3]) < 2.0 and T_agent_from_sensor[2, 3] > 1.0
        # points on an actor lie inside (or on) that actor's box
        box_of = {a.id: a.box for a in frame.agents}
        world_pts = transform_points(scan.T_world_from_sensor, scan.points[:, :3].astype(np.float64))
        for actor in list(set(hit.tolist()))[:5]:
            pts = world_pts[scan.instance_id == actor]
            box = box_of[actor]
            local = transform_points(invert_T(frame.agent(actor).T_world_from_agent), pts)
            assert np.all(np.abs(local[:, 0]) <= box[3] / 2 + 0.05)
            assert np.all(np.abs(local[:, 1]) <= box[4] / 2 + 0.05)
            assert np.all((local[:, 2] >= -0.05) & (local[:, 2] <= box[5] + 0.05))
        # visibility counts agree with the per-point instance ids
        counts = frame.points_in_box[agent_id]
        for i, a in enumerate(frame.agents):
            assert counts[i] == np.count_nonzero(scan.instance_id == a.id)
    return frame


def check_step_advances_time(world: World, seed: int = 0) -> None:
    world.reset(seed)
    frame = world.step()
    assert frame.frame == 1 and np.isclose(frame.time_s, world.dt)
    frame = world.step({})
    assert frame.frame == 2 and np.isclose(frame.time_s, 2 * world.dt)
    frame.validate()


def check_deterministic(make, scenario: str, seed: int = 3, steps: int = 3) -> None:
    frames = []
    for _ in range(2):
        world = make(scenario)
        world.reset(seed)
        for _ in range(steps):
            frame = world.step()
        frames.append(frame)
        world.close()
    a, b = frames
    assert a.agent_ids.tolist() == b.agent_ids.tolist()
    assert np.array_equal(a.boxes_world, b.boxes_world)
    for agent_id in a.scans:
        assert a.scans[agent_id].points.tobytes() == b.scans[agent_id].points.tobytes()


def check_ego_obeys_actions(world: World, seed: int = 0) -> None:
    frame = world.reset(seed)
    ego = frame.ego_id
    world.step({ego: VehicleControl(acceleration=3.0)})
    fast = world.step({ego: VehicleControl(acceleration=3.0)}).agent(ego).speed
    world.reset(seed)
    world.step({ego: VehicleControl(acceleration=-8.0)})
    slow = world.step({ego: VehicleControl(acceleration=-8.0)}).agent(ego).speed
    assert fast > slow
    world.reset(seed)
    yaw0 = frame.agent(ego).yaw
    for _ in range(5):
        out = world.step({ego: VehicleControl(acceleration=1.0, steering=0.4)})
    turned = (out.agent(ego).yaw - yaw0 + np.pi) % (2 * np.pi) - np.pi
    assert turned > 0.05, "positive steering must turn left (counter-clockwise)"


def check_rejects_bad_use(world: World, seed: int = 0) -> None:
    frame = world.reset(seed)
    human = next((a.id for a in frame.agents if not a.connected), None)
    if human is not None:
        try:
            world.step({human: VehicleControl()})
        except ValueError:
            pass
        else:
            raise AssertionError("a non-connected vehicle accepted an action")
