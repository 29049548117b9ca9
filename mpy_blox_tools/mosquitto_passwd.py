"""Mosquitto password files, read by the embedded broker: one file serves both brokers.

`mosquitto_passwd` writes `user:hash` lines in two formats (Mosquitto 2.0
`mosquitto_passwd.c`, checked here against its output):

    $7$<iterations>$<base64 salt>$<base64 hash>   PBKDF2-HMAC-SHA512 (the default)
    $6$<base64 salt>$<base64 hash>                SHA-512 of password + salt (-H sha512)

The hash is 64 bytes either way. Plain-text lines (before `mosquitto_passwd -U`) are
refused, as Mosquitto 2 refuses them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from pathlib import Path

from mpy_blox_tools.errors import MpyBloxError

HASH_HINT = "make one with `mosquitto_passwd -c FILE USER`"


def load(path: Path) -> dict[str, str]:
    """User name to encoded hash; MpyBloxError names the first line it cannot use."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise MpyBloxError(f"{path}: cannot read the password file ({e.strerror})") from e
    users = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user or not _decode(encoded):
            raise MpyBloxError(
                f"{path}:{number}: not a mosquitto_passwd hash ($6$ or $7$); {HASH_HINT}"
            )
        users[user] = encoded
    if not users:
        raise MpyBloxError(f"{path}: no users; {HASH_HINT}")
    return users


def verify(password: str, encoded: str) -> bool:
    """Whether `password` matches a hash from a Mosquitto password file."""
    decoded = _decode(encoded)
    if not decoded:
        return False
    iterations, salt, expected = decoded
    secret = password.encode()
    if iterations:
        actual = hashlib.pbkdf2_hmac("sha512", secret, salt, iterations, len(expected))
    else:
        actual = hashlib.sha512(secret + salt).digest()
    return hmac.compare_digest(actual, expected)


def _decode(encoded: str) -> tuple[int, bytes, bytes] | None:
    """(iterations, salt, hash) of a $7$ hash, iterations 0 for a $6$ one; None if neither."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[:2] == ["", "7"] and int(parts[2]) > 0:
            iterations, salt, digest = int(parts[2]), parts[3], parts[4]
        elif len(parts) == 4 and parts[:2] == ["", "6"]:
            iterations, salt, digest = 0, parts[2], parts[3]
        else:
            return None
        salt_bytes = base64.b64decode(salt, validate=True)
        digest_bytes = base64.b64decode(digest, validate=True)
    except (ValueError, binascii.Error):
        return None
    if len(digest_bytes) != 64 or not salt_bytes:
        return None
    return iterations, salt_bytes, digest_bytes
