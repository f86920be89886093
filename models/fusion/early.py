"""Early fusion: the agents' raw points travel; the ego voxelises the merged cloud.

Each other agent encodes its scan (own sensor frame) with :class:`v2x.codecs.RawPointsCodec`; the
ego decodes what arrives, moves it with the pose from the message header and appends it to its own
points. Quantisation of the codec (int16 per column by default, about 2 mm) is therefore part of
what the model sees.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from datasets.collate import CoopBatch
from models.comm import MessageRecord, Outgoing, V2XLink
from sim.geometry import transform_points
from v2x.codecs import RawPointsCodec
from v2x.message import CodecId

__all__ = ["share_points"]


def share_points(
    batch: CoopBatch,
    link: V2XLink,
    records: list[list[MessageRecord]],
    codec: RawPointsCodec | None = None,
    on_senders: Callable[[], AbstractContextManager] | None = None,
) -> list[torch.Tensor]:
    """Merged cloud of every sample in its ego frame.

    Args:
        batch: the batch (points in each agent's own frame).
        link: the V2X link.
        records: one list per sample; each message sent is appended to its sample's list.
        codec: point codec (default :class:`RawPointsCodec` defaults).
        on_senders: context around the senders' own work (their codec encoding), so that a
            latency measurement can tell it from the ego's (:class:`models.perception.SenderClock`).

    Returns:
        B tensors (N_b, 4) float32 on the batch's device: ego points, then the received ones.
    """
    codec = codec or RawPointsCodec()
    device = batch.points.device
    offsets = batch.ego_agent_index.tolist()
    counts = batch.agents_per_sample.tolist()
    T_measured = batch.T_ego_from_agent_measured.cpu().numpy()
    positions = batch.agent_position_m.cpu().numpy()
    out = []
    for s, (first, n) in enumerate(zip(offsets, counts, strict=True)):
        info = batch.info[s]
        clouds = [batch.agent_points(first)]
        outgoing = []
        with on_senders() if on_senders is not None else nullcontext():
            for k in range(1, n):
                pts = batch.agent_points(first + k).detach().cpu().numpy()
                outgoing.append(
                    Outgoing(info.agent_ids[k], T_measured[first + k], CodecId.RAW_POINTS, codec.encode(pts))
                )
        where = (info.run, info.frame, info.ego_id)
        agent_positions = {info.agent_ids[k]: positions[first + k] for k in range(n)}
        for message in link.exchange(outgoing, info.ego_id, agent_positions, where, records=records[s]):
            pts = transform_points(message.T_ref_from_sender, np.asarray(message.content, dtype=np.float32))
            clouds.append(torch.from_numpy(np.ascontiguousarray(pts)).to(device))
        out.append(torch.cat(clouds))
    return out
