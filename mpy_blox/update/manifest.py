# The mpypi update list: THE wire format shared by the device and the publisher.
#
# Pure: imports only json, binascii, mpy_blox.hmac (itself hashlib only) and the
# pure update.names and update.paths, so CPython >= 3.11 (the
# publisher imports this file as mpy_blox.update.manifest) and MicroPython 1.22
# run the same code. docs/protocol.md describes it for people; the topics it
# travels on are built by mpy_blox.topics.
#
# Two forms are accepted on mpypi/channels/{channel} and mpypi/nodes/{id}/cmd:
#
# 1. Seed form (devices without update.key only): a JSON array of entries
#      [{"type": "wheel", "name": "mpy-blox", "version": "0.7.0", "pkg_sha256": "<hex>"},
#       {"type": "src", "path": "user_main.py", "pkg_sha256": "<hex>"}]
#
# 2. Signed form, version 1: one header line, then the body whose exact bytes
#    are MACed (the device never re-serialises JSON, so no canonicalisation):
#      mpypi-hmac-sha256 <HMAC-SHA256(key, body) as 64 lower-case hex>\n
#      {"v": 1,                     <- body format version
#       "seq": 42,                  <- must be greater than the device's last seq
#       "to": "channels/stable",    <- optional: the topic suffix it is valid on
#       "packages": [
#         {"type": "wheel", "name": "mpy-blox", "version": "0.7.0",
#          "tag": "mpy6-bytecode-esp32",          <- optional: pre-flight tag check
#          "pkg_sha256": "<hex>", "size": 123456}, <- size: bytes of the package
#         {"type": "src", "path": "user_main.py", "pkg_sha256": "<hex>", "size": 210}]}
#    The key is the UTF-8 bytes of the update.key setting, as provisioned.
import binascii
import json

from mpy_blox.hmac import compare_digest
from mpy_blox.hmac import hmac_sha256 as _hmac
from mpy_blox.update.names import normalize
from mpy_blox.update.paths import InvalidUpdate, check_src_path, fold  # noqa: F401  (re-exported)

FORMAT_VERSION = 1
SIGNED_HEADER = b"mpypi-hmac-sha256 "
MAX_LIST_BYTES = 16384  # a list is small; never buffer more than this
_HEX = "0123456789abcdef"


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


def check_entry(entry, signed):
    """Validate one list entry; return it normalised (size None if absent)."""
    if not isinstance(entry, dict):
        raise InvalidUpdate("a list entry is not an object")
    kind = entry.get("type")
    size = entry.get("size")
    if size is None and signed:
        raise InvalidUpdate("signed list entry without size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise InvalidUpdate("bad size")
    out = {"type": kind, "pkg_sha256": _sha(entry.get("pkg_sha256")), "size": size}
    if kind == "wheel":
        out["name"] = _text(entry, "name")
        out["version"] = _text(entry, "version")
        if entry.get("tag") is not None:
            out["tag"] = _text(entry, "tag")
    elif kind == "src":
        out["path"] = check_src_path(entry.get("path"))
    else:
        raise InvalidUpdate("unknown package type: %s" % str(kind)[:20])
    return out


def decode_list(payload, key=None, to=None):
    """Decode an update list; return (seq or None, [entries]).

    With a key only the signed form is accepted and its MAC must match. The
    caller checks seq against the last accepted one. `to` is the topic suffix
    the list arrived on ("channels/stable", "nodes/<id>/cmd").
    """
    if len(payload) > MAX_LIST_BYTES:
        raise InvalidUpdate("list too large")
    signed = payload[: len(SIGNED_HEADER)] == SIGNED_HEADER
    if key and not signed:
        raise InvalidUpdate("unsigned list refused: this device has an update key")
    seq = None
    if signed:
        nl = payload.find(b"\n")
        if nl < 0:
            raise InvalidUpdate("malformed signed list")
        body = memoryview(payload)[nl + 1 :]
        if key:
            try:
                mac = binascii.unhexlify(payload[len(SIGNED_HEADER) : nl])
            except ValueError:
                raise InvalidUpdate("malformed signature")
            if not compare_digest(mac, hmac_sha256(key, body)):
                raise InvalidUpdate("bad signature")
        doc = _json(bytes(body))
        if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION:
            raise InvalidUpdate("unsupported list version")
        seq = doc.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise InvalidUpdate("bad seq")
        if to is not None and doc.get("to", to) != to:
            raise InvalidUpdate("list is for %s" % str(doc.get("to"))[:40])
        entries = doc.get("packages")
    else:
        entries = _json(payload)
    if not isinstance(entries, list):
        raise InvalidUpdate("the list is not a JSON array of packages")
    out = [check_entry(e, signed) for e in entries]
    seen = set()
    for e in out:
        # A wheel by its normalised name, as the installer finds it (foo.bar
        # and foo-bar are one package); a src file by its path, as FAT compares it.
        ident = ("wheel", normalize(e["name"])) if "name" in e else ("src", fold(e["path"]))
        if ident in seen:
            raise InvalidUpdate("listed twice: %s" % ident[1])
        seen.add(ident)
    return seq, out


def accept_list(payload, key=None, last_seq=0, to=None):
    """decode_list, and refuse a replayed or older signed list (seq <= last_seq)."""
    seq, entries = decode_list(payload, key, to)
    if seq is not None and seq <= last_seq:
        raise InvalidUpdate("replayed or older list: seq %d, device at %d" % (seq, last_seq))
    return seq, entries


def _json(data):
    try:
        return json.loads(data)
    except (ValueError, UnicodeError):
        raise InvalidUpdate("malformed JSON list")


def encode_list(entries, seq=None, key=None, to=None):
    """The publisher's side: the seed form (no key) or the signed form (bytes)."""
    if key is None:
        return json.dumps(entries).encode()
    doc = {"v": FORMAT_VERSION, "seq": seq, "packages": entries}
    if to is not None:
        doc["to"] = to
    body = json.dumps(doc).encode()
    mac = binascii.hexlify(hmac_sha256(key, body))
    return SIGNED_HEADER + mac + b"\n" + body


def wheel_entry(name, version, sha256, size, tag=None):
    e = {"type": "wheel", "name": name, "version": version, "pkg_sha256": sha256, "size": size}
    if tag:
        e["tag"] = tag
    return e


def src_entry(path, sha256, size):
    return {"type": "src", "path": path, "pkg_sha256": sha256, "size": size}
