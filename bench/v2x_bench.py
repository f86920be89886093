"""Bytes, speed and delivery of the V2X layer, on a 64-channel scan from the embedded simulator.

Prints, in one run:

1. Bytes per message for each codec at its default settings (and a few alternatives), built from
   the ego's hdl64 scan of ``random_traffic``: payload, unsigned and signed message sizes, and
   the airtime of the signed message on DSRC at 6 Mbps, and payload encode/decode rates.
   What is real and what stands in:
   raw points, keypoint positions (farthest-point sampling of the scan), BEV cell selection
   (the cells with the most points) and detections (ground-truth boxes of the vehicles within
   100 m, in the ego's sensor frame) come from the scan and the scene; keypoint and BEV
   *features* are seeded N(0, 1) stand-ins, since no encoder exists yet, so their sizes are
   exact for uncompressed formats and an upper bound where an entropy coder runs on them.
2. Messages per second for each codec's default message: wire encode/decode (header and
   framing), ECDSA P-256 sign and verify (signing hashes the whole message; single core).
3. Delivery ratio versus distance on the DSRC 6 Mbps preset: analytic per packet and per
   message, and Monte-Carlo through the broadcast bus.

    .venv/bin/python bench/v2x_bench.py [--seed 0] [--min-time 0.3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sim.geometry import invert_T, transform_boxes
from v2x.bus import BroadcastBus
from v2x.channel import dsrc, lte_v2x_pc5
from v2x.codecs import (
    DetectionsCodec,
    DetectionSet,
    KeypointFeatures,
    KeypointFeaturesCodec,
    PointFilter,
    RawPointsCodec,
    RequestMapCodec,
    SparseBEV,
    SparseBEVCodec,
    decode_payload,
)
from v2x.entropy import Compression
from v2x.message import Message, decode, encode
from v2x.quantize import ValueFormat
from v2x.signing import KeyRegistry, SigningKey, Verifier, sign_message

try:
    from sim.world import make_world
except ImportError as exc:  # the simulator is a hard requirement: no scan is faked
    sys.exit(
        "bench/v2x_bench.py needs the embedded simulator (sim.world.make_world) for its 64-channel "
        f"scan, and it could not be imported: {exc}"
    )


@dataclass
class BenchArgs:
    seed: int = 0
    """seed of the scene (random_traffic) and of the stand-in features and the channel"""
    min_time: float = 0.3
    """seconds each throughput measurement runs at least"""
    keypoints: int = 128
    """keypoints per message (COOPERNAUT: 128)"""
    keypoint_channels: int = 128
    """features per keypoint (COOPERNAUT: 128)"""
    bev_cells: int = 1000
    """BEV cells per sparse message (of 256 x 256 cells of 0.4 m)"""
    bev_channels: int = 64
    """features per BEV cell"""


BEV_RANGE_M = 51.2
BEV_CELL_M = 0.4


def farthest_points(xyz: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k points spread by farthest-point sampling (PointNet++), O(k N)."""
    chosen = [int(rng.integers(len(xyz)))]
    dist = np.full(len(xyz), np.inf)
    for _ in range(k - 1):
        dist = np.minimum(dist, np.linalg.norm(xyz - xyz[chosen[-1]], axis=1))
        chosen.append(int(np.argmax(dist)))
    return np.array(chosen)


def bev_counts(points: np.ndarray) -> np.ndarray:
    """(H, W) points per 0.4 m cell within +-51.2 m of the sensor."""
    size = round(2 * BEV_RANGE_M / BEV_CELL_M)
    ij = np.floor((points[:, :2] + BEV_RANGE_M) / BEV_CELL_M).astype(np.int64)
    keep = np.all((ij >= 0) & (ij < size), axis=1)
    counts = np.zeros((size, size), np.int64)
    np.add.at(counts, (ij[keep, 1], ij[keep, 0]), 1)  # row = y, column = x
    return counts


def _items(data: object) -> int:
    """Points, keypoints, cells, boxes or requested cells in a codec's input."""
    match data:
        case KeypointFeatures():
            return len(data.xyz)
        case SparseBEV():
            return len(data.indices)
        case DetectionSet():
            return len(data.boxes)
        case np.ndarray() if data.dtype == bool:
            return int(data.sum())
        case np.ndarray():
            return len(data)
    raise TypeError(type(data))


