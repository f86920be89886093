"""Intent sharing (MAPPO-PIS): each connected vehicle broadcasts the trajectory it plans to drive.

An intent is the sender's planned positions over the next 1-2 s (the low-level controller's
rollout of the action it just chose), sampled at a few times. On the wire it is a
:class:`v2x.message.Message` with codec id ``INTENT`` (:class:`v2x.codecs.IntentCodec`): the
waypoints in the sender's sensor frame (the header carries that pose, as for every message), each
with two features, its time offset from the message timestamp (seconds) and the planned speed
(m/s). Values are float16 (:mod:`v2x.quantize`: 2.4 cm at 50 m, 1 ms on a 2 s offset) without
entropy coding, which would add more frame overhead than a dozen numbers can save: an intent of T
waypoints is ``73 + 5 + 8 + 10 T`` bytes (116 for T = 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.geometry import invert_T, transform_points
from v2x.codecs import IntentCodec, KeypointFeatures
from v2x.message import CodecId, DecodeError, Message, decode, encode

__all__ = ["INTENT_CODEC", "Intent", "IntentBook", "decode_intent", "encode_intent"]

INTENT_CODEC = IntentCodec()


@dataclass(frozen=True)
class Intent:
    """A planned trajectory as a receiver reconstructs it, in the world frame.

    Attributes:
        sender_id: who plans it.
        timestamp_s: when it was planned (simulation time, seconds).
        times_s: (T,) absolute times of the waypoints, increasing.
        waypoints: (T, 2) float64 world x, y at those times.
        speeds: (T,) planned speed at each waypoint, m/s.
    """

    sender_id: int
    timestamp_s: float
    times_s: np.ndarray
    waypoints: np.ndarray
    speeds: np.ndarray

    def position_at(self, t: np.ndarray | float) -> np.ndarray:
        """(..., 2) planned position at time(s) ``t``; held at the ends (before the first
        waypoint the first one, after the last one the last one)."""
        t = np.asarray(t, dtype=np.float64)
        return np.stack(
            [
                np.interp(t, self.times_s, self.waypoints[:, 0]),
                np.interp(t, self.times_s, self.waypoints[:, 1]),
            ],
            axis=-1,
        )


def encode_intent(
    sender_id: int,
    seq: int,
    timestamp_s: float,
    T_world_from_sensor: np.ndarray,
    offsets_s: np.ndarray,
    waypoints_world: np.ndarray,
    speeds: np.ndarray,
) -> bytes:
    """Wire bytes of an intent message.

    Args:
        sender_id, seq: message header fields.
        timestamp_s: planning time, seconds (>= 0).
        T_world_from_sensor: (4, 4) sender sensor pose (as measured, noise included).
        offsets_s: (T,) waypoint times after ``timestamp_s``, seconds.
        waypoints_world: (T, 2) planned world positions.
        speeds: (T,) planned speeds, m/s.
    """
    offsets_s = np.asarray(offsets_s, dtype=np.float64).reshape(-1)
    waypoints_world = np.asarray(waypoints_world, dtype=np.float64).reshape(-1, 2)
    speeds = np.asarray(speeds, dtype=np.float64).reshape(-1)
    if not (len(offsets_s) == len(waypoints_world) == len(speeds)) or len(offsets_s) == 0:
        raise ValueError(
            f"need T >= 1 offsets, waypoints and speeds alike, got {len(offsets_s)}, "
            f"{len(waypoints_world)}, {len(speeds)}"
        )
    T_sensor_from_world = invert_T(np.asarray(T_world_from_sensor, dtype=np.float64))
    ground = np.concatenate([waypoints_world, np.zeros((len(waypoints_world), 1))], axis=1)
    xyz_sensor = transform_points(T_sensor_from_world, ground)
    payload = INTENT_CODEC.encode(
        KeypointFeatures(
            xyz=xyz_sensor.astype(np.float32), features=np.stack([offsets_s, speeds], 1).astype(np.float32)
        )
    )
    message = Message.from_pose(
        sender_id, seq, round(timestamp_s * 1e6), T_world_from_sensor, CodecId.INTENT, payload
    )
    return encode(message)


def decode_intent(data: bytes) -> Intent:
    """Parse an intent message; raises :class:`v2x.message.DecodeError` on anything malformed."""
    message = decode(data)
    if message.codec is not CodecId.INTENT:
        raise DecodeError(f"not an intent message: codec {message.codec.name}")
    body = IntentCodec.decode(message.payload)
    offsets = body.features[:, 0].astype(np.float64)
    xyz_world = transform_points(message.T_world_from_sensor, body.xyz.astype(np.float64))
    return Intent(
        sender_id=message.sender_id,
        timestamp_s=message.timestamp_s,
        times_s=message.timestamp_s + offsets,
        waypoints=xyz_world[:, :2],
        speeds=body.features[:, 1].astype(np.float64),
    )


class IntentBook:
    """The latest intent each receiver holds from each sender.

    Intents older than ``max_age_s`` (measured from their timestamp) are forgotten.
    """

    def __init__(self, max_age_s: float) -> None:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        self.max_age_s = float(max_age_s)
        self._book: dict[int, dict[int, Intent]] = {}

    def clear(self) -> None:
        self._book.clear()

    def receive(self, receiver_id: int, intent: Intent) -> None:
        """Keep ``intent`` unless the receiver already holds a newer one from the same sender."""
        held = self._book.setdefault(receiver_id, {})
        current = held.get(intent.sender_id)
        if current is None or intent.timestamp_s >= current.timestamp_s:
            held[intent.sender_id] = intent

    def intents_of(self, receiver_id: int, now_s: float) -> dict[int, Intent]:
        """Sender id -> fresh intent held by ``receiver_id`` at time ``now_s``."""
        held = self._book.get(receiver_id, {})
        for sender in [s for s, i in held.items() if now_s - i.timestamp_s > self.max_age_s]:
            del held[sender]
        return dict(held)
