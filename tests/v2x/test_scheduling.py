"""Scheduling: budgets hold, the knapsack is within half of optimal, requests are honoured."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v2x.channel import dsrc, ideal
from v2x.codecs import SparseBEVCodec
from v2x.message import message_nbytes
from v2x.quantize import ValueFormat
from v2x.scheduling import Offer, equal_split, greedy_knapsack, request_driven, request_mask

CHANNEL = dsrc(6.0)
offers_strategy = st.lists(
    st.builds(
        Offer,
        sender_id=st.integers(0, 3),
        nbytes=st.integers(0, 20_000),
        value=st.floats(0, 100, allow_nan=False),
    ),
    max_size=9,
)


def _best_value(offers, budget_s):
    """Optimal 0/1 knapsack value by enumeration (small instances only)."""
    airtimes = [CHANNEL.airtime_s(o.nbytes) for o in offers]
    best = 0.0
    for r in range(len(offers) + 1):
        for subset in itertools.combinations(range(len(offers)), r):
            if sum(airtimes[i] for i in subset) <= budget_s:
                best = max(best, sum(offers[i].value for i in subset))
    return best


@settings(max_examples=150, deadline=None)
@given(offers_strategy, st.floats(0, 0.1))
def test_knapsack_fits_the_budget_and_is_half_optimal(offers, budget_s):
    schedule = greedy_knapsack(offers, budget_s, CHANNEL)
    assert schedule.airtime_s <= budget_s + 1e-12
    assert schedule.airtime_s == pytest.approx(sum(CHANNEL.airtime_s(o.nbytes) for o in schedule.selected))
    assert schedule.value == pytest.approx(sum(o.value for o in schedule.selected))
    assert schedule.value >= 0.5 * _best_value(offers, budget_s) - 1e-9


@settings(max_examples=150, deadline=None)
@given(offers_strategy, st.floats(0, 0.1))
def test_equal_split_keeps_every_sender_in_its_share(offers, budget_s):
    schedule = equal_split(offers, budget_s, CHANNEL)
    senders = {o.sender_id for o in offers}
    share = budget_s / max(len(senders), 1)
    for sender in senders:
        mine = [o for o in schedule.selected if o.sender_id == sender]
        assert sum(CHANNEL.airtime_s(o.nbytes) for o in mine) <= share + 1e-12
    if len(senders) == 1:  # one sender's share is the whole budget: the knapsack can only do better
        assert schedule.value <= greedy_knapsack(offers, budget_s, CHANNEL).value + 1e-9


def test_knapsack_prefers_value_per_airtime_across_senders():
    # one big valuable message vs many small ones worth more in total per second of airtime
    offers = [Offer(1, 60_000, 10.0, "big")] + [Offer(s, 1_000, 4.0, f"small{s}") for s in (2, 3, 4)]
    budget = CHANNEL.airtime_s(60_000)
    schedule = greedy_knapsack(offers, budget, CHANNEL)
    assert {o.key for o in schedule.selected} == {"small2", "small3", "small4"}
    # with a budget for the big one only, the single best item wins over the greedy pick
    only_big = greedy_knapsack([Offer(1, 60_000, 10.0), Offer(2, 100, 0.1)], budget, CHANNEL)
    assert only_big.value == pytest.approx(10.0)


def test_equal_split_wastes_unused_shares_where_knapsack_does_not():
    offers = [Offer(1, 30_000, 5.0), Offer(2, 100, 1.0)]
    budget = CHANNEL.airtime_s(30_000) + CHANNEL.airtime_s(100)
    # sender 1's message does not fit in half the budget, so equal split drops it
    assert [o.sender_id for o in equal_split(offers, budget, CHANNEL).selected] == [2]
    assert greedy_knapsack(offers, budget, CHANNEL).value == pytest.approx(6.0)


def test_schedules_are_deterministic_and_ordered_by_sender():
    offers = [Offer(s, 500 * (s + 1), float(s % 3), s) for s in range(8)]
    a = greedy_knapsack(offers, 0.01, CHANNEL)
    b = greedy_knapsack(list(offers), 0.01, CHANNEL)
    assert a == b
    ids = [o.sender_id for o in a.selected]
    assert ids == sorted(ids)


def test_negative_budget_and_bad_offers_are_refused():
    with pytest.raises(ValueError):
        greedy_knapsack([], -1.0, CHANNEL)
    with pytest.raises(ValueError):
        Offer(1, -1, 1.0)
    with pytest.raises(ValueError):
        Offer(1, 10, float("nan"))


# --------------------------------------------------------------------------------- request-driven


def _bev_nbytes(channels=16, fmt=ValueFormat.FLOAT16):
    return lambda k: message_nbytes(SparseBEVCodec.uncompressed_nbytes(k, channels, fmt), signed=True)


def test_request_mask_marks_low_confidence_cells():
    conf = np.array([[0.9, 0.1], [0.5, 0.2]])
    np.testing.assert_array_equal(request_mask(conf, 0.3), [[False, True], [False, True]])


def test_request_driven_sends_only_requested_cells_within_budget():
    rng = np.random.default_rng(0)
    ego = rng.uniform(size=(20, 30))
    request = request_mask(ego, 0.3)
    senders = {s: rng.uniform(size=(20, 30)) for s in (3, 5, 9)}
    budget = 0.004
    grant = request_driven(senders, request, budget, CHANNEL, _bev_nbytes(), min_value=0.5)
    assert grant.airtime_s <= budget
    recomputed = sum(CHANNEL.airtime_s(_bev_nbytes()(len(c))) for c in grant.cells.values())
    assert grant.airtime_s == pytest.approx(recomputed)
    all_cells = np.concatenate(list(grant.cells.values()))
    assert len(np.unique(all_cells)) == len(all_cells)  # each cell granted once
    for sender, cells in grant.cells.items():
        assert np.all(request.reshape(-1)[cells])
        assert np.all(senders[sender].reshape(-1)[cells] > 0.5)
        assert np.all(np.diff(cells) > 0)


def test_request_driven_with_ample_budget_grants_each_cell_to_its_best_sender():
    rng = np.random.default_rng(1)
    request = request_mask(rng.uniform(size=(8, 8)), 0.5)
    senders = {1: rng.uniform(size=(8, 8)), 2: rng.uniform(size=(8, 8))}
    grant = request_driven(senders, request, 10.0, ideal(), _bev_nbytes())
    owner = np.where(senders[1] >= senders[2], 1, 2).reshape(-1)
    requested = np.flatnonzero(request)
    for sender in (1, 2):
        np.testing.assert_array_equal(grant.cells[sender], requested[owner[requested] == sender])
    assert grant.value == pytest.approx(np.maximum(senders[1], senders[2]).reshape(-1)[requested].sum())


def test_request_driven_without_deduplication_lets_senders_overlap():
    request = np.ones((4, 4), bool)
    senders = {1: np.ones((4, 4)), 2: np.ones((4, 4))}
    grant = request_driven(senders, request, 10.0, ideal(), _bev_nbytes(), deduplicate=False)
    assert len(grant.cells[1]) == len(grant.cells[2]) == 16


def test_request_driven_with_no_budget_or_no_request_grants_nothing():
    senders = {1: np.ones((4, 4))}
    assert request_driven(senders, np.ones((4, 4), bool), 0.0, CHANNEL, _bev_nbytes()).cells == {}
    assert request_driven(senders, np.zeros((4, 4), bool), 1.0, CHANNEL, _bev_nbytes()).cells == {}
    with pytest.raises(ValueError):
        request_driven({1: np.ones((3, 4))}, np.ones((4, 4), bool), 1.0, CHANNEL, _bev_nbytes())
