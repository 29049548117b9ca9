# The mpypi update list: THE wire format shared by the device and the publisher.
#
# Pure: imports only json, binascii, hashlib, sys, mpy_blox.hmac (itself
# hashlib only), the pure update.names and update.paths, and (for an Ed25519
# list only, when one arrives, unloaded after the check) mpy_blox.ed25519, so
# CPython >= 3.11 (the publisher imports this file as mpy_blox.update.manifest)
# and MicroPython 1.22 run the same code. docs/protocol.md describes it for
# people; the topics it travels on are built by mpy_blox.topics.
#
# Three forms are accepted on mpypi/channels/{channel} and mpypi/nodes/{id}/cmd:
#
# 1. Seed form (keyless devices only): a JSON array of entries
#      [{"type": "wheel", "name": "mpy-blox", "version": "0.7.0", "pkg_sha256": "<hex>"},
#       {"type": "src", "path": "user_main.py", "pkg_sha256": "<hex>"}]
#
# 2. Ed25519 form (update.pubkey): one header line, then the body whose exact
#    bytes are signed (the device never re-serialises JSON):
#      mpypi-ed25519 <Ed25519 signature of SHA-256(body), 128 lower-case hex>\n
#      {"v": 1,                     <- body format version
#       "seq": 42,                  <- 1..2**31-1, greater than the device's last seq
#       "to": "channels/stable",    <- the topic suffix it is valid on
#       "expires": 1798761600,      <- optional: Unix time after which it is refused
#       "next_pubkey": "<64 hex>",  <- optional: the release key that comes next
#       "packages": [
#         {"type": "wheel", "name": "mpy-blox", "version": "0.7.0",
#          "tag": "mpy6-bytecode-esp32",          <- optional: pre-flight tag check
#          "pkg_sha256": "<hex>", "size": 123456}, <- size: bytes of the package
#         {"type": "src", "path": "user_main.py", "pkg_sha256": "<hex>", "size": 210}]}
#    or a firmware image for the next OTA partition, one at most a list:
#         {"type": "firmware", "chip": "esp32", "version": "v1.22.2",
#          "pkg_sha256": "<hex>", "size": 1572864}  <- size required, signed or not
#    Any entry may be chunked (docs/protocol.md, "Chunked packages"): three more
#    fields, all or none: "chunk_size" (bytes of every chunk but the last),
#    "chunks" (their count, which must agree with size) and "chunks_sha256" (the
#    SHA256 of the hash list, the chunks' raw 32-byte SHA256s in order).
#    The message signed is the 32-byte SHA-256 of the body: the ESP32 hashes
#    SHA-256 in hardware, and Ed25519's own SHA-512 then runs over one block.
#
# 3. HMAC form (update.key, fleets provisioned before Ed25519): the same body
#    under "mpypi-hmac-sha256 <HMAC-SHA256(key, body) as 64 hex>\n". The key is
#    the UTF-8 bytes of the update.key setting, as provisioned.
#
# What a device trusts is a Trust: its public keys, its HMAC key, or a reason
# to refuse everything (a device that once held a key and lost it fails
# closed). Only a list whose signature this device verified has a seq.
import binascii
import hashlib
import json

from mpy_blox.hmac import compare_digest
from mpy_blox.hmac import hmac_sha256 as _hmac
from mpy_blox.update.names import normalize
from mpy_blox.update.paths import InvalidUpdate, check_src_path, fold  # noqa: F401  (re-exported)

FORMAT_VERSION = 1
SIGNED_HEADER = b"mpypi-hmac-sha256 "
ED25519_HEADER = b"mpypi-ed25519 "
MAX_LIST_BYTES = 16384  # a list is small; never buffer more than this
MAX_SEQ = 0x7FFFFFFF  # NVS keeps the seq as a signed 32-bit integer
# A chunk's bounds. Every message of a chunked package fits in chunk_size bytes,
# its hash list (32 bytes a chunk) included: chunks <= chunk_size // 32.
MIN_CHUNK = 1024
MAX_CHUNK = 16777216
_HEX = "0123456789abcdef"


