# What this device checks update lists with: a manifest.Trust built from its
# configuration (update.pubkey, Ed25519; update.key, HMAC), its Ed25519 key
# rotation and its lock (both kept by record, NVS namespace mpypi). The agent
# and the install boot ask trust(config) when a list arrives, never at boot: an
# idle device keeps the heap. Nothing here imports the list format but
# trust() itself.
#
# Fail closed (docs/protocol.md, "Fail closed"): a key that cannot be read never
# reads as "no key". Every list is refused ("updates locked: <why>") when
#   - the secure store is unreadable (corrupt, or copied from another device),
#     or /provision.json was left un-ingested (malformed, too large): the app
#     says so in config.key_error;
#   - update.pubkey or update.key is set but empty, not text or malformed;
#   - no key is set but the device is locked (record.locked(): it held one).
#
# Key rotation (Ed25519): a list signed by the current key may announce
# next_pubkey; the device then trusts [current, next]; the first list signed
# by the next key makes it current and the old one is forgotten (note()).
# Its state is owned here, not by record: only a list needs it, and record is
# on every boot's heap. NVS mpypi/rot_keys, one blob: the provisioned key, the
# current key and the next one if announced (32 bytes each). A blob recorded
# for another provisioned key is stale (provisioned anew): ignored.
#
# Expiry: a list's `expires` is enforced once the clock is set (now()).
from mpy_blox.log import get_logger
from mpy_blox.update import record

log = get_logger("update")

# The clock counts as set once it is past this Unix time (2025-01-01): an ESP32
# without NTP starts at its epoch (2000-01-01 on MicroPython's bare-metal
# ports, gmtime(0) says which), decades before any list was signed.
_CLOCK_FLOOR = const(1735689600)
_EPOCH_2000 = const(946684800)  # Unix time of 2000-01-01
_HEX = "0123456789abcdefABCDEF"
_ROTATION = "rot_keys"


def _refusal(config):
    # -> (pubkey text, hmac key text, why every list is refused): the policy
    # above, without the list format (mode() asks it at the agent's start).
    error = getattr(config, "key_error", None)
    if error:
        return None, None, error
    pub = config.get("update.pubkey")
    key = config.get("update.key")
    if pub is not None and not (
        isinstance(pub, str) and len(pub) == 64 and all(c in _HEX for c in pub)
    ):
        return None, None, "update.pubkey is not 64 hex digits"
    if key is not None and not (isinstance(key, str) and key):
        return None, None, "update.key is empty or not text"
    if pub is None and key is None and record.locked():
        return None, None, "this device held an update key and has none now"
    return pub, key, None


def trust(config):
    """The manifest.Trust of this device (docs/protocol.md, "Signed forms")."""
    import binascii

    from mpy_blox.update import manifest

    pub, key, refuse = _refusal(config)
    if refuse:
        return manifest.Trust(refuse=refuse)
    pubkeys = []
    if pub:
        pubkeys = _rotation(binascii.unhexlify(pub))
    return manifest.Trust(pubkeys, key)


def mode(config):
    """What info says: "ed25519", "hmac", "ed25519+hmac", "none" or "locked: <why>"."""
    pub, key, refuse = _refusal(config)
    if refuse:
        return "locked: " + refuse
    return "+".join([m for m, k in (("ed25519", pub), ("hmac", key)) if k]) or "none"


def signed(config):
    """True if this device takes only signed lists (it has, or had, an update key)."""
    pub, key, refuse = _refusal(config)
    return bool(pub or key or refuse)


def note(config, got):
    """Key rotation after a verified Ed25519 list `got` (a manifest.UpdateList)
    was accepted, before its seq is committed: signed by the next key (signer
    1), that key becomes the current one and the old one is forgotten; a
    next_pubkey is kept as the next key. One NVS blob (record), so a power cut
    leaves the old pair or the new one."""
    signer = got.signer
    if signer not in (0, 1):  # "hmac" or unverified: no rotation
        return
    import binascii

    provisioned = binascii.unhexlify(config.get("update.pubkey"))
    keys = _rotation(provisioned)
    current = keys[signer]
    nxt = got.next_pubkey
    if nxt == current:
        nxt = None
    if signer == 0 and (nxt is None or keys[1:] == [nxt]):
        return  # nothing new: no NVS write
    log.info("update key rotation: %s", "next key now current" if signer else "next key stored")
    import esp32

    # One blob: ESP-IDF writes a key all or nothing, so a power cut leaves the
    # old pair or the new one, never a device trusting a key it should not.
    nvs = esp32.NVS(record.NAMESPACE)
    nvs.set_blob(_ROTATION, provisioned + current + (nxt or b""))
    nvs.commit()


def _rotation(provisioned):
    # [current, next] (next only if announced) for the provisioned key.
    import esp32

    buf = bytearray(96)
    try:
        n = esp32.NVS(record.NAMESPACE).get_blob(_ROTATION, buf)
    except OSError:
        n = 0
    if n not in (64, 96) or buf[:32] != provisioned:
        return [provisioned]
    return [bytes(buf[32:64])] + ([bytes(buf[64:96])] if n == 96 else [])


def forget_rotation():
    """Back to the provisioned key (provision.unprovision, over USB only)."""
    record.erase(_ROTATION)


def now():
    """Unix time if the clock is set (past _CLOCK_FLOOR: NTP or an RTC set it),
    else None. time.time() counts from the port's epoch: 2000 on MicroPython's
    bare-metal ports, 1970 on unix (time.gmtime(0) says which)."""
    import time

    t = time.time()
    if time.gmtime(0)[0] == 2000:
        t += _EPOCH_2000
    return t if t >= _CLOCK_FLOOR else None


def check_expires(got, at):
    """Refuse a list whose `expires` is before `at` (now(); None: the clock is not set)."""
    if got.expires is not None and at is not None and at > got.expires:
        from mpy_blox.update.paths import InvalidUpdate

        raise InvalidUpdate("list expired")
