"""Physical channel models: airtime per message, packet error rate versus distance, presets.

A :class:`ChannelConfig` answers two questions, both pure functions of its fields:

- **Airtime.** A message of B bytes is split into ``ceil(B / max_packet_bytes)`` packets (at
  least one). Each packet costs a fixed ``per_packet_overhead_s`` (PHY preamble, channel access)
  plus its bits, ``8 * bytes + per_packet_overhead_bits`` (MAC framing), at ``data_rate_bps``,
  rounded up to whole transmission units of ``symbol_s`` when the PHY has them (an 802.11p OFDM
  symbol, an LTE subframe). Airtime is what schedulers budget; the bus serialises it.
- **Loss.** The mean received power is ``tx power + 2 x antenna gain - path loss(d)`` with the
  WINNER+ B1 line-of-sight path loss; each packet sees one Nakagami-m fading draw of that
  power (block fading; the variation within a packet is not modelled), independent between
  packets, which is fair when packets are further apart than the coherence time (about 1.5 ms
  at 5.9 GHz and a relative speed of 50 km/h), and is received when the faded power reaches
  the receiver sensitivity of the chosen rate.
  So a packet's success probability at distance d is ``Q(m, m * S / P(d))``, the regularised
  upper incomplete gamma function, and a message succeeds only if all its packets do. Beyond
  ``max_range_m`` nothing is received. The probability is non-increasing in distance because the
  path loss is increasing and m is held constant (a distance-dependent m, as ns-3 allows, would
  make it jump upward where m drops beyond the median range).

Not modelled: shadowing, interference and collisions between senders (the bus serialises
transmissions on one shared medium instead), half-duplex loss, retransmissions (802.11p
broadcast has none; PC5 blind retransmissions are not used here).

Presets and where their numbers come from:

- :func:`dsrc` (802.11p, 10 MHz channel): rates 3-27 Mbps and receiver sensitivities from IEEE
  Std 802.11-2016 Table 17-18 (minimum input sensitivity, 10 MHz channel spacing: -85, -84, -82,
  -80, -77, -73, -69, -68 dBm for 3, 4.5, 6, 9, 12, 18, 24, 27 Mbps); OFDM timing for 10 MHz
  from Table 17-5 (preamble 32 us, SIGNAL 8 us, symbol 8 us, SERVICE 16 + tail 6 bits);
  channel access with the OCB EDCA parameters of AC_BE (AIFSN 6, CWmin 15, aSlotTime 13 us,
  aSIFSTime 32 us: AIFS = 110 us, mean backoff 7.5 slots); 802.11 data header 24 B + LLC/SNAP
  8 B + FCS 4 B; transmit power 20 dBm (802.11p power class C). 6 Mbps is the default rate of
  the control channel.
- :func:`lte_v2x_pc5` (LTE-V2X sidelink, 10 MHz): the reference measurement channel of 3GPP
  TS 36.101 Table A.8.2-1 (48 resource blocks, QPSK, code rate 1/3, transport block of 3,496
  bits per 1 ms subframe, i.e. 3.5 Mbps) and its reference sensitivity, -90.4 dBm for band 47 at
  10 MHz (TS 36.101 / TS 36.521-1 Table 7.3G); 23 dBm transmit power (3GPP TR 36.885 V2X
  evaluation assumptions). Semi-persistent scheduling reserves resources ahead, so there is no
  per-packet contention overhead; sidelink MAC/RLC/PDCP headers (a few bytes) are not counted.
- Both: 5.9 GHz carrier, antennas 1.5 m high with 3 dBi gain, WINNER+ B1 LOS path loss, as in
  the V2V evaluation assumptions of 3GPP TR 36.885 (Annex A), and Nakagami m = 1.5, the ns-3
  ``NakagamiPropagationLossModel`` default below 80 m (``m0``), which follows the 5.9 GHz V2V
  measurements of Cheng et al., IEEE JSAC 25(8), 2007.
- :func:`ideal`: no loss, no range limit, a configurable rate (infinite by default: zero
  airtime), no per-packet overhead.

WINNER+ B1 LOS (WINNER+ D5.3, 2010; the WINNER II B1 form with effective antenna heights
h' = h - 1 m), with d in metres, f_c in GHz, breakpoint d'_BP = 4 h'_tx h'_rx f_c / c::

    PL = 22.7 log10(d) + 41.0 + 20 log10(f_c / 5)                       for d <= d'_BP
    PL = 40 log10(d) + 9.45 - 17.3 log10(h'_tx h'_rx) + 2.7 log10(f_c / 5)  for d > d'_BP

Distances below 3 m are evaluated at 3 m (the model is not meant for the near field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DSRC_RATES_MBPS",
    "DSRC_SENSITIVITY_DBM",
    "ChannelConfig",
    "LinkBudget",
    "dsrc",
    "ideal",
    "lte_v2x_pc5",
    "winner_b1_los_path_loss_db",
]

SPEED_OF_LIGHT_M_S = 299_792_458.0

# IEEE Std 802.11-2016, Table 17-18, 10 MHz channel spacing: Mbps -> minimum sensitivity, dBm.
DSRC_SENSITIVITY_DBM: dict[float, float] = {
    3.0: -85.0,
    4.5: -84.0,
    6.0: -82.0,
    9.0: -80.0,
    12.0: -77.0,
    18.0: -73.0,
    24.0: -69.0,
    27.0: -68.0,
}
DSRC_RATES_MBPS = tuple(DSRC_SENSITIVITY_DBM)

# 802.11 OFDM PHY at 10 MHz (IEEE Std 802.11-2016, Table 17-5) and OCB EDCA for AC_BE.
_DSRC_SYMBOL_S = 8e-6
_DSRC_PREAMBLE_S = 32e-6 + 8e-6  # PLCP preamble + SIGNAL
_DSRC_SLOT_S = 13e-6
_DSRC_SIFS_S = 32e-6
_DSRC_AIFSN_BE = 6
_DSRC_CWMIN_BE = 15
_DSRC_ACCESS_S = _DSRC_SIFS_S + _DSRC_AIFSN_BE * _DSRC_SLOT_S + _DSRC_CWMIN_BE / 2 * _DSRC_SLOT_S
_DSRC_SERVICE_TAIL_BITS = 16 + 6
_DSRC_MAC_BYTES = 24 + 8 + 4  # data header + LLC/SNAP + FCS
_DSRC_MAX_PACKET_BYTES = 1500  # an Ethernet-sized MSDU, below 802.11's 2,304-byte limit

# LTE-V2X PC5, TS 36.101 Table A.8.2-1 (10 MHz, 48 RB, QPSK 1/3): one transport block a subframe.
_PC5_TBS_BITS = 3496
_PC5_SUBFRAME_S = 1e-3
_PC5_REFSENS_DBM = -90.4

_MIN_DISTANCE_M = 3.0


def winner_b1_los_path_loss_db(
    distance_m: np.ndarray | float,
    carrier_hz: float = 5.9e9,
    tx_height_m: float = 1.5,
    rx_height_m: float = 1.5,
) -> np.ndarray:
    """WINNER+ B1 line-of-sight path loss in dB (see the module docstring), same shape as input."""
    d = np.maximum(np.asarray(distance_m, dtype=np.float64), _MIN_DISTANCE_M)
    if tx_height_m <= 1.0 or rx_height_m <= 1.0:
        raise ValueError("WINNER+ B1 needs antenna heights above 1 m (effective height h - 1 m)")
    fc_ghz = carrier_hz / 1e9
    h_tx, h_rx = tx_height_m - 1.0, rx_height_m - 1.0
    d_bp = 4.0 * h_tx * h_rx * carrier_hz / SPEED_OF_LIGHT_M_S
    near = 22.7 * np.log10(d) + 41.0 + 20.0 * np.log10(fc_ghz / 5.0)
    far = (
        40.0 * np.log10(d)
        + 9.45
        - 17.3 * np.log10(h_tx)
        - 17.3 * np.log10(h_rx)
        + 2.7 * np.log10(fc_ghz / 5.0)
    )
    return np.where(d <= d_bp, near, far)


@dataclass(frozen=True)
class LinkBudget:
    """Power budget of one link class.

    Attributes:
        tx_power_dbm: transmit power.
        antenna_gain_dbi: gain of each antenna (counted at both ends).
        sensitivity_dbm: received power at which a packet of the chosen rate is decoded.
        carrier_hz: centre frequency.
        antenna_height_m: height of both antennas above ground (> 1 m for WINNER+ B1).
        nakagami_m: fading depth (m = 1 is Rayleigh; larger is milder); None for no fading.
    """

    tx_power_dbm: float
    antenna_gain_dbi: float
    sensitivity_dbm: float
    carrier_hz: float = 5.9e9
    antenna_height_m: float = 1.5
    nakagami_m: float | None = 1.5

    def __post_init__(self) -> None:
        if self.antenna_height_m <= 1.0:
            raise ValueError(f"antenna_height_m must be > 1 m, got {self.antenna_height_m}")
        if self.carrier_hz <= 0:
            raise ValueError(f"carrier_hz must be > 0, got {self.carrier_hz}")
        if self.nakagami_m is not None and not self.nakagami_m >= 0.5:
            raise ValueError(f"nakagami_m must be >= 0.5 (Nakagami's lower limit), got {self.nakagami_m}")

    def mean_rx_power_dbm(self, distance_m: np.ndarray | float) -> np.ndarray:
        """Mean received power at ``distance_m`` (before fading), dBm."""
        path_loss = winner_b1_los_path_loss_db(
            distance_m, self.carrier_hz, self.antenna_height_m, self.antenna_height_m
        )
        return self.tx_power_dbm + 2.0 * self.antenna_gain_dbi - path_loss

    def fading_threshold(self, distance_m: np.ndarray | float) -> np.ndarray:
        """Power gain x = sensitivity / mean power (linear): a packet is received iff its fading
        gain (mean 1) is at least x."""
        return 10.0 ** ((self.sensitivity_dbm - self.mean_rx_power_dbm(distance_m)) / 10.0)


@dataclass(frozen=True)
class ChannelConfig:
    """A shared radio channel: how long messages take on air and how likely they arrive.

    Attributes:
        name: preset name, for reports.
        data_rate_bps: PHY data rate; ``math.inf`` for zero airtime.
        symbol_s: duration of the PHY's transmission unit; packets are rounded up to whole units
            (0: no rounding, airtime = bits / rate).
        per_packet_overhead_s: fixed time per packet (preamble, channel access).
        per_packet_overhead_bits: framing bits per packet on top of its bytes (MAC header, FCS,
            PHY service and tail bits).
        max_packet_bytes: largest packet payload; longer messages are split.
        max_range_m: nothing is received beyond this distance.
        link: power budget and fading; None for a loss-free link.
        processing_delay_s: receiver time to decode and verify a message, added to its latency.
    """

    name: str
    data_rate_bps: float
    symbol_s: float = 0.0
    per_packet_overhead_s: float = 0.0
    per_packet_overhead_bits: int = 0
    max_packet_bytes: int = 1500
    max_range_m: float = math.inf
    link: LinkBudget | None = None
    processing_delay_s: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not self.data_rate_bps > 0:
            problems.append(f"data_rate_bps must be > 0, got {self.data_rate_bps}")
        if not self.symbol_s >= 0 or math.isinf(self.symbol_s):
            problems.append(f"symbol_s must be finite and >= 0, got {self.symbol_s}")
        if math.isinf(self.data_rate_bps) and self.symbol_s > 0:
            problems.append("an infinite data rate cannot have transmission units (symbol_s > 0)")
        if not 0 <= self.per_packet_overhead_s < math.inf:
            problems.append(f"per_packet_overhead_s must be finite, >= 0: {self.per_packet_overhead_s}")
        if self.per_packet_overhead_bits < 0:
            problems.append(f"per_packet_overhead_bits must be >= 0, got {self.per_packet_overhead_bits}")
        if self.max_packet_bytes < 1:
            problems.append(f"max_packet_bytes must be >= 1, got {self.max_packet_bytes}")
        if not self.max_range_m > 0:
            problems.append(f"max_range_m must be > 0, got {self.max_range_m}")
        if not 0 <= self.processing_delay_s < math.inf:
            problems.append(f"processing_delay_s must be finite and >= 0, got {self.processing_delay_s}")
        if problems:
            raise ValueError(f"invalid ChannelConfig {self.name!r}: " + "; ".join(problems))

    # ---------------------------------------------------------------------------------- airtime

    def num_packets(self, nbytes: int) -> int:
        """Packets a message of ``nbytes`` is split into (at least one)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        return max(1, -(-nbytes // self.max_packet_bytes))

    def packet_sizes(self, nbytes: int) -> list[int]:
        """Payload bytes of each packet of a message of ``nbytes``."""
        n = self.num_packets(nbytes)
        full, last = divmod(nbytes, self.max_packet_bytes)
        return [self.max_packet_bytes] * full + ([last] if n > full else [])

    def packet_airtime_s(self, packet_bytes: int) -> float:
        """Airtime of one packet carrying ``packet_bytes`` of message."""
        if not 0 <= packet_bytes <= self.max_packet_bytes:
            raise ValueError(f"packet_bytes must be in [0, {self.max_packet_bytes}], got {packet_bytes}")
        bits = 8 * packet_bytes + self.per_packet_overhead_bits
        if math.isinf(self.data_rate_bps):
            return self.per_packet_overhead_s
        if self.symbol_s > 0:
            bits_per_unit = self.data_rate_bps * self.symbol_s
            units = math.ceil(bits / bits_per_unit - 1e-9)
            return self.per_packet_overhead_s + units * self.symbol_s
        return self.per_packet_overhead_s + bits / self.data_rate_bps

    def airtime_s(self, nbytes: int) -> float:
        """Airtime of a whole message of ``nbytes`` (all its packets, back to back)."""
        n = self.num_packets(nbytes)
        full, last = divmod(nbytes, self.max_packet_bytes)
        total = full * self.packet_airtime_s(self.max_packet_bytes)
        if n > full:
            total += self.packet_airtime_s(last)
        return total

    # ------------------------------------------------------------------------------------- loss

    def packet_success_probability(self, distance_m: np.ndarray | float) -> np.ndarray:
        """Probability that one packet is received at ``distance_m``; float64, input's shape."""
        d = np.asarray(distance_m, dtype=np.float64)
        if np.any(d < 0) or not np.all(np.isfinite(d)):
            raise ValueError("distances must be finite and >= 0")
        in_range = d <= self.max_range_m
        if self.link is None:
            return in_range.astype(np.float64)
        x = self.link.fading_threshold(d)
        if self.link.nakagami_m is None:
            p = (x <= 1.0).astype(np.float64)
        else:
            p = _gamma_upper_regularized(self.link.nakagami_m, self.link.nakagami_m * x)
        return np.where(in_range, p, 0.0)

    def message_success_probability(self, distance_m: np.ndarray | float, nbytes: int) -> np.ndarray:
        """Probability that every packet of a message of ``nbytes`` is received."""
        return self.packet_success_probability(distance_m) ** self.num_packets(nbytes)

    def sample_packets_received(
        self, distance_m: np.ndarray, num_packets: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Draw the fate of ``num_packets`` packets on each link.

        Args:
            distance_m: (L,) link distances.
            num_packets: packets per link.
            rng: the randomness.

        Returns:
            (L, num_packets) bool, True where a packet is received. Fading gains are drawn as
            Gamma(m, 1/m) (the Nakagami-m power distribution, mean 1), one per packet.
        """
        d = np.asarray(distance_m, dtype=np.float64).reshape(-1)
        in_range = (d <= self.max_range_m)[:, None]
        shape = (len(d), num_packets)
        if self.link is None:
            return np.broadcast_to(in_range, shape).copy()
        x = self.link.fading_threshold(d)[:, None]
        if self.link.nakagami_m is None:
            gains = np.ones(shape)
        else:
            m = self.link.nakagami_m
            gains = rng.gamma(m, 1.0 / m, size=shape)
        return (gains >= x) & in_range


def _gamma_upper_regularized(a: float, x: np.ndarray) -> np.ndarray:
    """Q(a, x) = Gamma(a, x) / Gamma(a), elementwise, float64.

    numpy has no incomplete gamma function; torch (a project dependency) has a maintained one.
    """
    import torch  # imported here: only analytic probabilities need it, sampling does not

    x = np.asarray(x, dtype=np.float64)
    x_t = torch.from_numpy(np.ascontiguousarray(x).reshape(-1))
    a_t = torch.full_like(x_t, float(a))
    return torch.special.gammaincc(a_t, x_t).numpy().reshape(x.shape)


# ------------------------------------------------------------------------------------------ presets


def dsrc(
    rate_mbps: float = 6.0, max_range_m: float = 1000.0, processing_delay_s: float = 1e-3
) -> ChannelConfig:
    """IEEE 802.11p / DSRC on a 10 MHz channel at one of its rates (3-27 Mbps, default 6).

    Sources of every number: see the module docstring.
    """
    if rate_mbps not in DSRC_SENSITIVITY_DBM:
        raise ValueError(f"802.11p 10 MHz rates are {DSRC_RATES_MBPS} Mbps, got {rate_mbps}")
    return ChannelConfig(
        name=f"dsrc-{rate_mbps:g}mbps",
        data_rate_bps=rate_mbps * 1e6,
        symbol_s=_DSRC_SYMBOL_S,
        per_packet_overhead_s=_DSRC_PREAMBLE_S + _DSRC_ACCESS_S,
        per_packet_overhead_bits=8 * _DSRC_MAC_BYTES + _DSRC_SERVICE_TAIL_BITS,
        max_packet_bytes=_DSRC_MAX_PACKET_BYTES,
        max_range_m=max_range_m,
        link=LinkBudget(
            tx_power_dbm=20.0, antenna_gain_dbi=3.0, sensitivity_dbm=DSRC_SENSITIVITY_DBM[rate_mbps]
        ),
        processing_delay_s=processing_delay_s,
    )


def lte_v2x_pc5(max_range_m: float = 1000.0, processing_delay_s: float = 1e-3) -> ChannelConfig:
    """LTE-V2X sidelink (PC5) on a 10 MHz channel, QPSK 1/3 over 48 resource blocks.

    Sources of every number: see the module docstring.
    """
    return ChannelConfig(
        name="lte-v2x-pc5",
        data_rate_bps=_PC5_TBS_BITS / _PC5_SUBFRAME_S,
        symbol_s=_PC5_SUBFRAME_S,
        max_packet_bytes=_PC5_TBS_BITS // 8,
        max_range_m=max_range_m,
        link=LinkBudget(tx_power_dbm=23.0, antenna_gain_dbi=3.0, sensitivity_dbm=_PC5_REFSENS_DBM),
        processing_delay_s=processing_delay_s,
    )


def ideal(data_rate_bps: float = math.inf, max_range_m: float = math.inf) -> ChannelConfig:
    """A loss-free link: no fading, no overhead, optional finite rate (e.g. COOPERNAUT's 7.2e6)."""
    return ChannelConfig(
        name="ideal" if math.isinf(data_rate_bps) else f"ideal-{data_rate_bps / 1e6:g}mbps",
        data_rate_bps=data_rate_bps,
        max_packet_bytes=2**31 - 1,
        max_range_m=max_range_m,
    )
