# Ed25519 signature verification (RFC 8032, section 5.1.7), pure Python.
#
#   from mpy_blox import ed25519
#   ok = ed25519.verify(public_key32, message, signature64)
#
# Only verification: signing happens on the workstation (mpy_blox_tools.keys,
# with `cryptography`). Runs on MicroPython 1.22 (ints are arbitrary precision,
# pow(a, b, m) is in C) and on CPython, so the publisher and the tests import
# the same code: no const() here. Nothing is computed at import; the module
# keeps no table of points (the agent verifies on a busy heap), only SHA-512's
# round constants as one string.
#
# What is checked, in order; any failure returns False, never raises on bad
# input of the right types:
#   - lengths: a 32-byte key, a 64-byte signature R || S;
#   - S < L (RFC 8032: reject S >= L, no malleable S + L);
#   - A decodes (RFC 8032 5.1.3: y < p, x exists, not x = 0 with the sign bit);
#   - A is not of small order ([8]A is not the identity). RFC 8032 does not ask
#     this; without it the identity as a public key accepts any signature with
#     R = [S]B, so a key given to the device (a rotation's next key) must not be
#     one. libsodium refuses these keys too;
#   - the cofactorless equation of RFC 8032 5.1.7, [S]B = R + [k]A, where
#     k = SHA-512(R || A || M) mod L. We compute R' = [S]B + [k](-A) and compare
#     its canonical encoding with the 32 bytes of R. That is the same check as
#     decoding R and comparing points: an R that does not decode, or is not
#     canonical (y >= p, or x = 0 with the sign bit), is never the encoding of
#     a point, so it never matches.
#
# Speed: points in extended coordinates (X:Y:Z:T), x = X/Z, y = Y/Z, xy = T/Z
# (Hisil et al. 2008, the formulas of RFC 8032 5.1.4 for a = -1). [S]B + [k](-A)
# is one double-and-add over both scalars at once (Straus/Shamir): 253
# doublings and about 190 additions of B, -A or B - A, each kept affine and
# precomputed as (y - x, y + x, 2dxy), so an addition is 7 multiplications.
# The doubling leaves T out when no addition follows. SHA-512 is pure Python:
# MicroPython's ports have no hashlib.sha512; the message here is 96 bytes,
# one block.

import binascii

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_D2 = 2 * _D % _P
_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
# The base point B (RFC 8032 5.1): y = 4/5, x positive.
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960


