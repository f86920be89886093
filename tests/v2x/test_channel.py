"""Channel models: airtime arithmetic, packet error rate versus distance, sampling vs analysis."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v2x.channel import (
    DSRC_RATES_MBPS,
    DSRC_SENSITIVITY_DBM,
    ChannelConfig,
    LinkBudget,
    dsrc,
    ideal,
    lte_v2x_pc5,
    winner_b1_los_path_loss_db,
)

PRESETS = [dsrc(r) for r in DSRC_RATES_MBPS] + [lte_v2x_pc5(), ideal(), ideal(7.2e6)]


def test_dsrc_airtime_follows_the_ofdm_frame_arithmetic():
    # 802.11p at 6 Mbps on 10 MHz: 48 data bits per 8 us symbol. A 100-byte message is one packet
    # of 100 + 36 (MAC header, LLC/SNAP, FCS) bytes plus 22 SERVICE/tail bits = 1,110 bits, i.e.
    # ceil(1110 / 48) = 24 symbols, after a 40 us preamble+SIGNAL and 207.5 us of channel access
    # (AIFS 32 + 6 x 13 us, mean backoff 7.5 x 13 us).
    channel = dsrc(6.0)
    expected = 40e-6 + (32e-6 + 6 * 13e-6 + 7.5 * 13e-6) + 24 * 8e-6
    assert channel.airtime_s(100) == pytest.approx(expected, abs=1e-12)
    # 3,000 bytes: two full 1,500-byte packets
    assert channel.num_packets(3000) == 2
    assert channel.airtime_s(3000) == pytest.approx(2 * channel.packet_airtime_s(1500))


def test_ideal_airtime_is_bits_over_rate():
    channel = ideal(7.2e6)
    assert channel.airtime_s(65_536) == pytest.approx(65_536 * 8 / 7.2e6)
    assert ideal().airtime_s(10**7) == 0.0


def test_pc5_airtime_counts_whole_subframes():
    channel = lte_v2x_pc5()
    assert channel.max_packet_bytes == 3496 // 8
    assert channel.airtime_s(1) == pytest.approx(1e-3)
    assert channel.airtime_s(437) == pytest.approx(1e-3)
    assert channel.airtime_s(438) == pytest.approx(2e-3)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PRESETS), st.integers(0, 200_000), st.integers(0, 5000))
def test_airtime_is_monotone_and_sums_its_packets(channel, nbytes, extra):
    sizes = channel.packet_sizes(nbytes)
    assert sum(sizes) == nbytes and len(sizes) == channel.num_packets(nbytes)
    assert all(0 <= s <= channel.max_packet_bytes for s in sizes)
    assert channel.airtime_s(nbytes) == pytest.approx(sum(channel.packet_airtime_s(s) for s in sizes))
    assert channel.airtime_s(nbytes + extra) >= channel.airtime_s(nbytes) - 1e-15
    if not math.isinf(channel.data_rate_bps):
        # never faster than the raw bit rate
        assert channel.airtime_s(nbytes) >= 8 * nbytes / channel.data_rate_bps - 1e-12


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(PRESETS), st.lists(st.floats(0, 2000), min_size=2, max_size=50))
def test_packet_success_is_non_increasing_in_distance(channel, distances):
    d = np.sort(np.array(distances))
    p = channel.packet_success_probability(d)
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p) <= 1e-12)


def test_success_at_short_range_and_failure_far_away():
    for channel in PRESETS:
        assert channel.packet_success_probability(5.0) > 0.999
    for channel in (dsrc(), lte_v2x_pc5()):
        assert channel.packet_success_probability(1500.0) < 1e-6


def test_higher_rates_reach_less_far():
    d = np.linspace(20, 400, 40)
    curves = [dsrc(r).packet_success_probability(d) for r in DSRC_RATES_MBPS]
    for slower, faster in itertools.pairwise(curves):
        assert np.all(faster <= slower + 1e-12)


def test_range_limit_cuts_reception():
    channel = dsrc(6.0, max_range_m=100.0)
    assert channel.packet_success_probability(100.0) > 0.5
    assert channel.packet_success_probability(100.01) == 0.0
    assert ideal(max_range_m=50).packet_success_probability(np.array([49.0, 51.0])).tolist() == [1.0, 0.0]


def test_message_success_is_packet_success_to_the_number_of_packets():
    channel = dsrc()
    p = channel.packet_success_probability(140.0)
    assert channel.message_success_probability(140.0, 4000) == pytest.approx(p**3)
    assert channel.message_success_probability(140.0, 4000) < channel.message_success_probability(140.0, 400)


def test_sampled_fading_matches_the_analytic_probability():
    channel = dsrc()
    d = np.array([60.0, 130.0, 160.0, 190.0])
    rng = np.random.default_rng(0)
    n = 20_000
    rate = channel.sample_packets_received(d, n, rng).mean(axis=1)
    expected = channel.packet_success_probability(d)
    # binomial standard error is at most 0.0036 at n = 20,000; allow 5 of them
    np.testing.assert_allclose(rate, expected, atol=0.018)


def test_sampling_is_deterministic_per_seed():
    channel = lte_v2x_pc5()
    d = np.linspace(100, 400, 7)
    a = channel.sample_packets_received(d, 50, np.random.default_rng(5))
    b = channel.sample_packets_received(d, 50, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


def test_winner_b1_is_continuous_at_the_breakpoint_and_increasing():
    # breakpoint d' = 4 h' h' f / c with h' = 0.5 m at 5.9 GHz: about 19.7 m
    d_bp = 4 * 0.5 * 0.5 * 5.9e9 / 299_792_458.0
    below, above = winner_b1_los_path_loss_db(np.array([d_bp - 1e-6, d_bp + 1e-6]))
    assert abs(above - below) < 0.05
    d = np.linspace(1, 3000, 500)
    assert np.all(np.diff(winner_b1_los_path_loss_db(d)) >= 0)
    # free-space-like slope near, fourth-power law far: 40 dB per decade beyond the breakpoint
    assert winner_b1_los_path_loss_db(1000.0) - winner_b1_los_path_loss_db(100.0) == pytest.approx(40.0)


def test_no_fading_is_a_sharp_threshold():
    link = LinkBudget(tx_power_dbm=20, antenna_gain_dbi=0, sensitivity_dbm=-80, nakagami_m=None)
    channel = ChannelConfig("sharp", 6e6, link=link)
    p = channel.packet_success_probability(np.linspace(5, 500, 100))
    assert set(np.unique(p)) <= {0.0, 1.0}
    assert np.all(np.diff(p) <= 0)


def test_dsrc_sensitivities_follow_the_standard_order():
    values = [DSRC_SENSITIVITY_DBM[r] for r in DSRC_RATES_MBPS]
    assert DSRC_RATES_MBPS[0] == 3.0 and DSRC_RATES_MBPS[-1] == 27.0
    assert values == sorted(values)  # faster rates need more power
    with pytest.raises(ValueError):
        dsrc(54.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data_rate_bps": 0},
        {"data_rate_bps": math.inf, "symbol_s": 8e-6},
        {"max_packet_bytes": 0},
        {"max_range_m": 0},
        {"per_packet_overhead_s": -1},
        {"processing_delay_s": math.inf},
    ],
)
def test_invalid_configs_are_refused(kwargs):
    fields = {"name": "x", "data_rate_bps": 1e6} | kwargs
    with pytest.raises(ValueError):
        ChannelConfig(**fields)


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError):
        dsrc().packet_success_probability(-1.0)
    with pytest.raises(ValueError):
        dsrc().num_packets(-5)
    with pytest.raises(ValueError):
        LinkBudget(20, 3, -82, nakagami_m=0.2)
