"""Broadcast bus: what each receiver gets this tick, and what went on air.

Every tick the senders hand over their encoded messages, in transmission order (the schedule),
with everyone's position. The bus models one shared medium that all vehicles hear (one collision
domain; transmissions are serialised, never collide):

- Each tick offers ``airtime_budget_s`` seconds of medium time, at the start of the tick
  (``budget = tick`` when the medium is ours alone; less when other traffic shares it). A message
  starts when the medium is free, so it waits for the messages before it, this tick's and any
  backlog from earlier ticks; a transmission that does not fit in this tick's window continues
  in the next tick's window.
- A message that could not start within ``max_queue_s`` of its tick expires unsent (as access
  layers drop packets whose lifetime ran out) and uses no airtime.
- Latency = queueing + airtime (+ propagation, negligible) + the channel's processing delay; a
  message whose latency reaches past the end of its tick is delivered on a later tick,
  ``sent tick + floor(latency / tick_s)``.
- Each receiver within range receives each packet of the message independently with the
  channel's fading (:meth:`v2x.channel.ChannelConfig.sample_packets_received`), using the
  positions at the sending tick; a message is received only if all its packets are.

Randomness is drawn from ``numpy.random.default_rng((seed, tick))``: the same seed, tick and
inputs give the same deliveries whatever happened on other ticks.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from v2x.channel import ChannelConfig

__all__ = ["BroadcastBus", "BusConfig", "Delivery", "TickReport", "Transmission"]


@dataclass(frozen=True)
class BusConfig:
    """Timing of the shared medium.

    Attributes:
        tick_s: simulation tick, seconds (0.1 at 10 Hz).
        airtime_budget_s: medium time per tick available to these messages; None for the whole
            tick.
        max_queue_s: longest a message may wait for the medium before it expires unsent.
    """

    tick_s: float = 0.1
    airtime_budget_s: float | None = None
    max_queue_s: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.tick_s < math.inf:
            raise ValueError(f"tick_s must be finite and > 0, got {self.tick_s}")
        if self.airtime_budget_s is not None and not 0 < self.airtime_budget_s <= self.tick_s:
            raise ValueError(f"airtime_budget_s must be in (0, tick_s], got {self.airtime_budget_s}")
        if not self.max_queue_s >= 0:
            raise ValueError(f"max_queue_s must be >= 0, got {self.max_queue_s}")

    @property
    def budget_s(self) -> float:
        return self.tick_s if self.airtime_budget_s is None else self.airtime_budget_s


@dataclass(frozen=True)
class Delivery:
    """A message as one receiver gets it.

    Attributes:
        sender_id: who sent it.
        receiver_id: who receives it.
        data: the wire bytes (decode with :func:`v2x.message.decode`).
        sent_tick: tick it was handed to the bus.
        latency_s: seconds from the start of ``sent_tick`` to its arrival.
    """

    sender_id: int
    receiver_id: int
    data: bytes
    sent_tick: int
    latency_s: float


@dataclass(frozen=True)
class Transmission:
    """One message handed to the bus.

    Attributes:
        sender_id: who sent it.
        nbytes: its size, ``len(data)``.
        num_packets: packets it was split into.
        airtime_s: medium time it used (0 if it expired).
        queue_s: seconds it waited for the medium after the start of its tick.
        expired: True if it waited longer than ``max_queue_s`` and was never sent.
    """

    sender_id: int
    nbytes: int
    num_packets: int
    airtime_s: float
    queue_s: float
    expired: bool


@dataclass
class TickReport:
    """What happened on the bus at one tick.

    Attributes:
        tick: the tick.
        received: for every agent in ``positions``, the messages it receives this tick (sent
            now or late from earlier ticks), by arrival time.
        transmissions: the messages handed over this tick, in order.
        bytes_on_air: message bytes put on air this tick (expired messages excluded).
        airtime_s: medium time of those messages.
        backlog_s: medium time still owed to this tick's messages after its window (0: none).
        lost: counts of (message, receiver) pairs that did not arrive, by reason
            ("out_of_range", "packet_error"), and of messages that "expired" unsent.
    """

    tick: int
    received: dict[int, list[Delivery]]
    transmissions: list[Transmission]
    bytes_on_air: int
    airtime_s: float
    backlog_s: float
    lost: collections.Counter[str] = field(default_factory=collections.Counter)


class BroadcastBus:
    """The shared medium between vehicles; call :meth:`step` once per tick, ticks increasing."""

    def __init__(self, channel: ChannelConfig, config: BusConfig | None = None, seed: int = 0) -> None:
        self.channel = channel
        self.config = config or BusConfig()
        self.seed = int(seed)
        self._last_tick: int | None = None
        self._backlog_v = 0.0  # medium time owed, measured from the start of the last tick's window
        self._pending: list[tuple[int, float, int, Delivery]] = []  # (tick, arrival s, order, d)
        self._order = 0

    def step(
        self,
        tick: int,
        outgoing: Sequence[tuple[int, bytes]],
        positions: Mapping[int, np.ndarray],
    ) -> TickReport:
        """Put this tick's messages on air and return what every agent receives now.

        Args:
            tick: the tick index, larger than the previous call's.
            outgoing: (sender_id, wire bytes) in transmission order.
            positions: every agent's (3,) world position in metres (receivers are all agents
                but the sender); senders must be included.

        Returns:
            The tick's report.
        """
        if self._last_tick is not None and tick <= self._last_tick:
            raise ValueError(f"ticks must increase: got {tick} after {self._last_tick}")
        pos = {int(k): np.asarray(v, dtype=np.float64).reshape(-1)[:3] for k, v in positions.items()}
        for sender_id, data in outgoing:
            if int(sender_id) not in pos:
                raise ValueError(f"sender {sender_id} has no position")
            if not isinstance(data, bytes | bytearray):
                raise ValueError(f"sender {sender_id}: messages must be bytes, got {type(data).__name__}")
        budget, tick_s = self.config.budget_s, self.config.tick_s
        if self._last_tick is not None:
            self._backlog_v = max(0.0, self._backlog_v - (tick - self._last_tick) * budget)
        self._last_tick = tick

        rng = np.random.default_rng((self.seed, tick))
        receivers = sorted(pos)
        report = TickReport(tick, {r: [] for r in receivers}, [], 0, 0.0, 0.0)
        for sender_id, data in outgoing:
            sender_id = int(sender_id)
            nbytes = len(data)
            num_packets = self.channel.num_packets(nbytes)
            queue_s = self._real_start(self._backlog_v)
            if queue_s > self.config.max_queue_s:
                report.transmissions.append(Transmission(sender_id, nbytes, num_packets, 0.0, queue_s, True))
                report.lost["expired"] += 1
                continue
            airtime = self.channel.airtime_s(nbytes)
            start_v = self._backlog_v
            self._backlog_v = start_v + airtime
            end_s = self._real_end(start_v, self._backlog_v)
            latency = end_s + self.channel.processing_delay_s
            report.transmissions.append(Transmission(sender_id, nbytes, num_packets, airtime, queue_s, False))
            report.bytes_on_air += nbytes
            report.airtime_s += airtime

            others = [r for r in receivers if r != sender_id]
            if not others:
                continue
            dist = np.array([np.linalg.norm(pos[r] - pos[sender_id]) for r in others])
            in_range = dist <= self.channel.max_range_m
            if not np.all(in_range):
                report.lost["out_of_range"] += int(np.count_nonzero(~in_range))
            reachable = [r for r, ok in zip(others, in_range, strict=True) if ok]
            if not reachable:
                continue
            ok = self.channel.sample_packets_received(dist[in_range], num_packets, rng).all(axis=1)
            if not np.all(ok):
                report.lost["packet_error"] += int(np.count_nonzero(~ok))
            arrival_tick = tick + math.floor(latency / tick_s)
            for receiver, received in zip(reachable, ok, strict=True):
                if received:
                    delivery = Delivery(sender_id, receiver, bytes(data), tick, latency)
                    arrival_s = tick * tick_s + latency
                    self._pending.append((arrival_tick, arrival_s, self._order, delivery))
                    self._order += 1
        report.backlog_s = max(0.0, self._backlog_v - budget)

        due = sorted((p for p in self._pending if p[0] <= tick), key=lambda p: (p[0], p[1], p[2]))
        self._pending = [p for p in self._pending if p[0] > tick]
        for _, _, _, delivery in due:
            report.received.setdefault(delivery.receiver_id, []).append(delivery)
        return report

    @property
    def pending(self) -> int:
        """Deliveries in flight, due on later ticks."""
        return len(self._pending)

    def _real_start(self, v: float) -> float:
        """Real seconds after the tick start at which medium time ``v`` (from the window start)
        begins: windows of ``budget`` usable seconds repeat every ``tick_s``."""
        budget, tick_s = self.config.budget_s, self.config.tick_s
        j = math.floor(v / budget)
        return j * tick_s + (v - j * budget)

    def _real_end(self, start_v: float, end_v: float) -> float:
        """Real seconds after the tick start at which a transmission ending at ``end_v`` ends; an
        end exactly on a window boundary belongs to the window it closes."""
        if end_v <= start_v:
            return self._real_start(start_v)
        budget, tick_s = self.config.budget_s, self.config.tick_s
        j = max(math.ceil(end_v / budget) - 1, 0)
        return j * tick_s + (end_v - j * budget)
