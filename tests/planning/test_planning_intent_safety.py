"""Intent messages (real v2x bytes) and the priority-based safety supervisor."""

import numpy as np
import pytest

from models.planning.intent import Intent, IntentBook, decode_intent, encode_intent
from models.planning.safety import (
    SafetyConfig,
    SafetyRequest,
    constant_velocity_poses,
    footprint_clearance,
    supervise,
)
from sim.geometry import T_from_xyz_yaw
from v2x.codecs import DetectionsCodec, DetectionSet
from v2x.message import CodecId, DecodeError, Message, decode, encode


def test_intent_round_trip_through_the_wire_format():
    T = T_from_xyz_yaw(120.0, -40.0, 1.8, 0.7)
    offsets = np.array([0.5, 1.0, 1.5])
    waypoints = np.array([[124.0, -37.0], [128.0, -34.5], [133.0, -31.0]])
    speeds = np.array([10.0, 10.5, 11.0])
    data = encode_intent(7, 3, 12.3, T, offsets, waypoints, speeds)
    assert len(data) == 73 + 5 + 8 + 10 * 3  # header + entropy prefix + head + float16 values
    assert decode(data).codec is CodecId.INTENT
    intent = decode_intent(data)
    assert intent.sender_id == 7 and intent.timestamp_s == pytest.approx(12.3)
    # float16 in the sensor frame: |x| <= 15 m here -> error below 1 cm
    assert np.abs(intent.waypoints - waypoints).max() < 0.01
    assert np.abs(intent.times_s - (12.3 + offsets)).max() < 1e-3
    assert np.abs(intent.speeds - speeds).max() < 0.01
    mid = intent.position_at(12.3 + 0.75)
    assert np.allclose(mid, (intent.waypoints[0] + intent.waypoints[1]) / 2)


def test_intent_encoding_rejects_bad_input_and_decoding_other_messages():
    T = np.eye(4)
    with pytest.raises(ValueError, match="increase"):
        encode_intent(1, 0, 0.0, T, np.array([1.0, 0.5]), np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="T >= 1"):
        encode_intent(1, 0, 0.0, T, np.array([1.0]), np.zeros((2, 2)), np.zeros(2))
    payload = DetectionsCodec().encode(
        DetectionSet(np.zeros((1, 7)) + 1.0, np.ones(1), np.zeros(1, dtype=int))
    )
    detections = encode(Message.from_pose(1, 0, 0, T, CodecId.DETECTIONS, payload))
    with pytest.raises(DecodeError, match="not an intent"):
        decode_intent(detections)


def test_intent_book_keeps_the_newest_and_forgets_stale():
    book = IntentBook(max_age_s=1.0)
    old = Intent(3, 1.0, np.array([1.5]), np.zeros((1, 2)), np.zeros(1))
    new = Intent(3, 1.5, np.array([2.0]), np.ones((1, 2)), np.zeros(1))
    book.receive(9, new)
    book.receive(9, old)  # arrives late: ignored
    assert book.intents_of(9, 2.0)[3] is new
    assert book.intents_of(9, 2.6) == {}
    assert book.intents_of(4, 2.0) == {}


def _line(x0: float, v: float, steps: int = 15, dt: float = 0.1, y: float = 0.0) -> np.ndarray:
    t = dt * np.arange(1, steps + 1)
    return np.stack([x0 + v * t, np.full(steps, y), np.zeros(steps)], axis=1)


def test_clearance_is_the_gap_between_footprints():
    extent = np.array([4.0, 2.0])
    own = _line(0.0, 0.0)[None]  # standing at x = 0
    # another car standing 10 m ahead: bumper gap 6 m; the discs stick out ~0.5 m past each bumper
    gap = footprint_clearance(own, extent, _line(10.0, 0.0)[None], extent[None])[0]
    radius = np.sqrt((4 / 6) ** 2 + 1.0)
    assert gap == pytest.approx(10.0 - 2 * 4 / 3 - 2 * radius)
    assert 4.5 < gap < 6.0
    overlap = footprint_clearance(own, extent, _line(1.0, 0.0)[None], extent[None])[0]
    assert overlap < 0.0
    assert footprint_clearance(own, extent, np.zeros((0, 15, 3)), np.zeros((0, 2)))[0] == np.inf


def test_constant_velocity_prediction():
    boxes = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.3]])
    poses = constant_velocity_poses(boxes, np.array([[2.0, 1.0]]), np.array([0.5, 1.0]))
    assert poses.shape == (1, 2, 3)
    assert np.allclose(poses[0, :, :2], [[1.0, 0.5], [2.0, 1.0]]) and np.allclose(poses[0, :, 2], 0.3)


def _request(agent_id, proposed, candidates, priority, obstacle_ids=(), obstacle_poses=None):
    m = len(obstacle_ids)
    return SafetyRequest(
        agent_id=agent_id,
        proposed=proposed,
        candidates=np.stack(candidates),
        extent=np.array([4.0, 2.0]),
        priority=priority,
        obstacle_ids=np.array(obstacle_ids, dtype=np.int64),
        obstacle_poses=np.zeros((0, 15, 3)) if obstacle_poses is None else obstacle_poses,
        obstacle_extents=np.tile([4.0, 2.0], (m, 1)),
    )


def test_unsafe_actions_are_replaced_by_the_safest_and_safe_ones_kept():
    stopped_car = _line(12.0, 0.0)[None]
    go, brake = _line(0.0, 10.0), _line(0.0, 1.0)
    config = SafetyConfig(horizon_s=1.5, margin_m=0.5)
    decisions = supervise([_request(0, 0, [go, brake], 1.0, [5], stopped_car)], config, share_plans=False)
    assert decisions[0].action == 1 and decisions[0].overridden
    assert decisions[0].clearances[0] < 0.5 <= decisions[0].clearances[1]
    far_car = _line(60.0, 0.0)[None]
    decisions = supervise([_request(0, 0, [go, brake], 1.0, [5], far_car)], config, share_plans=False)
    assert decisions[0].action == 0 and not decisions[0].overridden


def test_priority_order_with_shared_plans():
    # two agents on a collision course: the high-priority one is checked first against the
    # other's *proposed* plan and yields; the other then sees the yielding plan and keeps its own
    a_go, a_wait = _line(0.0, 8.0), _line(0.0, 0.0)
    b_go, b_wait = _line(20.0, -5.0), _line(20.0, 0.0)
    stand_a = _line(0.0, 0.0)[None]
    stand_b = _line(20.0, 0.0)[None]
    requests = [
        _request(1, 0, [a_go, a_wait], priority=2.0, obstacle_ids=[2], obstacle_poses=stand_b),
        _request(2, 0, [b_go, b_wait], priority=1.0, obstacle_ids=[1], obstacle_poses=stand_a),
    ]
    decisions = supervise(requests, SafetyConfig(), share_plans=True)
    assert decisions[1].overridden and decisions[1].action == 1
    assert not decisions[2].overridden
    # without shared plans each predicts the other standing still: both go, unaware
    decisions = supervise(requests, SafetyConfig(), share_plans=False)
    assert decisions[1].action == 0 and decisions[2].action == 0
