"""Release keys: the Ed25519 key that signs update lists, and the HMAC keys of older fleets.

    key = keys.generate(Path("release.key"))        # `mpy-blox keygen release.key`
    key.public_hex                                  # -> release.key.pub, update.pubkey
    key = keys.load_signing_key("release.key")      # a ReleaseKey, or HMAC key bytes

The private key is PKCS#8 PEM, unencrypted (`openssl pkey -in release.key` reads
it), mode 0600; `PATH.pub` holds the public key as 64 lower-case hex digits on one
line: what a device's `update.pubkey` and a rotation's `--next-pubkey` take.
Signing uses `cryptography`; the devices verify with `mpy_blox.ed25519`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from mpy_blox.update import manifest
from mpy_blox.update.manifest import InvalidUpdate
from mpy_blox_tools.errors import MpyBloxError, read_file

PUB_SUFFIX = ".pub"
MIN_HMAC_KEY = 16  # characters of an update.key text


class ReleaseKey:
    """An Ed25519 private release key: `sign(message)` (64 bytes), `public_hex`."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    @property
    def public_bytes(self) -> bytes:
        return self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def public_hex(self) -> str:
        return self.public_bytes.hex()

    def pem(self) -> bytes:
        return self._private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def pub_path(path: Path) -> Path:
    return path.with_name(path.name + PUB_SUFFIX)


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    # O_EXCL: never follow a link planted at the name, never truncate someone's file.
    # With force, write a fresh file beside it and rename it over.
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if force else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def generate(path: Path, force: bool = False) -> ReleaseKey:
    """A new release key at `path` (0600) and its public key at `path.pub`."""
    path = Path(path)
    pub = pub_path(path)
    if not force:
        for p in (path, pub):
            if os.path.lexists(p):
                raise MpyBloxError(f"{p} exists: not overwritten (--force replaces it)")
    if not path.parent.is_dir():
        raise MpyBloxError(f"{path.parent}: no such folder")
    key = ReleaseKey(Ed25519PrivateKey.generate())
    try:
        _write_new(path, key.pem(), 0o600, force)
        _write_new(pub, (key.public_hex + "\n").encode(), 0o644, force)
    except FileExistsError as e:
        raise MpyBloxError(f"{e.filename} exists: not overwritten (--force replaces it)") from None
    except OSError as e:
        raise MpyBloxError(f"{e.filename or path}: cannot write it ({e.strerror})") from None
    return key


def load_signing_key(path: str | Path) -> ReleaseKey | bytes:
    """The key in `path`: an Ed25519 private key (PEM, from keygen) as a ReleaseKey,
    or an HMAC key (one line of text, an update.key) as bytes."""
    path = Path(path)
    data = read_file(path, "key file")
    where = f"key file {path}"
    if b"-----BEGIN" in data:
        if b"PUBLIC KEY" in data:
            raise MpyBloxError(f"{where} is a public key: sign with the private key file")
        try:
            private = load_pem_private_key(data, password=None)
        except TypeError:
            raise MpyBloxError(f"{where}: encrypted private keys are not supported") from None
        except ValueError:
            raise MpyBloxError(f"{where}: not a readable PEM private key") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise MpyBloxError(f"{where}: not an Ed25519 key (mpy-blox keygen makes one)")
        return ReleaseKey(private)
    if path.name.endswith(PUB_SUFFIX):
        raise MpyBloxError(
            f"{where} is a public key (.pub): sign with the private key file "
            f"{path.name[: -len(PUB_SUFFIX)]}"
        )
    try:
        text = data.decode().strip()
    except UnicodeDecodeError:
        text = ""
    return hmac_key(text, where)


def hmac_key(text: str, where: str) -> bytes:
    """An update.key text as the HMAC key bytes, or a one-line error naming `where`."""
    if len(text) < MIN_HMAC_KEY or any(c.isspace() or not c.isprintable() for c in text):
        raise MpyBloxError(
            f"{where}: neither an Ed25519 private key (PEM, from mpy-blox keygen) nor an "
            f"HMAC key (expected one line of at least {MIN_HMAC_KEY} characters)"
        )
    return text.encode()


def load_public_key(path: str | Path) -> str:
    """The 64 lower-case hex digits of a public key file (keygen's PATH.pub)."""
    path = Path(path)
    data = read_file(path, "public key file")
    if b"PRIVATE KEY" in data:
        raise MpyBloxError(f"public key file {path} is a private key: give its .pub file")
    text = data.decode(errors="replace").strip().lower()
    try:
        manifest.check_pubkey(text)
    except InvalidUpdate:
        raise MpyBloxError(
            f"public key file {path}: expected 64 hex digits on one line (keygen's .pub)"
        ) from None
    return text


def trust_of(key: ReleaseKey | bytes) -> manifest.Trust:
    """The manifest.Trust that accepts exactly what `key` signs."""
    if isinstance(key, ReleaseKey):
        return manifest.Trust(pubkeys=[key.public_bytes])
    return manifest.Trust(hmac_key=key)
