"""The V2X link between the agents of a sample: every message is encoded, sent as bytes, decoded.

Nothing crosses from one agent to another except through here: the sender's payload is encoded by
a :mod:`v2x.codecs` codec, wrapped in a :class:`v2x.message.Message` whose header carries the
sender's *measured* pose, turned into wire bytes (``len`` of which is the message size reported
everywhere), put on a :class:`v2x.bus.BroadcastBus` over the configured radio channel, and what
arrives is decoded again. The receiver takes the sender's pose from the decoded header.

Frames: the dataset expresses every measured pose in the ego's measured sensor frame
(``T_ego_from_agent_measured``), so that frame plays the world's role in message headers here;
only relative poses matter to a receiver.

Channel effects per sample (:class:`LinkConfig`):

- **loss**: the bus draws packet losses from the channel's fading model at the senders' true
  distances (``v2x.channel``); a lost message simply does not arrive;
- **latency**: airtime (message size over the data rate, packetised, queued behind the messages
  sent before it) plus processing; a message whose latency runs past the end of the tick arrives
  on a later tick and is missing for this frame (the stale-data case is modelled by the dataset's
  ``delay_frames``). Request-reply exchanges (CORE's request maps) add both phases;
- **pose noise**: in the measured poses (dataset, :class:`v2x.pose_noise.PoseNoise`).

Each sample gets its own bus seeded from ``(seed, run, frame, ego)``, so the same sample sees the
same channel draws.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from v2x.bus import BroadcastBus, BusConfig
from v2x.channel import ChannelConfig, dsrc, ideal, lte_v2x_pc5
from v2x.codecs import Decoded, decode_payload
from v2x.message import CodecId, Message, decode, encode

__all__ = ["LinkConfig", "LinkStats", "MessageRecord", "Outgoing", "Received", "V2XLink"]


@dataclass(frozen=True)
class LinkConfig:
    """Radio channel and bus used between agents.

    Attributes:
        channel: ``"ideal"`` (no loss, infinite rate unless ``ideal_rate_mbps``), ``"dsrc"``
            (802.11p at ``dsrc_rate_mbps``) or ``"lte_v2x"`` (PC5 sidelink); see ``v2x.channel``.
        dsrc_rate_mbps: 802.11p data rate.
        ideal_rate_mbps: finite rate for the ideal channel (0: infinite).
        tick_s: simulation tick (a message later than this misses the frame).
        airtime_budget_s: medium time per tick for these messages (0: the whole tick).
        max_queue_s: a message waiting longer for the medium expires unsent.
        seed: base seed of the bus's loss draws.
    """

    channel: Literal["ideal", "dsrc", "lte_v2x"] = "ideal"
    dsrc_rate_mbps: float = 6.0
    ideal_rate_mbps: float = 0.0
    tick_s: float = 0.1
    airtime_budget_s: float = 0.0
    max_queue_s: float = 0.5
    seed: int = 0

    def channel_config(self) -> ChannelConfig:
        match self.channel:
            case "ideal":
                return ideal(math.inf if self.ideal_rate_mbps <= 0 else self.ideal_rate_mbps * 1e6)
            case "dsrc":
                return dsrc(self.dsrc_rate_mbps)
            case "lte_v2x":
                return lte_v2x_pc5()
        raise ValueError(f"unknown channel {self.channel!r}; valid: ideal, dsrc, lte_v2x")

    def bus_config(self) -> BusConfig:
        budget = None if self.airtime_budget_s <= 0 else self.airtime_budget_s
        return BusConfig(tick_s=self.tick_s, airtime_budget_s=budget, max_queue_s=self.max_queue_s)


@dataclass(frozen=True)
class Outgoing:
    """A payload one agent wants to send.

    Attributes:
        sender_id: the sending agent.
        T_ref_from_sender: (4, 4) float64 sender's measured pose (header pose).
        codec: what the payload holds.
        payload: codec bytes.
    """

    sender_id: int
    T_ref_from_sender: np.ndarray
    codec: CodecId
    payload: bytes


@dataclass(frozen=True)
class Received:
    """A message as a receiver decoded it.

    Attributes:
        sender_id: from the header.
        T_ref_from_sender: (4, 4) float64 pose from the header.
        content: the decoded payload (points, keypoints, sparse BEV, detections or request map).
        nbytes: wire size.
        latency_s: from the start of the tick to arrival.
    """

    sender_id: int
    T_ref_from_sender: np.ndarray
    content: Decoded
    nbytes: int
    latency_s: float


@dataclass(frozen=True)
class MessageRecord:
    """One message sent during a frame (received or not).

    Attributes:
        sender_id: who sent it.
        receiver_id: the agent it was meant for; -1 for a broadcast (one message on air for all).
        codec: the payload's :class:`v2x.message.CodecId` name.
        nbytes: wire size, ``len(encode(message))``.
        latency_s: seconds from the tick start to arrival (NaN when it did not arrive in time).
        received: whether it arrived within the tick (for a broadcast: at any receiver).
    """

    sender_id: int
    receiver_id: int
    codec: str
    nbytes: int
    latency_s: float
    received: bool


@dataclass
class LinkStats:
    """Messages of one batch, for byte and latency reports.

    Attributes:
        records: per sample of the batch, the messages sent while processing it.
    """

    records: list[list[MessageRecord]] = field(default_factory=list)

    def bytes_per_message(self) -> list[int]:
        return [r.nbytes for sample in self.records for r in sample]

    def bytes_per_frame(self) -> list[int]:
        return [sum(r.nbytes for r in sample) for sample in self.records]

    def latency_per_frame(self) -> list[float]:
        """Per sample: sum over exchange phases of the latest arrival (0 without messages)."""
        out = []
        for sample in self.records:
            phases: dict[str, float] = {}
            for r in sample:
                if r.received:
                    phases[r.codec] = max(phases.get(r.codec, 0.0), r.latency_s)
            out.append(sum(phases.values()))
        return out


class V2XLink:
    """Sends payloads between the agents of one sample over the bus and decodes what arrives."""

    def __init__(self, config: LinkConfig) -> None:
        self.config = config
        self.channel = config.channel_config()
        self.bus_config = config.bus_config()

    def _bus(self, run: str, frame: int, ego_id: int, phase: int) -> BroadcastBus:
        seed = zlib.crc32(f"{self.config.seed}/{run}/{frame}/{ego_id}/{phase}".encode())
        return BroadcastBus(self.channel, self.bus_config, seed=seed)

    def exchange(
        self,
        outgoing: list[Outgoing],
        receiver_id: int,
        positions: dict[int, np.ndarray],
        where: tuple[str, int, int],
        phase: int = 0,
        records: list[MessageRecord] | None = None,
    ) -> list[Received]:
        """Send ``outgoing`` at one tick and return what ``receiver_id`` decodes, in sending order.

        Args:
            outgoing: the payloads, in transmission order.
            receiver_id: the agent whose receptions are returned.
            positions: (3,) true position of every agent (senders and receiver), metres.
            where: ``(run, frame, ego_id)`` of the sample (seeds the bus; the frame is the tick).
            phase: exchange phase within the frame (request, then reply), for the seed.
            records: where to append a :class:`MessageRecord` per message sent.
        """
        if not outgoing:
            return []
        run, frame, ego_id = where
        wires = []
        for out in outgoing:
            message = Message.from_pose(
                sender_id=int(out.sender_id),
                seq=int(frame) & 0xFFFFFFFF,
                timestamp_us=round(frame * self.config.tick_s * 1e6),
                T_world_from_sensor=out.T_ref_from_sender,
                codec=out.codec,
                payload=out.payload,
            )
            wires.append((int(out.sender_id), encode(message)))
        report = self._bus(run, frame, ego_id, phase).step(int(frame), wires, positions)
        arrived = {d.sender_id: d for d in report.received.get(int(receiver_id), [])}
        received = []
        for (sender_id, data), out in zip(wires, outgoing, strict=True):
            delivery = arrived.get(sender_id)
            if records is not None:
                records.append(
                    MessageRecord(
                        sender_id=sender_id,
                        receiver_id=int(receiver_id),
                        codec=out.codec.name,
                        nbytes=len(data),
                        latency_s=float(delivery.latency_s) if delivery is not None else math.nan,
                        received=delivery is not None,
                    )
                )
            if delivery is None:
                continue
            message = decode(delivery.data)
            received.append(
                Received(
                    sender_id=message.sender_id,
                    T_ref_from_sender=message.T_world_from_sensor,
                    content=decode_payload(message.codec, message.payload),
                    nbytes=len(delivery.data),
                    latency_s=float(delivery.latency_s),
                )
            )
        return received

    def broadcast(
        self,
        outgoing: Outgoing,
        receiver_ids: list[int],
        positions: dict[int, np.ndarray],
        where: tuple[str, int, int],
        phase: int = 0,
        records: list[MessageRecord] | None = None,
    ) -> dict[int, Received]:
        """Send one message to every agent of ``receiver_ids``; returns what each decodes."""
        run, frame, ego_id = where
        message = Message.from_pose(
            sender_id=int(outgoing.sender_id),
            seq=int(frame) & 0xFFFFFFFF,
            timestamp_us=round(frame * self.config.tick_s * 1e6),
            T_world_from_sensor=outgoing.T_ref_from_sender,
            codec=outgoing.codec,
            payload=outgoing.payload,
        )
        data = encode(message)
        report = self._bus(run, frame, ego_id, phase).step(int(frame), [(int(outgoing.sender_id), data)], positions)
        out: dict[int, Received] = {}
        for receiver in receiver_ids:
            deliveries = report.received.get(int(receiver), [])
            if deliveries:
                decoded = decode(deliveries[0].data)
                out[int(receiver)] = Received(
                    sender_id=decoded.sender_id,
                    T_ref_from_sender=decoded.T_world_from_sensor,
                    content=decode_payload(decoded.codec, decoded.payload),
                    nbytes=len(data),
                    latency_s=float(deliveries[0].latency_s),
                )
        if records is not None:  # one message on air, whoever receives it
            latencies = [r.latency_s for r in out.values()]
            records.append(
                MessageRecord(
                    sender_id=int(outgoing.sender_id),
                    receiver_id=-1,
                    codec=outgoing.codec.name,
                    nbytes=len(data),
                    latency_s=max(latencies) if latencies else math.nan,
                    received=bool(out),
                )
            )
        return out
