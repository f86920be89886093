"""Broadcast bus: latency and late delivery, shared airtime, range and loss, determinism per seed."""

import numpy as np
import pytest

from v2x.bus import BroadcastBus, BusConfig
from v2x.channel import dsrc, ideal


def _ring(n: int, radius: float, centre=(0.0, 0.0, 0.0)) -> dict[int, np.ndarray]:
    """Agent 0 at the centre and n receivers on a circle of ``radius`` around it."""
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pos = {0: np.array(centre, float)}
    for i, a in enumerate(angles, start=1):
        pos[i] = np.array(centre) + radius * np.array([np.cos(a), np.sin(a), 0.0])
    return pos


def test_ideal_link_delivers_everything_now_with_zero_latency():
    bus = BroadcastBus(ideal())
    report = bus.step(0, [(0, b"hello"), (1, b"world")], _ring(3, 20.0))
    assert [d.data for d in report.received[2]] == [b"hello", b"world"]
    assert [d.sender_id for d in report.received[0]] == [1]
    assert [d.data for d in report.received[1]] == [b"hello"]  # a sender does not hear itself
    assert all(d.latency_s == 0 and d.sent_tick == 0 for ds in report.received.values() for d in ds)
    assert report.bytes_on_air == 10 and report.airtime_s == 0 and not report.lost


def test_slow_messages_arrive_on_later_ticks():
    bus = BroadcastBus(ideal(1e6), BusConfig(tick_s=0.1))
    pos = _ring(1, 10.0)
    data = bytes(31_250)  # 250,000 bits at 1 Mbps: 0.25 s on air
    report = bus.step(0, [(0, data)], pos)
    assert report.received[1] == [] and bus.pending == 1
    assert report.airtime_s == pytest.approx(0.25) and report.backlog_s == pytest.approx(0.15)
    assert bus.step(1, [], pos).received[1] == []
    (delivery,) = bus.step(2, [], pos).received[1]
    assert delivery.sent_tick == 0 and delivery.latency_s == pytest.approx(0.25) and delivery.data == data


def test_messages_queue_behind_each_other_and_behind_the_backlog():
    bus = BroadcastBus(ideal(1e6), BusConfig(tick_s=0.1))
    pos = _ring(1, 10.0)
    a, b = bytes(5_000), bytes(2_500)  # 40 ms and 20 ms on air
    report = bus.step(0, [(0, a), (0, b)], pos)
    assert [d.latency_s for d in report.received[1]] == pytest.approx([0.04, 0.06])
    assert [t.queue_s for t in report.transmissions] == pytest.approx([0.0, 0.04])
    # 120 ms sent at tick 1 spills 20 ms into tick 2, which the message of tick 2 waits for
    assert bus.step(1, [(0, bytes(15_000))], pos).received[1] == []
    report = bus.step(2, [(0, a)], pos)
    assert report.transmissions[0].queue_s == pytest.approx(0.02)
    # both arrive during tick 2, in arrival order: 0.1 + 0.12 s, then 0.2 + 0.06 s
    assert [(d.sent_tick, round(d.latency_s, 9)) for d in report.received[1]] == [(1, 0.12), (2, 0.06)]


def test_airtime_budget_limits_the_usable_part_of_each_tick():
    # 50 ms of the 100 ms tick are ours: an 80 ms transmission ends 30 ms into the next window
    bus = BroadcastBus(ideal(1e6), BusConfig(tick_s=0.1, airtime_budget_s=0.05))
    pos = _ring(1, 10.0)
    report = bus.step(0, [(0, bytes(10_000))], pos)
    assert report.received[1] == []
    (delivery,) = bus.step(1, [], pos).received[1]
    assert delivery.latency_s == pytest.approx(0.13)


def test_messages_that_wait_too_long_expire_unsent():
    bus = BroadcastBus(ideal(1e6), BusConfig(tick_s=0.1, max_queue_s=0.1))
    report = bus.step(0, [(0, bytes(37_500)), (0, b"late")], _ring(1, 10.0))  # first takes 0.3 s
    assert report.lost["expired"] == 1
    assert report.transmissions[1].expired and report.transmissions[1].airtime_s == 0
    assert report.bytes_on_air == 37_500


def test_range_limit_and_lost_counts():
    bus = BroadcastBus(ideal(max_range_m=50.0))
    pos = {0: np.zeros(3), 1: np.array([30.0, 0, 0]), 2: np.array([0, 80.0, 0])}
    report = bus.step(0, [(0, b"x")], pos)
    assert len(report.received[1]) == 1 and report.received[2] == []
    assert report.lost["out_of_range"] == 1


def test_delivery_ratio_matches_the_analytic_message_success():
    channel = dsrc(6.0)
    bus = BroadcastBus(channel, seed=3)
    pos = _ring(500, 150.0)
    data = bytes(2_000)  # two packets, both must arrive
    delivered = 0
    for tick in range(8):
        report = bus.step(tick, [(0, data)], pos)
        delivered += sum(len(report.received[r]) for r in range(1, 501))
    expected = float(channel.message_success_probability(150.0, len(data)))
    # 4,000 trials: the binomial standard error is below 0.008
    assert delivered / 4000 == pytest.approx(expected, abs=0.04)


def _run(seed: int, ticks=range(5)):
    bus = BroadcastBus(dsrc(6.0), seed=seed)
    pos = _ring(40, 160.0)
    out = []
    for tick in ticks:
        report = bus.step(tick, [(0, bytes(1_200)), (3, bytes(300))], pos)
        out.append({r: [(d.sender_id, d.sent_tick) for d in ds] for r, ds in report.received.items()})
    return out


def test_same_seed_same_deliveries_and_different_seed_differs():
    assert _run(7) == _run(7)
    assert _run(7) != _run(8)


def test_a_tick_depends_on_the_seed_and_tick_only():
    # without backlog, tick 4 does not depend on whether ticks 0-3 were simulated
    assert _run(11, ticks=range(5))[-1] == _run(11, ticks=[4])[0]


def test_invalid_use_is_refused():
    bus = BroadcastBus(ideal())
    bus.step(3, [], _ring(1, 5.0))
    with pytest.raises(ValueError):
        bus.step(3, [], _ring(1, 5.0))
    with pytest.raises(ValueError):
        bus.step(4, [(99, b"x")], _ring(1, 5.0))
    with pytest.raises(ValueError):
        BusConfig(tick_s=0.1, airtime_budget_s=0.2)
