"""Signing: valid messages pass; forgeries, unknown senders, replays and stale ones are counted out."""

import dataclasses

import pytest

from v2x.message import SIGNATURE_BYTES, CodecId, Message, decode, encode
from v2x.signing import (
    KeyRegistry,
    RejectReason,
    SigningKey,
    Verifier,
    VerifierConfig,
    sign_message,
    verify_signature,
)

NOW_US = 10_000_000


@pytest.fixture(scope="module")
def keys():
    return {sender: SigningKey.from_seed(sender) for sender in (1, 2, 3)}


@pytest.fixture
def registry(keys):
    reg = KeyRegistry()
    for sender in (1, 2):  # sender 3 has a key but is not trusted
        reg.register(sender, keys[sender].public_key)
    return reg


def _msg(sender=1, seq=1, t_us=NOW_US, payload=b"features") -> Message:
    return Message(sender, seq, t_us, (1.0, 2.0, 0.0, 0.0, 0.0, 0.3), CodecId.KEYPOINT_FEATURES, payload)


def test_signed_message_verifies_after_the_wire(keys, registry):
    signed = sign_message(_msg(), keys[1])
    assert len(signed.signature) == SIGNATURE_BYTES
    received = decode(encode(signed))
    verifier = Verifier(registry)
    assert verifier.check(received, NOW_US) is None
    assert verifier.accepted == 1 and not verifier.rejections


def test_signatures_are_deterministic_and_seeded_keys_reproducible(keys):
    assert sign_message(_msg(), keys[1]).signature == sign_message(_msg(), keys[1]).signature
    assert SigningKey.from_seed(1).public_bytes() == keys[1].public_bytes()
    assert SigningKey.from_seed(1).public_bytes() != SigningKey.from_seed(2).public_bytes()
    assert len(keys[1].public_bytes()) == 33


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda m: dataclasses.replace(m, payload=b"features!"), id="payload"),
        pytest.param(lambda m: dataclasses.replace(m, seq=m.seq + 1), id="seq"),
        pytest.param(lambda m: dataclasses.replace(m, timestamp_us=m.timestamp_us - 1), id="timestamp"),
        pytest.param(lambda m: dataclasses.replace(m, pose_xyzrpy=(1.5, 2.0, 0.0, 0.0, 0.0, 0.3)), id="pose"),
        pytest.param(lambda m: dataclasses.replace(m, codec=CodecId.SPARSE_BEV), id="codec"),
        pytest.param(
            lambda m: dataclasses.replace(m, signature=bytes([m.signature[0] ^ 1]) + m.signature[1:]),
            id="sig-bit",
        ),
        pytest.param(lambda m: dataclasses.replace(m, signature=bytes(64)), id="sig-zero"),
        pytest.param(lambda m: dataclasses.replace(m, signature=b"\xff" * 64), id="sig-over-order"),
    ],
)
def test_tampered_messages_are_rejected_as_bad_signature(keys, registry, tamper):
    verifier = Verifier(registry)
    assert verifier.check(tamper(sign_message(_msg(), keys[1])), NOW_US) is RejectReason.BAD_SIGNATURE
    assert verifier.rejections[RejectReason.BAD_SIGNATURE] == 1 and verifier.accepted == 0


def test_sender_impersonation_is_rejected(keys, registry):
    # sender 2 signs a message claiming to come from sender 1
    forged = sign_message(_msg(sender=1), keys[2])
    assert Verifier(registry).check(forged, NOW_US) is RejectReason.BAD_SIGNATURE


def test_unknown_sender_is_rejected(keys, registry):
    verifier = Verifier(registry)
    assert verifier.check(sign_message(_msg(sender=3), keys[3]), NOW_US) is RejectReason.UNKNOWN_SENDER
    registry.register(3, keys[3].public_bytes())  # trust it, from its compressed public key
    assert verifier.check(sign_message(_msg(sender=3), keys[3]), NOW_US) is None
    registry.revoke(3)
    assert verifier.check(sign_message(_msg(sender=3, seq=2), keys[3]), NOW_US) is RejectReason.UNKNOWN_SENDER


def test_unsigned_messages_depend_on_the_policy(registry):
    strict, relaxed = Verifier(registry), Verifier(registry, VerifierConfig(require_signature=False))
    assert strict.check(_msg(), NOW_US) is RejectReason.UNSIGNED
    assert relaxed.check(_msg(), NOW_US) is None
    # relaxed receivers still check freshness and replays, and signatures that are present
    assert relaxed.check(_msg(), NOW_US) is RejectReason.REPLAY
    assert relaxed.check(_msg(seq=5, t_us=NOW_US - 5_000_000), NOW_US) is RejectReason.STALE
    bad = dataclasses.replace(_msg(seq=6), signature=bytes(64))
    assert relaxed.check(bad, NOW_US) is RejectReason.BAD_SIGNATURE


def test_replays_are_rejected_and_reordering_within_the_window_is_not(keys, registry):
    verifier = Verifier(registry, VerifierConfig(replay_window=8))

    def check(seq):
        return verifier.check(sign_message(_msg(seq=seq), keys[1]), NOW_US)

    assert check(10) is None
    assert check(10) is RejectReason.REPLAY  # exact replay
    assert check(12) is None
    assert check(11) is None  # late but unseen, inside the window
    assert check(11) is RejectReason.REPLAY
    assert check(5) is None  # 12 - 5 = 7 < 8
    assert check(4) is RejectReason.REPLAY  # outside the window: too old to tell, refused
    assert check(1_000_000) is None  # a jump past the window forgets the old bitmap
    assert check(12) is RejectReason.REPLAY
    assert verifier.rejections[RejectReason.REPLAY] == 4 and verifier.accepted == 5


def test_replay_state_is_per_sender(keys, registry):
    verifier = Verifier(registry)
    assert verifier.check(sign_message(_msg(sender=1, seq=7), keys[1]), NOW_US) is None
    assert verifier.check(sign_message(_msg(sender=2, seq=7), keys[2]), NOW_US) is None


def test_rejected_messages_do_not_advance_the_replay_window(keys, registry):
    verifier = Verifier(registry)
    forged = dataclasses.replace(sign_message(_msg(seq=100), keys[1]), signature=bytes(64))
    assert verifier.check(forged, NOW_US) is RejectReason.BAD_SIGNATURE
    assert verifier.check(sign_message(_msg(seq=1), keys[1]), NOW_US) is None


def test_stale_and_future_timestamps(keys, registry):
    verifier = Verifier(registry, VerifierConfig(max_age_s=0.5, max_future_s=0.01))

    def check(seq, t_us):
        return verifier.check(sign_message(_msg(seq=seq, t_us=t_us), keys[1]), NOW_US)

    assert check(1, NOW_US - 500_000) is None  # exactly at the limit
    assert check(2, NOW_US - 500_001) is RejectReason.STALE
    assert check(3, NOW_US + 10_000) is None
    assert check(4, NOW_US + 10_001) is RejectReason.FUTURE
    assert verifier.rejections == {RejectReason.STALE: 1, RejectReason.FUTURE: 1}


def test_verify_signature_rejects_wrong_lengths(keys):
    data = b"data"
    sig = keys[1].sign(data)
    assert verify_signature(keys[1].public_key, data, sig)
    assert not verify_signature(keys[1].public_key, data, sig[:-1])
    assert not verify_signature(keys[2].public_key, data, sig)


def test_config_validation():
    with pytest.raises(ValueError):
        VerifierConfig(replay_window=0)
    with pytest.raises(ValueError):
        VerifierConfig(max_age_s=-1)