class Trust:
    """What a device checks lists with: `pubkeys` (32-byte Ed25519 public keys,
    the current one first, then the next one announced by a rotation),
    `hmac_key` (bytes), or `refuse`: why no list can be accepted at all (a
    locked device whose key is unreadable). All empty: a keyless device."""

    def __init__(self, pubkeys=(), hmac_key=None, refuse=None):
        self.pubkeys = [k for k in pubkeys if k]
        if isinstance(hmac_key, str):
            hmac_key = hmac_key.encode()
        self.hmac_key = hmac_key or None
        self.refuse = refuse

    def keyless(self):
        return not (self.pubkeys or self.hmac_key or self.refuse)


class UpdateList:
    """A decoded list. `seq` is None unless its signature was verified here;
    `signer` is the index in Trust.pubkeys of the key that signed it, "hmac",
    or None (not verified); `expires` (Unix time) and `next_pubkey` (32 bytes)
    are None unless the list has them."""

    def __init__(self, entries, seq=None, signer=None, expires=None, next_pubkey=None):
        self.entries = entries
        self.seq = seq
        self.signer = signer
        self.expires = expires
        self.next_pubkey = next_pubkey


def hmac_sha256(key, data):
    """HMAC-SHA256 of `data` under `key` (the `update.key` text, or bytes)."""
    if isinstance(key, str):
        key = key.encode()
    return _hmac(key, data)


def _sha(value):
    if not isinstance(value, str) or len(value) != 64 or any(c not in _HEX for c in value):
        raise InvalidUpdate("pkg_sha256 must be 64 lower-case hex digits")
    return value


def _text(entry, key):
    value = entry.get(key)
    if not isinstance(value, str) or not value or len(value) > 64:
        raise InvalidUpdate("bad %s in %s entry" % (key, entry.get("type")))
    for c in value:
        # ASCII only: CPython's isalpha() takes more letters than MicroPython's.
        if ord(c) > 127 or not (c.isalpha() or c.isdigit() or c in "._-+!"):
            raise InvalidUpdate("bad %s: %s" % (key, value))
    return value


def _int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_entry(entry, signed):
    """Validate one list entry; return it normalised (size None if absent)."""
    if not isinstance(entry, dict):
        raise InvalidUpdate("a list entry is not an object")
    kind = entry.get("type")
    size = entry.get("size")
    if size is None and signed:
        raise InvalidUpdate("signed list entry without size")
    if size is not None and (not _int(size) or size < 0):
        raise InvalidUpdate("bad size")
    out = {"type": kind, "pkg_sha256": _sha(entry.get("pkg_sha256")), "size": size}
    if kind == "wheel":
        out["name"] = _text(entry, "name")
        out["version"] = _text(entry, "version")
        if entry.get("tag") is not None:
            out["tag"] = _text(entry, "tag")
    elif kind == "src":
        out["path"] = check_src_path(entry.get("path"))
    elif kind == "firmware":
        # An application image for the next OTA partition (docs/protocol.md,
        # "Firmware"): the device's pre-flight compares chip and size with its own.
        out["chip"] = _text(entry, "chip")
        out["version"] = _text(entry, "version")
        if size is None:
            raise InvalidUpdate("firmware entry without size")
    else:
        raise InvalidUpdate("unknown package type: %s" % str(kind)[:20])
    if "chunk_size" in entry or "chunks" in entry or "chunks_sha256" in entry:
        _chunked(entry, size, out)
    return out


def _chunked(entry, size, out):
    # A chunked entry's fields, checked against each other and its size.
    cs, n = entry.get("chunk_size"), entry.get("chunks")
    if not _int(cs) or not MIN_CHUNK <= cs <= MAX_CHUNK:
        raise InvalidUpdate("bad chunk_size: 1024 to 16777216 bytes")
    if size is None or not _int(n) or n < 1 or n != (size + cs - 1) // cs:
        raise InvalidUpdate("chunks disagrees with size and chunk_size")
    if n > cs // 32:
        raise InvalidUpdate("too many chunks: %d of %d bytes" % (n, cs))
    out["chunk_size"] = cs
    out["chunks"] = n
    out["chunks_sha256"] = _sha(entry.get("chunks_sha256"))


