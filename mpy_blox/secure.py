# The secure store: secrets (wlan.ssid, wlan.psk, mqtt.password, update.key, ...)
# kept in ESP32 NVS as one encrypted, authenticated blob.
#
# WEAK protection, on purpose and by necessity: both keys are derived from the
# device ID (machine.unique_id(), which is the Wi-Fi MAC and is broadcast over
# the air). It keeps secrets out of a casual flash dump or a copied image; it
# does not protect them from anyone who holds the device or knows this scheme.
#
# Blob layout (one NVS blob, so a write replaces it atomically):
#   b"MBS1" | IV (16, os.urandom per write) | AES-256-CBC(PKCS#7(JSON)) | tag (32)
#   tag = HMAC-SHA256(mac_key, magic | IV | ciphertext)
#   enc_key = SHA256(b"mpy-blox secure enc\0" | uid), mac_key likewise with "mac"
# The tag is checked before decrypting, so a corrupted blob, or one copied from
# another device, is reported and treated as empty instead of decoded to garbage.
import cryptolib
import hashlib
import json
import os

from mpy_blox.hmac import compare_digest, hmac_sha256
from mpy_blox.log import get_logger

NAMESPACE = "mpy_blox"  # NVS namespace shared with the runtime (boot_count)
_KEY = "secure"
_MAGIC = b"MBS1"
_IV = const(16)
_TAG = const(32)
_HEAD = const(20)  # magic + IV
_MAX_BLOB = const(2048)  # room for a TLS client key; read buffer is this size
_AES_CBC = const(2)  # cryptolib mode; ECB (1) and CBC (2) are on every ESP32 build
_ERR_NOT_FOUND = const(-0x1102)
_ERR_INVALID_LENGTH = const(-0x110C)

log = get_logger("secure")


class CorruptStore(Exception):
    pass


def _keys(uid):
    return (
        hashlib.sha256(b"mpy-blox secure enc\x00" + uid).digest(),
        hashlib.sha256(b"mpy-blox secure mac\x00" + uid).digest(),
    )


def encode(values, uid):
    """Encrypt and authenticate a dict of secrets; return the blob."""
    enc_key, mac_key = _keys(uid)
    plain = json.dumps(values).encode()
    n = 16 - len(plain) % 16
    plain += bytes((n,)) * n
    iv = os.urandom(_IV)
    head = _MAGIC + iv
    cipher = cryptolib.aes(enc_key, _AES_CBC, iv).encrypt(plain)
    return head + cipher + hmac_sha256(mac_key, head, cipher)


def decode(blob, uid):
    """Check and decrypt a blob; raise CorruptStore with the reason."""
    size = len(blob) - _HEAD - _TAG
    if size < 16 or size % 16 or bytes(blob[:4]) != _MAGIC:
        raise CorruptStore("not a secure-store blob")
    enc_key, mac_key = _keys(uid)
    blob = memoryview(blob)
    head, cipher, tag = blob[:_HEAD], blob[_HEAD : _HEAD + size], blob[_HEAD + size :]
    if not compare_digest(hmac_sha256(mac_key, head, cipher), tag):
        raise CorruptStore("integrity check failed: corrupted, or from another device")
    plain = cryptolib.aes(enc_key, _AES_CBC, bytes(head[4:])).decrypt(bytes(cipher))
    n = plain[-1]
    if not 1 <= n <= 16 or plain[-n:] != bytes((n,)) * n:
        raise CorruptStore("bad padding")
    try:
        values = json.loads(plain[:-n])
    except ValueError:
        raise CorruptStore("not JSON inside")
    if not isinstance(values, dict):
        raise CorruptStore("not a JSON object inside")
    return values


class SecureStore:
    """The secrets in NVS. `values` holds what load() or save() last saw.

    `state` is "empty" (never provisioned or cleared), "ok" or "corrupt".
    Nothing touches NVS before load(); tests pass their own nvs and uid.
    """

    def __init__(self, nvs=None, uid=None):
        self._nvs = nvs
        self._uid = uid
        self.values = {}
        self.state = None

    def _handle(self):
        if self._nvs is None:
            import esp32

            self._nvs = esp32.NVS(NAMESPACE)
        if self._uid is None:
            import machine

            self._uid = machine.unique_id()
        return self._nvs

    def load(self):
        """Read the store from NVS; a bad blob is logged once and reads as empty."""
        nvs = self._handle()
        self.values = {}
        buf = bytearray(_MAX_BLOB)
        try:
            n = nvs.get_blob(_KEY, buf)
        except OSError as e:
            if e.args[0] == _ERR_NOT_FOUND:
                self.state = "empty"
                return self.values
            reason = "too large" if e.args[0] == _ERR_INVALID_LENGTH else "NVS error %r" % e
            return self._corrupt(reason)
        try:
            self.values = decode(memoryview(buf)[:n], self._uid)
        except CorruptStore as e:
            return self._corrupt(e.args[0])
        self.state = "ok"
        return self.values

    def _corrupt(self, reason):
        self.state = "corrupt"
        log.error(
            "secure store unreadable (%s): treated as unprovisioned; provision again", reason
        )
        return self.values

    def save(self, values):
        """Encrypt `values` into NVS; ValueError if they do not fit. One set_blob,
        durable at once and whole: a power cut leaves the old store or the new."""
        nvs = self._handle()
        blob = encode(values, self._uid)
        if len(blob) > _MAX_BLOB:
            raise ValueError("secure store full: %d > %d bytes" % (len(blob), _MAX_BLOB))
        nvs.set_blob(_KEY, blob)
        nvs.commit()  # a no-op on ESP-IDF's default NVS; kept for other NVS builds
        self.values = values
        self.state = "ok"

    def clear(self):
        """Forget every secret (unprovision): one erase_key."""
        nvs = self._handle()
        try:
            nvs.erase_key(_KEY)
        except OSError as e:
            if e.args[0] != _ERR_NOT_FOUND:
                raise
        nvs.commit()
        self.values = {}
        self.state = "empty"
