"""Ed25519 verification (mpy_blox.ed25519): RFC 8032's vectors, `cryptography`'s
signatures and forgeries, on CPython and on MicroPython's two lanes."""

from __future__ import annotations

import binascii
import hashlib
import json
import random

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mpy_blox import ed25519

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493

# RFC 8032 section 7.1: (secret key, public key, message, signature), hex.
RFC8032 = {
    "TEST 1": (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    "TEST 2": (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    "TEST 3": (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    "TEST SHA(abc)": (
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
        "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    ),
}

# The eight points of order dividing 8, as libsodium lists them (canonical).
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
]


def _pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _multiple_of_base(n: int) -> bytes:
    # [n]B, encoded, through the module's own double-and-add (k = 0: only B is used).
    table = (None, ed25519._niels(ed25519._BX, ed25519._BY), None, None)
    return ed25519._encode(ed25519._straus(n, 0, table))


def _cases(count: int, seed: int) -> list[tuple[bytes, bytes, bytes, bool]]:
    """(public key, message, signature, what `cryptography` says) for `count` keys:
    a good signature and forgeries (a bit flipped in R, S, A or the message; S + L)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        key = Ed25519PrivateKey.from_private_bytes(rnd.randbytes(32))
        pub = _pub(key)
        msg = rnd.randbytes(rnd.choice([0, 1, 32, 32, 111, 112, 200]))
        sig = key.sign(msg)
        s_plus_l = sig[:32] + (int.from_bytes(sig[32:], "little") + L).to_bytes(32, "little")
        out += [
            (pub, msg, sig, True),
            (pub, msg, _flip(sig, rnd.randrange(256)), False),  # R
            (pub, msg, _flip(sig, 256 + rnd.randrange(253)), False),  # S
            (_flip(pub, rnd.randrange(256)), msg, sig, False),  # A
            (pub, _flip(msg or b"\0", rnd.randrange(8 * len(msg or b"\0"))), sig, False),
            (pub, msg, s_plus_l, False),
        ]
    return out


@pytest.mark.parametrize("name", RFC8032)
def test_rfc8032_vectors_verify_and_match_cryptography(name):
    secret, pub, msg, sig = (binascii.unhexlify(v) for v in RFC8032[name])
    assert Ed25519PrivateKey.from_private_bytes(secret).sign(msg) == sig  # the vector is right
    assert ed25519.verify(pub, msg, sig)
    assert not ed25519.verify(pub, msg + b"\0", sig)


def test_sha512_matches_hashlib_across_block_boundaries():
    data = bytes(range(256)) * 3
    assert ed25519.sha512(b"abc") == hashlib.sha512(b"abc").digest()
    for n in (0, 1, 55, 96, 111, 112, 113, 127, 128, 129, 239, 240, 256, 768):
        assert ed25519.sha512(data[:n]) == hashlib.sha512(data[:n]).digest(), n
    assert ed25519.sha512(memoryview(data)[:96]) == hashlib.sha512(data[:96]).digest()


def test_thousands_of_signatures_and_forgeries_agree_with_cryptography():
    cases = _cases(400, seed=19)  # 2400 verifications
    for pub, msg, sig, _ in cases:
        try:
            Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)
            theirs = True
        except InvalidSignature:
            theirs = False
        assert ed25519.verify(pub, msg, sig) is theirs, (pub.hex(), msg.hex(), sig.hex())
    assert sum(c[3] for c in cases) == 400


def test_s_not_below_l_is_refused():
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    sig = key.sign(b"m")
    s = int.from_bytes(sig[32:], "little")
    for bad in (s + L, L, 2**256 - 1):
        assert not ed25519.verify(_pub(key), b"m", sig[:32] + bad.to_bytes(32, "little"))


def test_non_canonical_and_undecodable_encodings_are_refused():
    # y >= p: p + 1 would be y = 1 (the identity); some small y + p that do decode.
    canonical_small_y = [y for y in range(2, 19) if ed25519._decode(y.to_bytes(32, "little"))]
    assert canonical_small_y  # there are points with y < 19: their y + p is non-canonical
    for y in [*canonical_small_y, 1, 0]:
        assert ed25519._decode((y + P).to_bytes(32, "little")) is None
    assert ed25519._decode((P - 1).to_bytes(32, "little"))  # y = p - 1 is canonical
    # x = 0 with the sign bit set: the identity's "negative" twin.
    assert ed25519._decode(bytes(31) + b"\x00") is not None
    assert ed25519._decode(b"\x01" + bytes(30) + b"\x80") is None
    # y with no x: (y^2 - 1) / (d y^2 + 1) is not a square.
    no_x = next(y for y in range(2, 100) if ed25519._decode(y.to_bytes(32, "little")) is None)
    key = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
    sig = key.sign(b"m")
    for bad in [y + P for y in canonical_small_y] + [no_x]:
        assert not ed25519.verify(bad.to_bytes(32, "little"), b"m", sig)
    # R non-canonical: the same point's other encoding never matches [S]B - [k]A.
    r_y = int.from_bytes(sig[:32], "little") & ((1 << 255) - 1)
    if r_y < 19:  # pragma: no cover (a 19 in 2**255 chance)
        pytest.skip("R happens to have a non-canonical twin")
    assert not ed25519.verify(_pub(key), b"m", (b"\xff" * 32) + sig[32:])


def test_a_small_order_public_key_is_refused_though_the_rfc_equation_holds(monkeypatch):
    # With A the identity, [k]A vanishes: R = [S]B "signs" every message.
    s = 12345
    forged = _multiple_of_base(s) + s.to_bytes(32, "little")
    identity = bytes.fromhex(SMALL_ORDER[0])
    for hexkey in SMALL_ORDER:
        point = ed25519._decode(bytes.fromhex(hexkey))
        assert point is not None and ed25519._small_order(point), hexkey
        assert not ed25519.verify(bytes.fromhex(hexkey), b"any message", forged)
    # Without the small-order check the forgery would pass: the check is what stops it.
    monkeypatch.setattr(ed25519, "_small_order", lambda point: False)
    assert ed25519.verify(identity, b"any message", forged)
    assert ed25519.verify(identity, b"another message", forged)


def test_wrong_lengths_are_refused_not_raised():
    key = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    sig = key.sign(b"m")
    assert ed25519.verify(_pub(key), b"m", sig)
    assert not ed25519.verify(_pub(key)[:31], b"m", sig)
    assert not ed25519.verify(_pub(key), b"m", sig[:63])
    assert not ed25519.verify(_pub(key), b"m", sig + b"\0")


def test_micropython_agrees_with_cryptography_on_each_lane(run_mpy, lane, tmp_path):
    cases = _cases(8, seed=8032)
    for _, pub, msg, sig in RFC8032.values():
        cases.append((bytes.fromhex(pub), bytes.fromhex(msg), bytes.fromhex(sig), True))
    s = 12345
    forged = _multiple_of_base(s) + s.to_bytes(32, "little")
    cases += [(bytes.fromhex(k), b"any", forged, False) for k in SMALL_ORDER]
    cases.append((((3 + P).to_bytes(32, "little")), b"m", bytes(64), False))
    data = [[c[0].hex(), c[1].hex(), c[2].hex()] for c in cases]
    (tmp_path / "cases.json").write_text(json.dumps(data))
    out = run_mpy(
        f"""
import binascii, hashlib, json
from mpy_blox import ed25519
u = binascii.unhexlify
for pub, msg, sig in json.load(open({str(tmp_path / "cases.json")!r})):
    print(1 if ed25519.verify(u(pub), u(msg), u(sig)) else 0)
print(binascii.hexlify(ed25519.sha512(b"abc")).decode())
print(binascii.hexlify(ed25519.sha512(bytes(range(200)))).decode())
""",
        lane=lane,
        timeout=120,
    )
    lines = out.split()
    assert lines[:-2] == [str(int(c[3])) for c in cases]
    assert lines[-2] == hashlib.sha512(b"abc").hexdigest()
    assert lines[-1] == hashlib.sha512(bytes(range(200))).hexdigest()
