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
# round constants (640 bytes).
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
# cube roots of the first 80 primes), 8 bytes each, big-endian: 640 bytes.
_K = (
    b"\x42\x8a\x2f\x98\xd7\x28\xae\x22\x71\x37\x44\x91\x23\xef\x65\xcd"
    b"\xb5\xc0\xfb\xcf\xec\x4d\x3b\x2f\xe9\xb5\xdb\xa5\x81\x89\xdb\xbc"
    b"\x39\x56\xc2\x5b\xf3\x48\xb5\x38\x59\xf1\x11\xf1\xb6\x05\xd0\x19"
    b"\x92\x3f\x82\xa4\xaf\x19\x4f\x9b\xab\x1c\x5e\xd5\xda\x6d\x81\x18"
    b"\xd8\x07\xaa\x98\xa3\x03\x02\x42\x12\x83\x5b\x01\x45\x70\x6f\xbe"
    b"\x24\x31\x85\xbe\x4e\xe4\xb2\x8c\x55\x0c\x7d\xc3\xd5\xff\xb4\xe2"
    b"\x72\xbe\x5d\x74\xf2\x7b\x89\x6f\x80\xde\xb1\xfe\x3b\x16\x96\xb1"
    b"\x9b\xdc\x06\xa7\x25\xc7\x12\x35\xc1\x9b\xf1\x74\xcf\x69\x26\x94"
    b"\xe4\x9b\x69\xc1\x9e\xf1\x4a\xd2\xef\xbe\x47\x86\x38\x4f\x25\xe3"
    b"\x0f\xc1\x9d\xc6\x8b\x8c\xd5\xb5\x24\x0c\xa1\xcc\x77\xac\x9c\x65"
    b"\x2d\xe9\x2c\x6f\x59\x2b\x02\x75\x4a\x74\x84\xaa\x6e\xa6\xe4\x83"
    b"\x5c\xb0\xa9\xdc\xbd\x41\xfb\xd4\x76\xf9\x88\xda\x83\x11\x53\xb5"
    b"\x98\x3e\x51\x52\xee\x66\xdf\xab\xa8\x31\xc6\x6d\x2d\xb4\x32\x10"
    b"\xb0\x03\x27\xc8\x98\xfb\x21\x3f\xbf\x59\x7f\xc7\xbe\xef\x0e\xe4"
    b"\xc6\xe0\x0b\xf3\x3d\xa8\x8f\xc2\xd5\xa7\x91\x47\x93\x0a\xa7\x25"
    b"\x06\xca\x63\x51\xe0\x03\x82\x6f\x14\x29\x29\x67\x0a\x0e\x6e\x70"
    b"\x27\xb7\x0a\x85\x46\xd2\x2f\xfc\x2e\x1b\x21\x38\x5c\x26\xc9\x26"
    b"\x4d\x2c\x6d\xfc\x5a\xc4\x2a\xed\x53\x38\x0d\x13\x9d\x95\xb3\xdf"
    b"\x65\x0a\x73\x54\x8b\xaf\x63\xde\x76\x6a\x0a\xbb\x3c\x77\xb2\xa8"
    b"\x81\xc2\xc9\x2e\x47\xed\xae\xe6\x92\x72\x2c\x85\x14\x82\x35\x3b"
    b"\xa2\xbf\xe8\xa1\x4c\xf1\x03\x64\xa8\x1a\x66\x4b\xbc\x42\x30\x01"
    b"\xc2\x4b\x8b\x70\xd0\xf8\x97\x91\xc7\x6c\x51\xa3\x06\x54\xbe\x30"
    b"\xd1\x92\xe8\x19\xd6\xef\x52\x18\xd6\x99\x06\x24\x55\x65\xa9\x10"
    b"\xf4\x0e\x35\x85\x57\x71\x20\x2a\x10\x6a\xa0\x70\x32\xbb\xd1\xb8"
    b"\x19\xa4\xc1\x16\xb8\xd2\xd0\xc8\x1e\x37\x6c\x08\x51\x41\xab\x53"
    b"\x27\x48\x77\x4c\xdf\x8e\xeb\x99\x34\xb0\xbc\xb5\xe1\x9b\x48\xa8"
    b"\x39\x1c\x0c\xb3\xc5\xc9\x5a\x63\x4e\xd8\xaa\x4a\xe3\x41\x8a\xcb"
    b"\x5b\x9c\xca\x4f\x77\x63\xe3\x73\x68\x2e\x6f\xf3\xd6\xb2\xb8\xa3"
    b"\x74\x8f\x82\xee\x5d\xef\xb2\xfc\x78\xa5\x63\x6f\x43\x17\x2f\x60"
    b"\x84\xc8\x78\x14\xa1\xf0\xab\x72\x8c\xc7\x02\x08\x1a\x64\x39\xec"
    b"\x90\xbe\xff\xfa\x23\x63\x1e\x28\xa4\x50\x6c\xeb\xde\x82\xbd\xe9"
    b"\xbe\xf9\xa3\xf7\xb2\xc6\x79\x15\xc6\x71\x78\xf2\xe3\x72\x53\x2b"
    b"\xca\x27\x3e\xce\xea\x26\x61\x9c\xd1\x86\xb8\xc7\x21\xc0\xc2\x07"
    b"\xea\xda\x7d\xd6\xcd\xe0\xeb\x1e\xf5\x7d\x4f\x7f\xee\x6e\xd1\x78"
    b"\x06\xf0\x67\xaa\x72\x17\x6f\xba\x0a\x63\x7d\xc5\xa2\xc8\x98\xa6"
    b"\x11\x3f\x98\x04\xbe\xf9\x0d\xae\x1b\x71\x0b\x35\x13\x1c\x47\x1b"
    b"\x28\xdb\x77\xf5\x23\x04\x7d\x84\x32\xca\xab\x7b\x40\xc7\x24\x93"
    b"\x3c\x9e\xbe\x0a\x15\xc9\xbe\xbc\x43\x1d\x67\xc4\x9c\x10\x0d\x4c"
    b"\x4c\xc5\xd4\xbe\xcb\x3e\x42\xb6\x59\x7f\x29\x9c\xfc\x65\x7e\x2a"
    b"\x5f\xcb\x6f\xab\x3a\xd6\xfa\xec\x6c\x44\x19\x8c\x4a\x47\x58\x17"
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
    k = _K
    h = list(_H0)
    n = len(data)
    data = bytes(data) + b"\x80" + bytes((111 - n) % 128) + (n * 8).to_bytes(16, "big")
    w = [0] * 16  # the message schedule, as a ring of 16 words
    for off in range(0, len(data), 128):
        for i in range(16):
            w[i] = int.from_bytes(data[off + 8 * i : off + 8 * i + 8], "big")
        a, b, c, d, e, f, g, hh = h
        for i in range(80):
            if i >= 16:
                x, y = w[(i - 15) & 15], w[(i - 2) & 15]
                s0 = _rotr(x, 1) ^ _rotr(x, 8) ^ x >> 7
                s1 = _rotr(y, 19) ^ _rotr(y, 61) ^ y >> 6
                w[i & 15] = (w[i & 15] + s0 + w[(i - 7) & 15] + s1) & _M64
            t1 = hh + (_rotr(e, 14) ^ _rotr(e, 18) ^ _rotr(e, 41)) + (e & f ^ (e ^ _M64) & g)
            t1 += int.from_bytes(k[8 * i : 8 * i + 8], "big") + w[i & 15]
            t2 = (_rotr(a, 28) ^ _rotr(a, 34) ^ _rotr(a, 39)) + (a & b ^ a & c ^ b & c)
            hh, g, f, e = g, f, e, (d + t1) & _M64
            d, c, b, a = c, b, a, (t1 + t2) & _M64
        h = [(v + u) & _M64 for v, u in zip(h, (a, b, c, d, e, f, g, hh))]
    return b"".join(v.to_bytes(8, "big") for v in h)
