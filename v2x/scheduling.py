"""Who sends what this tick under an airtime budget.

Three policies, all pure and deterministic (ties broken by sender id, then offer order):

- :func:`equal_split`: every sender with something to offer gets ``budget / n_senders`` of
  airtime and sends its best offers (by value per second of airtime) that fit in its share;
  shares left unused are not passed on. The baseline.
- :func:`greedy_knapsack`: one 0/1 knapsack across all senders' offers (COOPERNAUT's
  value-per-byte selection across cars): take offers by decreasing value per airtime while they
  fit, and return the better of that and the single most valuable offer that fits, which
  guarantees at least half the optimal value.
- :func:`request_driven` (Where2comm / CORE): the ego says which BEV cells it needs
  (:func:`request_mask`, from its own confidence); each sender offers the requested cells it sees
  well; cells are granted by decreasing ``sender confidence x request weight``, each cell once
  across senders, while the growing messages fit the budget.

Costs are airtime from :meth:`v2x.channel.ChannelConfig.airtime_s` of each offer's full message
size (``len(encode(message))``), so per-packet overheads and fragmentation count.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from v2x.channel import ChannelConfig

__all__ = [
    "CellGrant",
    "Offer",
    "Schedule",
    "equal_split",
    "greedy_knapsack",
    "request_driven",
    "request_mask",
]


@dataclass(frozen=True)
class Offer:
    """A message a sender could put on air this tick.

    Attributes:
        sender_id: who would send it.
        nbytes: its wire size, ``len(encode(message))``.
        value: how much it is worth to the receivers (>= 0, any unit, the same for all offers).
        key: what it is, for the caller (e.g. a chunk index); schedulers only carry it along.
    """

    sender_id: int
    nbytes: int
    value: float
    key: Hashable = 0

    def __post_init__(self) -> None:
        if self.nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {self.nbytes}")
        if not self.value >= 0 or not np.isfinite(self.value):
            raise ValueError(f"value must be finite and >= 0, got {self.value}")


@dataclass(frozen=True)
class Schedule:
    """What goes on air.

    Attributes:
        selected: offers to transmit, in transmission order.
        airtime_s: their total airtime (<= budget_s).
        value: their total value.
        budget_s: the airtime budget they were chosen under.
    """

    selected: tuple[Offer, ...]
    airtime_s: float
    value: float
    budget_s: float


def _check_budget(budget_s: float) -> None:
    if not budget_s >= 0:
        raise ValueError(f"budget_s must be >= 0, got {budget_s}")


def _density_order(offers: Sequence[Offer], airtimes: Sequence[float]) -> list[int]:
    """Indices by decreasing value per second of airtime (free offers first), stable."""

    def density(i: int) -> float:
        return np.inf if airtimes[i] == 0 else offers[i].value / airtimes[i]

    return sorted(range(len(offers)), key=lambda i: (-density(i), offers[i].sender_id, i))


def _greedy(offers: Sequence[Offer], airtimes: Sequence[float], budget_s: float) -> list[int]:
    chosen, used = [], 0.0
    for i in _density_order(offers, airtimes):
        if used + airtimes[i] <= budget_s:
            chosen.append(i)
            used += airtimes[i]
    return chosen


def _schedule(
    offers: Sequence[Offer], airtimes: Sequence[float], chosen: list[int], budget_s: float
) -> Schedule:
    chosen = sorted(chosen, key=lambda i: (offers[i].sender_id, i))
    return Schedule(
        selected=tuple(offers[i] for i in chosen),
        airtime_s=float(sum(airtimes[i] for i in chosen)),
        value=float(sum(offers[i].value for i in chosen)),
        budget_s=budget_s,
    )


def equal_split(offers: Sequence[Offer], budget_s: float, channel: ChannelConfig) -> Schedule:
    """Each sender gets an equal share of ``budget_s`` and fills it greedily by value density."""
    _check_budget(budget_s)
    airtimes = [channel.airtime_s(o.nbytes) for o in offers]
    senders = sorted({o.sender_id for o in offers})
    chosen: list[int] = []
    for sender in senders:
        mine = [i for i, o in enumerate(offers) if o.sender_id == sender]
        picked = _greedy([offers[i] for i in mine], [airtimes[i] for i in mine], budget_s / len(senders))
        chosen.extend(mine[j] for j in picked)
    return _schedule(offers, airtimes, chosen, budget_s)


def greedy_knapsack(offers: Sequence[Offer], budget_s: float, channel: ChannelConfig) -> Schedule:
    """Offers across all senders by value per airtime, or the best single offer if worth more."""
    _check_budget(budget_s)
    airtimes = [channel.airtime_s(o.nbytes) for o in offers]
    chosen = _greedy(offers, airtimes, budget_s)
    fitting = [i for i in range(len(offers)) if airtimes[i] <= budget_s]
    if fitting:
        best = max(fitting, key=lambda i: (offers[i].value, -i))
        if offers[best].value > sum(offers[i].value for i in chosen):
            chosen = [best]
    return _schedule(offers, airtimes, chosen, budget_s)


# --------------------------------------------------------------------------------------------------
# Request-driven sending
# --------------------------------------------------------------------------------------------------


def request_mask(ego_confidence: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool: the cells the ego asks for, where its own confidence is below ``threshold``.

    Args:
        ego_confidence: (H, W) the ego's confidence that it perceives each cell (e.g. the max
            class score of its detection head, or its LiDAR visibility), in the shared BEV grid.
        threshold: cells below it are requested.
    """
    conf = np.asarray(ego_confidence, dtype=np.float64)
    if conf.ndim != 2:
        raise ValueError(f"ego_confidence must be (H, W), got shape {conf.shape}")
    return conf < threshold


