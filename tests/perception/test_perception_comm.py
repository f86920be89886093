"""The V2X link between agents (bytes are encoded lengths, poses come from headers, losses
drop messages) and the learned BEV compressor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.comm import LinkConfig, LinkStats, MessageRecord, Outgoing, V2XLink
from models.compressor import BevCompressor, CompressorConfig, straight_through
from sim.geometry import T_from_xyz_rpy
from v2x.codecs import RawPointsCodec, RequestMapCodec, SparseBEVCodec
from v2x.entropy import Compression
from v2x.message import CodecId, Message, encode

WHERE = ("run", 7, 1)


def test_exchange_reports_wire_bytes_and_decodes_the_header_pose():
    link = V2XLink(LinkConfig())
    rng = np.random.default_rng(0)
    points = rng.uniform(-20, 20, (500, 4)).astype(np.float32)
    T = T_from_xyz_rpy(3.0, -4.0, 0.2, 0.01, -0.02, 1.3)
    payload = RawPointsCodec().encode(points)
    records: list[MessageRecord] = []
    received = link.exchange(
        [Outgoing(5, T, CodecId.RAW_POINTS, payload)], 1, {1: np.zeros(3), 5: np.array([3.0, -4.0, 0.0])}, WHERE, records=records
    )
    assert len(received) == 1 and received[0].sender_id == 5
    np.testing.assert_allclose(received[0].T_ref_from_sender, T, atol=1e-12)
    np.testing.assert_allclose(received[0].content, points, atol=2e-3)  # int16 quantisation
    wire = encode(Message.from_pose(5, 7, 700000, T, CodecId.RAW_POINTS, payload))
    assert records[0].nbytes == received[0].nbytes == len(wire)
    assert records[0].received and records[0].codec == "RAW_POINTS"


def test_out_of_range_messages_are_lost_and_recorded():
    link = V2XLink(LinkConfig(channel="dsrc"))
    payload = RawPointsCodec().encode(np.zeros((10, 4), np.float32))
    records: list[MessageRecord] = []
    positions = {1: np.zeros(3), 2: np.array([20.0, 0.0, 0.0]), 3: np.array([5000.0, 0.0, 0.0])}
    received = link.exchange(
        [Outgoing(2, np.eye(4), CodecId.RAW_POINTS, payload), Outgoing(3, np.eye(4), CodecId.RAW_POINTS, payload)],
        1,
        positions,
        WHERE,
        records=records,
    )
    assert [m.sender_id for m in received] == [2]
    assert [r.received for r in records] == [True, False]
    assert records[0].latency_s > 0  # DSRC airtime and processing
    stats = LinkStats([records])
    assert stats.bytes_per_frame() == [2 * records[0].nbytes]
    assert stats.latency_per_frame() == [pytest.approx(records[0].latency_s)]


def test_slow_channels_deliver_big_messages_too_late_for_the_frame():
    link = V2XLink(LinkConfig(channel="ideal", ideal_rate_mbps=1.0, tick_s=0.1))
    big = RawPointsCodec(compression=Compression.NONE).encode(np.random.default_rng(1).uniform(-50, 50, (20000, 4)).astype(np.float32))
    records: list[MessageRecord] = []
    received = link.exchange([Outgoing(2, np.eye(4), CodecId.RAW_POINTS, big)], 1, {1: np.zeros(3), 2: np.ones(3)}, WHERE, records=records)
    assert received == [] and not records[0].received  # > 100 kB at 1 Mbps takes longer than a tick


def test_broadcast_counts_one_message_on_air():
    link = V2XLink(LinkConfig())
    records: list[MessageRecord] = []
    got = link.broadcast(
        Outgoing(1, np.eye(4), CodecId.REQUEST_MAP, RequestMapCodec().encode(np.ones((1, 1), bool))),
        [2, 3],
        {1: np.zeros(3), 2: np.ones(3), 3: -np.ones(3)},
        WHERE,
        records=records,
    )
    assert set(got) == {2, 3} and len(records) == 1 and records[0].receiver_id == -1
    assert got[2].content.shape == (1, 1)


def test_compressor_selects_best_cells_and_encodes_only_them():
    torch.manual_seed(0)
    compressor = BevCompressor(CompressorConfig(channels=4, max_cells=3), in_channels=8)
    score = torch.zeros(5, 6)
    score[0, 0], score[1, 2], score[4, 5], score[3, 3] = 0.9, 0.8, 0.7, 0.1
    mask = compressor.select(score)
    assert mask.sum() == 3 and mask[0, 0] and mask[1, 2] and mask[4, 5] and not mask[3, 3]
    assert compressor.select(torch.zeros(5, 6)).sum() == 0  # nothing worth sending: nothing sent
    compressed = compressor.compress(torch.randn(1, 8, 5, 6))[0]
    decoded = SparseBEVCodec.decode(compressor.encode(compressed, mask))
    assert decoded.indices.tolist() == [0, 1 * 6 + 2, 4 * 6 + 5]
    np.testing.assert_allclose(decoded.to_dense(), (compressed * mask).detach().numpy(), atol=2e-3)


def test_random_training_budget_draws_per_message_and_keeps_the_best_cells():
    config = CompressorConfig(channels=4, max_cells=3, train_cells="random")
    compressor = BevCompressor(config, in_channels=8)
    score = torch.arange(1, 31, dtype=torch.float32).reshape(5, 6)  # every cell positive, all distinct
    torch.manual_seed(0)
    counts = [int(compressor.select(score).sum()) for _ in range(200)]
    assert min(counts) >= 1 and max(counts) <= 30 and len(set(counts)) > 10  # a fresh draw each time
    assert max(counts) > 3  # the evaluation cap does not bind while training
    mask = compressor.select(score)
    k = int(mask.sum())
    assert mask.reshape(-1)[-k:].all() and not mask.reshape(-1)[:-k].any()  # the k best cells
    torch.manual_seed(0)
    assert [int(compressor.select(score).sum()) for _ in range(200)] == counts  # seeded: repeats
    compressor.eval()
    assert all(int(compressor.select(score).sum()) == 3 for _ in range(20))  # evaluation: max_cells
    with pytest.raises(ValueError, match="train_cells"):
        CompressorConfig(train_cells="all")


def test_straight_through_uses_decoded_values_forward_and_sent_gradient_backward():
    sent = torch.tensor([1.0, 2.0], requires_grad=True)
    received = straight_through(sent, np.array([1.5, 2.5], dtype=np.float32))
    torch.testing.assert_close(received, torch.tensor([1.5, 2.5]))
    (received * torch.tensor([3.0, 4.0])).sum().backward()
    torch.testing.assert_close(sent.grad, torch.tensor([3.0, 4.0]))


def test_unknown_channel_is_an_error():
    with pytest.raises(ValueError, match="unknown channel"):
        LinkConfig(channel="carrier-pigeon").channel_config()  # type: ignore[arg-type]