def rate(fn: Callable[[], object], min_time: float) -> float:
    """Calls per second of ``fn``, timed over at least ``min_time`` seconds."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return calls / elapsed


def main(args: BenchArgs) -> None:
    rng = np.random.default_rng(args.seed)
    world = make_world("random_traffic", lidar="hdl64")
    frame = world.reset(args.seed)
    scan = frame.scans[frame.ego_id]
    points = scan.points
    print(
        f"scan: random_traffic seed {args.seed}, ego {frame.ego_id}, {scan.config.channels}-channel "
        f"LiDAR, {len(points):,} points; {len(frame.agents)} vehicles"
    )

    # ------------------------------------------------------------------ the data each codec sends
    xyz = points[:, :3]
    kp_idx = farthest_points(xyz, args.keypoints, rng)
    keypoints = KeypointFeatures(
        xyz[kp_idx].copy(), rng.standard_normal((args.keypoints, args.keypoint_channels)).astype(np.float32)
    )
    counts = bev_counts(points)
    bev = SparseBEV.from_dense_topk(
        rng.standard_normal((args.bev_channels, *counts.shape)).astype(np.float32), counts, args.bev_cells
    )
    T_sensor_from_world = invert_T(scan.T_world_from_sensor)
    near = [a for a in frame.agents if a.id != frame.ego_id]
    boxes_world = np.stack([a.box for a in near])
    boxes = transform_boxes(T_sensor_from_world, boxes_world)
    keep = np.linalg.norm(boxes[:, :2], axis=1) <= 100.0
    kinds = sorted({a.kind.value for a in near})
    detections = DetectionSet(
        boxes[keep].astype(np.float32),
        np.ones(int(keep.sum()), np.float32),
        np.array([kinds.index(a.kind.value) for a, k in zip(near, keep, strict=True) if k]),
    )
    request = counts == 0  # the ego asks for every cell its own scan left empty

    cases = [
        ("RAW_POINTS", "default (int16, delta+shuffle, zstd)", RawPointsCodec(), points),
        ("RAW_POINTS", "int16, no filter, zstd", RawPointsCodec(point_filter=PointFilter.NONE), points),
        ("RAW_POINTS", "float32, none (lossless)", RawPointsCodec(ValueFormat.FLOAT32, Compression.NONE,
                                                                  point_filter=PointFilter.NONE), points),
        ("RAW_POINTS", "float32, shuffle, zstd (lossless)", RawPointsCodec(ValueFormat.FLOAT32), points),
        ("RAW_POINTS", "float16, shuffle, zstd", RawPointsCodec(ValueFormat.FLOAT16), points),
        ("RAW_POINTS", "int16, delta+shuffle, lz4", RawPointsCodec(compression=Compression.LZ4), points),
        ("KEYPOINT_FEATURES", "default (xyz f32, feat f16, zstd)", KeypointFeaturesCodec(), keypoints),
        (
            "KEYPOINT_FEATURES",
            "float32, none (COOPERNAUT)",
            KeypointFeaturesCodec(ValueFormat.FLOAT32, ValueFormat.FLOAT32, Compression.NONE),
            keypoints,
        ),
        (
            "KEYPOINT_FEATURES",
            "feat int8, zstd",
            KeypointFeaturesCodec(feature_fmt=ValueFormat.INT8),
            keypoints,
        ),
        ("SPARSE_BEV", "default (f16, zstd)", SparseBEVCodec(), bev),
        ("SPARSE_BEV", "int8, zstd", SparseBEVCodec(ValueFormat.INT8), bev),
        ("DETECTIONS", "default (f32, none)", DetectionsCodec(), detections),
        ("DETECTIONS", "f16, none", DetectionsCodec(ValueFormat.FLOAT16), detections),
        ("REQUEST_MAP", "default (zstd)", RequestMapCodec(), request),
        ("REQUEST_MAP", "none", RequestMapCodec(Compression.NONE), request),
    ]
    key = SigningKey.from_seed(frame.ego_id)
    registry = KeyRegistry()
    registry.register(frame.ego_id, key.public_key)
    channel = dsrc(6.0)

    print(
        f"\n1. bytes per message (keypoints K={args.keypoints} x C={args.keypoint_channels}; "
        f"BEV k={args.bev_cells} of {counts.size} cells x C={args.bev_channels}; "
        f"{len(detections.boxes)} boxes; request map {int(request.sum())} of {request.size} cells)"
    )
    print(
        f"{'codec':<18} {'settings':<36} {'items':>8} {'payload B':>10} {'unsigned B':>10} "
        f"{'signed B':>9} {'DSRC6 ms':>9} {'enc/s':>8} {'dec/s':>8}"
    )
    signed_messages = {}
    for name, settings, codec, data in cases:
        payload = codec.encode(data)
        msg = Message.from_pose(frame.ego_id, 1, 0, scan.T_world_from_sensor, codec.codec_id, payload)
        signed = sign_message(msg, key)
        items = _items(data)
        enc = rate(lambda codec=codec, data=data: codec.encode(data), args.min_time)
        dec = rate(lambda c=codec, p=payload: decode_payload(c.codec_id, p), args.min_time)
        print(
            f"{name:<18} {settings:<36} {items:>8,} {len(payload):>10,} {len(encode(msg)):>10,} "
            f"{len(encode(signed)):>9,} {channel.airtime_s(len(encode(signed))) * 1e3:>9.2f} "
            f"{enc:>8,.0f} {dec:>8,.0f}"
        )
        if settings.startswith("default"):
            signed_messages[name] = signed

    # ------------------------------------------------------------------ wire and signature speed
    print("\n2. messages per second (one core)")
    print(f"{'message':<18} {'bytes':>9} {'encode/s':>10} {'decode/s':>10} {'sign/s':>9} {'verify/s':>9}")
    for name, signed in signed_messages.items():
        data = encode(signed)
        unsigned = dataclasses.replace(signed, signature=b"")

        def verify_once(signed=signed) -> None:
            # a fresh verifier each time, so the replay window never refuses the repeat
            Verifier(registry).check(signed, 0)

        enc = rate(lambda signed=signed: encode(signed), args.min_time)
        dec = rate(lambda data=data: decode(data), args.min_time)
        sig = rate(lambda unsigned=unsigned: sign_message(unsigned, key), args.min_time)
        ver = rate(verify_once, args.min_time)
        assert Verifier(registry).check(signed, 0) is None
        print(f"{name:<18} {len(data):>9,} {enc:>10,.0f} {dec:>10,.0f} {sig:>9,.0f} {ver:>9,.0f}")

    # ------------------------------------------------------------------ delivery versus distance
    small = len(encode(signed_messages["DETECTIONS"]))
    large = len(encode(signed_messages["KEYPOINT_FEATURES"]))
    pc5 = lte_v2x_pc5()
    receivers, ticks = 400, 5
    print(
        f"\n3. delivery ratio vs distance, {channel.name} (Nakagami m = {channel.link.nakagami_m}; "
        f"packets of {channel.max_packet_bytes} B); Monte-Carlo: {receivers} receivers x {ticks} ticks "
        f"through the bus; LTE-V2X PC5 per-packet for comparison"
    )
    print(
        f"{'distance m':>10} {'packet':>8} {f'msg {small} B':>12} {'bus':>7} "
        f"{f'msg {large:,} B':>14} {'bus':>7} {'PC5 packet':>10}"
    )
    for distance in range(0, 325, 25):
        angles = np.linspace(0, 2 * np.pi, receivers, endpoint=False)
        pos = {0: np.zeros(3)} | {
            i + 1: distance * np.array([np.cos(a), np.sin(a), 0.0]) for i, a in enumerate(angles)
        }
        measured = []
        for size in (small, large):
            bus = BroadcastBus(channel, seed=args.seed)
            got = 0
            for tick in range(ticks):
                report = bus.step(tick, [(0, bytes(size))], pos)
                got += sum(len(report.received[r]) for r in pos if r != 0)
            measured.append(got / (receivers * ticks))
        print(
            f"{distance:>10} {float(channel.packet_success_probability(distance)):>8.3f} "
            f"{float(channel.message_success_probability(distance, small)):>12.3f} {measured[0]:>7.3f} "
            f"{float(channel.message_success_probability(distance, large)):>14.3f} {measured[1]:>7.3f} "
            f"{float(pc5.packet_success_probability(distance)):>10.3f}"
        )


def parse_args() -> BenchArgs:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = BenchArgs()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return BenchArgs(**vars(parser.parse_args()))


if __name__ == "__main__":
    main(parse_args())