@dataclass(frozen=True)
class CellGrant:
    """Result of :func:`request_driven`.

    Attributes:
        cells: per sender, (k,) int64 flat row-major indices of the cells it should send, sorted.
            Senders granted nothing are absent.
        airtime_s: total airtime of the granted messages.
        value: total ``confidence x request weight`` of the granted cells.
    """

    cells: dict[int, np.ndarray]
    airtime_s: float
    value: float


def request_driven(
    sender_confidence: Mapping[int, np.ndarray],
    request: np.ndarray,
    budget_s: float,
    channel: ChannelConfig,
    message_nbytes: Callable[[int], int],
    min_value: float = 0.0,
    deduplicate: bool = True,
) -> CellGrant:
    """Grant requested cells to senders, best first, within an airtime budget.

    Args:
        sender_confidence: per sender, (H, W) confidence of what it perceives in each cell, in
            the ego's BEV grid (senders' maps warped to the ego frame beforehand).
        request: (H, W) bool mask from :func:`request_mask`, or float weights in [0, 1].
        budget_s: airtime available to the senders' messages this tick (the request message's
            own airtime already subtracted by the caller).
        channel: the channel, for airtimes.
        message_nbytes: wire size of a message carrying k cells, e.g.
            ``lambda k: message_nbytes(SparseBEVCodec.uncompressed_nbytes(k, C, fmt), signed)``.
        min_value: cells worth no more than this are never sent.
        deduplicate: grant each cell to one sender at most (the most confident).

    Returns:
        The granted cells per sender.
    """
    _check_budget(budget_s)
    weights = np.asarray(request, dtype=np.float64)
    if weights.ndim != 2:
        raise ValueError(f"request must be (H, W), got shape {weights.shape}")
    senders = sorted(sender_confidence)
    values, owners, cells = [], [], []
    for sender in senders:
        conf = np.asarray(sender_confidence[sender], dtype=np.float64)
        if conf.shape != weights.shape:
            raise ValueError(f"sender {sender}: confidence {conf.shape} vs request {weights.shape}")
        value = (conf * weights).reshape(-1)
        idx = np.flatnonzero(value > min_value)
        values.append(value[idx])
        cells.append(idx)
        owners.append(np.full(len(idx), sender, dtype=np.int64))
    if not senders or not sum(len(v) for v in values):
        return CellGrant({}, 0.0, 0.0)
    values_all = np.concatenate(values)
    owners_all = np.concatenate(owners)
    cells_all = np.concatenate(cells)
    order = np.lexsort((cells_all, owners_all, -values_all))  # value desc, then sender, then cell

    # Airtime of each sender's message at its current cell count, and with one cell more; only
    # these are ever needed, since counts grow one cell at a time.
    count = dict.fromkeys(senders, 0)
    current = dict.fromkeys(senders, 0.0)
    following = {s: channel.airtime_s(message_nbytes(1)) for s in senders}
    granted: dict[int, list[int]] = {s: [] for s in senders}
    covered: set[int] = set()
    used = total_value = 0.0
    for j in order.tolist():
        sender, cell = int(owners_all[j]), int(cells_all[j])
        if deduplicate and cell in covered:
            continue
        increment = following[sender] - current[sender]
        if used + increment > budget_s:
            if all(used + following[s] - current[s] > budget_s for s in senders):
                break  # no sender can grow any more
            continue
        used += increment
        total_value += float(values_all[j])
        count[sender] += 1
        current[sender] = following[sender]
        following[sender] = channel.airtime_s(message_nbytes(count[sender] + 1))
        granted[sender].append(cell)
        covered.add(cell)
    return CellGrant(
        {s: np.sort(np.array(c, dtype=np.int64)) for s, c in granted.items() if c}, used, total_value
    )