def verify(public_key, message, signature):
    """True if `signature` (64 bytes) is `public_key`'s (32 bytes) Ed25519
    signature of `message` (bytes), as RFC 8032 verifies it (cofactorless)."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    a = _decode(public_key)
    if a is None or _small_order(a):
        return False
    r = bytes(signature[:32])
    h = sha512(r + bytes(public_key) + bytes(message))
    k = int.from_bytes(h, "little") % _L
    # -A, and B - A, affine, in the form additions take.
    ax, ay = (_P - a[0]) % _P, a[1]
    x, y, z, _ = _add_affine(_BX, _BY, 1, _BX * _BY % _P, _niels(ax, ay))
    zi = pow(z, _P - 2, _P)
    table = (None, _niels(_BX, _BY), _niels(ax, ay), _niels(x * zi % _P, y * zi % _P))
    return _encode(_straus(s, k, table)) == r


def _niels(x, y):
    return ((y - x) % _P, (y + x) % _P, _D2 * x * y % _P)


def _add_affine(x1, y1, z1, t1, q):
    # (X1:Y1:Z1:T1) + an affine point q = (y - x, y + x, 2dxy): RFC 8032 5.1.4
    # with Z2 = 1. Returns T3 as well; _straus does not need it.
    a = (y1 - x1) * q[0] % _P
    b = (y1 + x1) * q[1] % _P
    c = t1 * q[2] % _P
    d = 2 * z1
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _straus(s, k, table):
    # [s]B + [k](-A) with table[1] = B, table[2] = -A, table[3] = B - A.
    x, y, z, t = 0, 1, 1, 0  # the identity
    i = 252  # s, k < L < 2**253
    while i >= 0:
        j = (s >> i & 1) | (k >> i & 1) << 1
        # Doubling (RFC 8032 5.1.4, "dbl-2008-hwcd"); T only if an addition needs it.
        a = x * x % _P
        b = y * y % _P
        c = 2 * z * z % _P
        h = a + b
        e = h - (x + y) * (x + y) % _P
        g = a - b
        f = c + g
        x, y, z = e * f % _P, g * h % _P, f * g % _P
        if j:
            q = table[j]
            t = e * h % _P
            a = (y - x) * q[0] % _P
            b = (y + x) * q[1] % _P
            c = t * q[2] % _P
            d = 2 * z
            e, f, g, h = b - a, d - c, d + c, b + a
            x, y, z = e * f % _P, g * h % _P, f * g % _P
        i -= 1
    return x, y, z


def _encode(point):
    x, y, z = point[0], point[1], point[2]
    zi = pow(z, _P - 2, _P)
    x, y = x * zi % _P, y * zi % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _decode(data):
    # RFC 8032 5.1.3: (x, y), or None if `data` encodes no point (canonically).
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    v3 = v * v * v % _P
    x = u * v3 * pow(u * v3 * v3 * v % _P, (_P - 5) // 8, _P) % _P
    vxx = v * x * x % _P
    if vxx != u:
        if vxx != _P - u:
            return None
        x = x * _SQRT_M1 % _P
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y


def _small_order(point):
    # [8]P is the identity (0:1:1) exactly when P's order divides 8.
    x, y, z = point[0], point[1], 1
    for _ in range(3):
        a, b = x * x % _P, y * y % _P
        c = 2 * z * z % _P
        h = a + b
        e = h - (x + y) * (x + y)
        g = a - b
        f = c + g
        x, y, z = e * f % _P, g * h % _P, f * g % _P
    return x == 0 and y == z


# SHA-512 (FIPS 180-4), general: any length of message.
_M64 = 0xFFFFFFFFFFFFFFFF


# The 80 round constants (the first 64 bits of the fractional parts of the
# cube roots of the first 80 primes), big-endian; unhexlified per hash, so
# nothing is held between verifications.
_K = (
    "428a2f98d728ae227137449123ef65cdb5c0fbcfec4d3b2fe9b5dba58189dbbc"
    "3956c25bf348b53859f111f1b605d019923f82a4af194f9bab1c5ed5da6d8118"
    "d807aa98a303024212835b0145706fbe243185be4ee4b28c550c7dc3d5ffb4e2"
    "72be5d74f27b896f80deb1fe3b1696b19bdc06a725c71235c19bf174cf692694"
    "e49b69c19ef14ad2efbe4786384f25e30fc19dc68b8cd5b5240ca1cc77ac9c65"
    "2de92c6f592b02754a7484aa6ea6e4835cb0a9dcbd41fbd476f988da831153b5"
    "983e5152ee66dfaba831c66d2db43210b00327c898fb213fbf597fc7beef0ee4"
    "c6e00bf33da88fc2d5a79147930aa72506ca6351e003826f142929670a0e6e70"
    "27b70a8546d22ffc2e1b21385c26c9264d2c6dfc5ac42aed53380d139d95b3df"
    "650a73548baf63de766a0abb3c77b2a881c2c92e47edaee692722c851482353b"
    "a2bfe8a14cf10364a81a664bbc423001c24b8b70d0f89791c76c51a30654be30"
    "d192e819d6ef5218d69906245565a910f40e35855771202a106aa07032bbd1b8"
    "19a4c116b8d2d0c81e376c085141ab532748774cdf8eeb9934b0bcb5e19b48a8"
    "391c0cb3c5c95a634ed8aa4ae3418acb5b9cca4f7763e373682e6ff3d6b2b8a3"
    "748f82ee5defb2fc78a5636f43172f6084c87814a1f0ab728cc702081a6439ec"
    "90befffa23631e28a4506cebde82bde9bef9a3f7b2c67915c67178f2e372532b"
    "ca273eceea26619cd186b8c721c0c207eada7dd6cde0eb1ef57d4f7fee6ed178"
    "06f067aa72176fba0a637dc5a2c898a6113f9804bef90dae1b710b35131c471b"
    "28db77f523047d8432caab7b40c724933c9ebe0a15c9bebc431d67c49c100d4c"
    "4cc5d4becb3e42b6597f299cfc657e2a5fcb6fab3ad6faec6c44198c4a475817"
)


_H0 = (
    0x6A09E667F3BCC908,
    0xBB67AE8584CAA73B,
    0x3C6EF372FE94F82B,
    0xA54FF53A5F1D36F1,
    0x510E527FADE682D1,
    0x9B05688C2B3E6C1F,
    0x1F83D9ABFB41BD6B,
    0x5BE0CD19137E2179,
)


def _rotr(x, n):
    return (x >> n | x << (64 - n)) & _M64


def sha512(data):
    """The SHA-512 digest (64 bytes) of `data` (bytes)."""
    k = binascii.unhexlify(_K)
    h = list(_H0)
    n = len(data)
    data = bytes(data) + b"\x80" + bytes((111 - n) % 128) + (n * 8).to_bytes(16, "big")
    w = [0] * 80
    for off in range(0, len(data), 128):
        for i in range(16):
            w[i] = int.from_bytes(data[off + 8 * i : off + 8 * i + 8], "big")
        for i in range(16, 80):
            x, y = w[i - 15], w[i - 2]
            s0 = _rotr(x, 1) ^ _rotr(x, 8) ^ x >> 7
            s1 = _rotr(y, 19) ^ _rotr(y, 61) ^ y >> 6
            w[i] = (w[i - 16] + s0 + w[i - 7] + s1) & _M64
        a, b, c, d, e, f, g, hh = h
        for i in range(80):
            t1 = hh + (_rotr(e, 14) ^ _rotr(e, 18) ^ _rotr(e, 41)) + (e & f ^ (e ^ _M64) & g)
            t1 += int.from_bytes(k[8 * i : 8 * i + 8], "big") + w[i]
            t2 = (_rotr(a, 28) ^ _rotr(a, 34) ^ _rotr(a, 39)) + (a & b ^ a & c ^ b & c)
            hh, g, f, e = g, f, e, (d + t1) & _M64
            d, c, b, a = c, b, a, (t1 + t2) & _M64
        h = [(v + u) & _M64 for v, u in zip(h, (a, b, c, d, e, f, g, hh))]
    return b"".join(v.to_bytes(8, "big") for v in h)
