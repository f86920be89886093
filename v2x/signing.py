"""Message signing and verification: ECDSA over NIST P-256 with SHA-256, as IEEE 1609.2 signs.

A sender signs ``Message.signing_input()`` (header with the signed flag set, then payload); the
64-byte signature is r || s, two 32-byte big-endian integers, the fixed-size form 1609.2 carries
(its ``EcdsaP256Signature``). What 1609.2 adds around it is not reproduced: the signer is named
by the 4-byte sender id in our header and its public key is looked up in a :class:`KeyRegistry`
of trusted senders (keys distributed in advance), instead of an attached certificate or its
8-byte digest.

Signatures are deterministic (RFC 6979 nonces), so the same message and key give the same bytes,
in keeping with "same seed, same bytes". Signing can be switched off for training speed: an
unsigned message is 64 bytes shorter and its header flag says it is unsigned, and a
:class:`Verifier` with ``require_signature=False`` accepts it.

The verifier rejects, and counts by :class:`RejectReason`: unsigned messages (when signatures are
required), unknown senders, forged or corrupted signatures, stale or future timestamps outside a
configurable window, and replays, with a sliding anti-replay window over sequence numbers as in
IPsec (RFC 4303, section 3.4.3) so that messages reordered by the channel are still accepted once.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from v2x.message import SIGNATURE_BYTES, Message

__all__ = [
    "KeyRegistry",
    "RejectReason",
    "SigningKey",
    "Verifier",
    "VerifierConfig",
    "sign_message",
    "verify_signature",
]

_CURVE = ec.SECP256R1()
# Order of the P-256 base point (FIPS 186-4, D.1.2.3): private scalars live in [1, n - 1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_SIGN_ALGORITHM = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_VERIFY_ALGORITHM = ec.ECDSA(hashes.SHA256())


class SigningKey:
    """A sender's P-256 private key."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError(f"expected a P-256 key, got curve {private_key.curve.name}")
        self._private_key = private_key

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key from the operating system's randomness."""
        return cls(ec.generate_private_key(_CURVE))

    @classmethod
    def from_seed(cls, seed: int) -> SigningKey:
        """A key derived deterministically from an integer seed (SHA-256 of the seed, reduced into
        [1, n - 1]). For reproducible simulations only: anyone who knows the seed has the key."""
        digest = hashlib.sha256(b"v2x.signing.from_seed" + int(seed).to_bytes(16, "little", signed=True))
        scalar = int.from_bytes(digest.digest(), "big") % (_P256_ORDER - 1) + 1
        return cls(ec.derive_private_key(scalar, _CURVE))

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._private_key.public_key()

    def public_bytes(self) -> bytes:
        """33-byte compressed SEC1 encoding of the public key (what 1609.2 certificates carry)."""
        return self.public_key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)

    def sign(self, data: bytes) -> bytes:
        """64-byte r || s signature of ``data`` (ECDSA P-256, SHA-256, RFC 6979 nonce)."""
        r, s = decode_dss_signature(self._private_key.sign(data, _SIGN_ALGORITHM))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign_message(msg: Message, key: SigningKey) -> Message:
    """The same message with its signature set."""
    return dataclasses.replace(msg, signature=key.sign(msg.signing_input()))