def check_pubkey(text):
    """32 key bytes from 64 hex digits (update.pubkey, next_pubkey), else InvalidUpdate."""
    if not isinstance(text, str) or len(text) != 64 or any(c not in _HEX for c in text.lower()):
        raise InvalidUpdate("a public key is 64 hex digits")
    return binascii.unhexlify(text)


def _unhex(text, size):
    try:
        raw = binascii.unhexlify(text)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != size:
        raise InvalidUpdate("malformed signature")
    return raw


def _verify(payload, trust):
    # Which signed form, and who signed it: (signer or None, body).
    ed = payload[: len(ED25519_HEADER)] == ED25519_HEADER
    if not ed and payload[: len(SIGNED_HEADER)] != SIGNED_HEADER:
        return None, None  # the seed form
    nl = payload.find(b"\n")
    if nl < 0:
        raise InvalidUpdate("malformed signed list")
    body = memoryview(payload)[nl + 1 :]
    head = bytes(payload[len(ED25519_HEADER if ed else SIGNED_HEADER) : nl])
    if trust.keyless():
        return None, body
    if ed:
        if not trust.pubkeys:
            raise InvalidUpdate("Ed25519 list refused: this device has no update.pubkey")
        sig = _unhex(head, 64)
        digest = hashlib.sha256(body).digest()
        from mpy_blox import ed25519

        try:
            for i, key in enumerate(trust.pubkeys):
                if ed25519.verify(key, digest, sig):
                    return i, body
        finally:
            ed25519 = None
            _unload("ed25519")
        raise InvalidUpdate("bad signature")
    if not trust.hmac_key:
        raise InvalidUpdate("HMAC list refused: this device trusts only its Ed25519 key")
    if not compare_digest(_unhex(head, 32), hmac_sha256(trust.hmac_key, body)):
        raise InvalidUpdate("bad signature")
    return "hmac", body


def _unload(leaf):
    # mpy_blox.<leaf> is loaded for one check and unloaded after it: its bytecode
    # (ed25519: 4.6 KB on a 32-bit port, `make bench BENCH=sig`) would otherwise stay
    # on the agent's busy heap, and through the install boot's download, where the
    # demo's 100K board on the 32-bit lane ran out of heap with it.
    import sys

    sys.modules.pop("mpy_blox." + leaf, None)
    try:
        delattr(sys.modules["mpy_blox"], leaf)
    except (KeyError, AttributeError):
        pass


def decode(payload, trust=None, to=None):
    """Decode and check an update list; return an UpdateList.

    `trust` is a Trust (or, for short, an update.key text: an HMAC Trust);
    None is keyless. `to` is the topic suffix the list arrived on
    ("channels/stable", "nodes/<id>/cmd"), checked against the list's own.
    The caller compares seq with the last one it accepted (accept_list).
    """
    if not isinstance(trust, Trust):
        trust = Trust(hmac_key=trust)
    if len(payload) > MAX_LIST_BYTES:
        raise InvalidUpdate("list too large")
    if trust.refuse:
        raise InvalidUpdate("updates locked: %s" % trust.refuse)
    signer, body = _verify(payload, trust)
    if body is None:
        if not trust.keyless():
            raise InvalidUpdate("unsigned list refused: this device has an update key")
        return UpdateList(_entries(_json(payload), False))
    doc = _json(body)
    if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION:
        raise InvalidUpdate("unsupported list version")
    seq = doc.get("seq")
    if not _int(seq) or not 1 <= seq <= MAX_SEQ:
        raise InvalidUpdate("bad seq")
    listed_to = doc.get("to")
    if not isinstance(listed_to, str) or not listed_to:
        raise InvalidUpdate("signed list without to")
    if to is not None and listed_to != to:
        raise InvalidUpdate("list is for %s" % listed_to[:40])
    expires = doc.get("expires")
    if expires is not None and (not _int(expires) or expires < 1):
        raise InvalidUpdate("bad expires")
    next_pubkey = doc.get("next_pubkey")
    if next_pubkey is not None:
        next_pubkey = check_pubkey(next_pubkey)
    entries = _entries(doc.get("packages"), True)
    if signer is None:  # keyless: nothing here was verified, so nothing counts
        return UpdateList(entries)
    return UpdateList(entries, seq, signer, expires, next_pubkey)


