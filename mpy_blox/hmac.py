# HMAC-SHA256 (RFC 2104) over hashlib.sha256: MicroPython has no `hmac` module.
#
#   tag = hmac_sha256(key, iv, ciphertext)    # parts are hashed in order, no copy
#   if not compare_digest(tag, expected): ...
#
# Device and workstation both use it (mpy_blox.update.manifest signs and checks
# update lists on each), so it runs on CPython too: no const() here.
import hashlib

_BLOCK = 64  # SHA-256 block size


def _pad(key, byte):
    return bytes(b ^ byte for b in key) + bytes((byte,)) * (_BLOCK - len(key))


def hmac_sha256(key, *parts):
    """The HMAC-SHA256 digest (32 bytes) of the concatenated `parts` under `key`."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    inner = hashlib.sha256(_pad(key, 0x36))
    for part in parts:
        inner.update(part)
    outer = hashlib.sha256(_pad(key, 0x5C))
    outer.update(inner.digest())
    return outer.digest()


def compare_digest(a, b):
    """Compare two digests in time independent of where they differ."""
    if len(a) != len(b):
        return False
    diff = 0
    for x, y in zip(a, b):
        diff |= x ^ y
    return diff == 0