def verify_signature(public_key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` (r || s) is a valid ECDSA P-256 / SHA-256 signature of ``data``."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
        return False
    try:
        public_key.verify(encode_dss_signature(r, s), data, _VERIFY_ALGORITHM)
    except InvalidSignature:
        return False
    return True


class KeyRegistry:
    """Public keys of trusted senders, by sender id."""

    def __init__(self) -> None:
        self._keys: dict[int, ec.EllipticCurvePublicKey] = {}

    def register(self, sender_id: int, public_key: ec.EllipticCurvePublicKey | bytes) -> None:
        """Trust ``sender_id`` with this key (an object, or SEC1 bytes, compressed or not)."""
        if isinstance(public_key, bytes | bytearray):
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, bytes(public_key))
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise ValueError(f"expected a P-256 key, got curve {public_key.curve.name}")
        self._keys[int(sender_id)] = public_key

    def revoke(self, sender_id: int) -> None:
        self._keys.pop(int(sender_id), None)

    def get(self, sender_id: int) -> ec.EllipticCurvePublicKey | None:
        return self._keys.get(int(sender_id))

    def __contains__(self, sender_id: object) -> bool:
        return sender_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)


class RejectReason(str, enum.Enum):
    """Why a verifier refused a message. Checked in this order; the first failure is counted."""

    UNSIGNED = "unsigned"
    """no signature while the verifier requires one"""
    UNKNOWN_SENDER = "unknown_sender"
    """signed by a sender id with no key in the registry"""
    BAD_SIGNATURE = "bad_signature"
    """signature does not verify (forged, or header/payload altered)"""
    STALE = "stale"
    """timestamp older than ``max_age_s``"""
    FUTURE = "future"
    """timestamp more than ``max_future_s`` ahead of the receiver's clock"""
    REPLAY = "replay"
    """sequence number already accepted, or older than the anti-replay window"""


@dataclass(frozen=True)
class VerifierConfig:
    """What a receiver accepts.

    Attributes:
        require_signature: reject unsigned messages (False: accept them, for training speed;
            signed ones are still verified).
        max_age_s: oldest accepted timestamp relative to the receiver's clock, seconds. Must
            exceed the channel's latency, or late deliveries are refused as stale.
        max_future_s: tolerated clock skew for timestamps ahead of the receiver's clock, seconds.
        replay_window: how many sequence numbers below the highest one seen per sender may still
            arrive (once each) out of order.
    """

    require_signature: bool = True
    max_age_s: float = 1.0
    max_future_s: float = 0.05
    replay_window: int = 64

    def __post_init__(self) -> None:
        if not self.max_age_s >= 0 or not self.max_future_s >= 0:
            raise ValueError("max_age_s and max_future_s must be >= 0")
        if self.replay_window < 1:
            raise ValueError(f"replay_window must be >= 1, got {self.replay_window}")


class Verifier:
    """One receiver's message acceptance: signature, freshness and replay checks with counters.

    Attributes:
        rejections: count of refused messages by reason.
        accepted: count of accepted messages.
    """

    def __init__(self, registry: KeyRegistry, config: VerifierConfig | None = None) -> None:
        self.registry = registry
        self.config = config or VerifierConfig()
        self.rejections: collections.Counter[RejectReason] = collections.Counter()
        self.accepted = 0
        # per sender: (highest accepted seq, bitmap of accepted seqs; bit i = highest - i)
        self._replay: dict[int, tuple[int, int]] = {}

    def check(self, msg: Message, now_us: int) -> RejectReason | None:
        """None if ``msg`` is accepted at receiver time ``now_us`` (microseconds), else the reason.

        Acceptance updates the sender's replay window, so checking the same message twice
        rejects the second time as a replay. Rejected messages leave no state behind.
        """
        reason = self._reason(msg, now_us)
        if reason is None:
            self._remember(msg.sender_id, msg.seq)
            self.accepted += 1
        else:
            self.rejections[reason] += 1
        return reason

    def accept(self, msg: Message, now_us: int) -> bool:
        """``check(msg, now_us) is None``."""
        return self.check(msg, now_us) is None

    def _reason(self, msg: Message, now_us: int) -> RejectReason | None:
        if msg.signed:
            public_key = self.registry.get(msg.sender_id)
            if public_key is None:
                return RejectReason.UNKNOWN_SENDER
            if not verify_signature(public_key, msg.signing_input(), msg.signature):
                return RejectReason.BAD_SIGNATURE
        elif self.config.require_signature:
            return RejectReason.UNSIGNED
        age_us = int(now_us) - msg.timestamp_us
        if age_us > self.config.max_age_s * 1e6:
            return RejectReason.STALE
        if -age_us > self.config.max_future_s * 1e6:
            return RejectReason.FUTURE
        if self._is_replay(msg.sender_id, msg.seq):
            return RejectReason.REPLAY
        return None

    def _is_replay(self, sender_id: int, seq: int) -> bool:
        state = self._replay.get(sender_id)
        if state is None:
            return False
        highest, bitmap = state
        if seq > highest:
            return False
        offset = highest - seq
        return offset >= self.config.replay_window or bool(bitmap >> offset & 1)

    def _remember(self, sender_id: int, seq: int) -> None:
        mask = (1 << self.config.replay_window) - 1
        state = self._replay.get(sender_id)
        if state is None:
            self._replay[sender_id] = (seq, 1)
            return
        highest, bitmap = state
        if seq > highest:
            shift = seq - highest
            # A jump past the whole window forgets everything; never shift by up to 2**32 bits.
            bitmap = ((bitmap << shift) | 1) & mask if shift < self.config.replay_window else 1
            self._replay[sender_id] = (seq, bitmap)
        else:
            self._replay[sender_id] = (highest, bitmap | (1 << (highest - seq)))