def _entries(entries, signed):
    if not isinstance(entries, list):
        raise InvalidUpdate("the list is not a JSON array of packages")
    out = [check_entry(e, signed) for e in entries]
    firmware = [e for e in out if e["type"] == "firmware"]
    if len(firmware) > 1:
        raise InvalidUpdate("more than one firmware image in the list")
    seen = set()
    for e in out:
        if e["type"] == "firmware":
            continue
        # A wheel by its normalised name, as the installer finds it (foo.bar
        # and foo-bar are one package); a src file by its path, as FAT compares it.
        ident = ("wheel", normalize(e["name"])) if "name" in e else ("src", fold(e["path"]))
        if ident in seen:
            raise InvalidUpdate("listed twice: %s" % ident[1])
        seen.add(ident)
    return out


def decode_list(payload, trust=None, to=None):
    """decode(), as (seq or None, [entries])."""
    got = decode(payload, trust, to)
    return got.seq, got.entries


def accept_list(payload, trust=None, last_seq=0, to=None):
    """decode_list, and refuse a replayed or older signed list (seq <= last_seq)."""
    seq, entries = decode_list(payload, trust, to)
    if seq is not None and seq <= last_seq:
        raise InvalidUpdate("replayed or older list: seq %d, device at %d" % (seq, last_seq))
    return seq, entries


def _json(data):
    # data: bytes, a bytearray or, for a signed list's body, a memoryview of the
    # payload, which MicroPython's json reads in place: no copy of a list of
    # some KB while the payload is held too. CPython's (the workstation's)
    # takes no memoryview.
    try:
        try:
            return json.loads(data)
        except TypeError:
            return json.loads(bytes(data))
    except (ValueError, UnicodeError):
        raise InvalidUpdate("malformed JSON list")


def encode_list(entries, seq=None, key=None, to=None, expires=None, next_pubkey=None):
    """The publisher's side, as bytes: the seed form (no key), the HMAC form
    (`key` the update.key text or bytes) or the Ed25519 form (`key` has
    sign(message) -> 64-byte signature, as mpy_blox_tools' release key)."""
    if key is None:
        return json.dumps(entries).encode()
    if not _int(seq) or not 1 <= seq <= MAX_SEQ or not to:
        raise ValueError("a signed list needs a seq in 1..2**31-1 and a to")
    doc = {"v": FORMAT_VERSION, "seq": seq, "to": to, "packages": entries}
    if expires is not None:
        doc["expires"] = expires
    if next_pubkey is not None:
        doc["next_pubkey"] = next_pubkey
    body = json.dumps(doc).encode()
    if hasattr(key, "sign"):
        sig = key.sign(hashlib.sha256(body).digest())
        return ED25519_HEADER + binascii.hexlify(sig) + b"\n" + body
    mac = binascii.hexlify(hmac_sha256(key, body))
    return SIGNED_HEADER + mac + b"\n" + body


def wheel_entry(name, version, sha256, size, tag=None):
    e = {"type": "wheel", "name": name, "version": version, "pkg_sha256": sha256, "size": size}
    if tag:
        e["tag"] = tag
    return e


def src_entry(path, sha256, size):
    return {"type": "src", "path": path, "pkg_sha256": sha256, "size": size}


def firmware_entry(chip, version, sha256, size):
    e = {"type": "firmware", "chip": chip, "version": version, "pkg_sha256": sha256}
    e["size"] = size
    return e
