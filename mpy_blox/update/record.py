# The update's persistent state, owned here and nowhere else (the table is in
# docs/protocol.md, "Persistent state"): in NVS namespace mpypi the accepted
# seq and the pending install (which list topic, how many install boots it
# took so far, the list's digest, whether it finished); on flash last_update
# (/.mpypi/last.json). Also the agent's info fields. The journal and the stage
# are mpypi_recover's; the src index is state's.
#
# Small on purpose: the app (pending(), at every boot), its idle agent
# and the install boot all import it, and none can spare the heap of the
# others' code.
import binascii
import hashlib
import json
import os

from mpy_blox.log import get_logger

# With record, early in boot: the agent's info needs it at its start, when a
# 1200-byte file buffer for its import (and names') may find no block left.
from mpy_blox.update import state

_NVS = "mpypi"
_SEQ = "seq"  # NVS i32: the seq of the last accepted signed list
_PENDING = "ib_to"  # NVS i32: the list topic to install from, 0 for none
_TRIES = "ib_tries"  # NVS i32: install boots started for it
_DIGEST = "ib_list"  # NVS blob: the SHA256 of that list, for last_update
_FINISHED = "ib_fin"  # NVS i32: 1 once the install boot finished with that list
_LOCKED = "locked"  # NVS i32: 1 once this device has held an update key (fail closed)
_LAST = "/.mpypi/last.json"  # last_update, as info reports it
CHANNEL = const(1)  # ib_to: mpypi/channels/{update.channel}
CMD = const(2)  # ib_to: mpypi/nodes/{id}/cmd

log = get_logger("update")


def nvs_seq():
    import esp32

    try:
        return esp32.NVS(_NVS).get_i32(_SEQ)
    except OSError:
        return 0


def load_last():
    try:
        with open(_LAST) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_last(result, seq, error=None, digest=None):
    """Write and return last_update; `digest` names the list (see digest())."""
    last = {"result": result, "at": seq}
    if error:
        last["error"] = error
    if digest:
        last["list"] = digest
    try:
        _mkdir()
        with open(_LAST, "w") as f:
            json.dump(last, f)
    except (OSError, MemoryError) as e:  # a busy heap: report it still, over MQTT
        log.warning("cannot write %s: %r", _LAST, e)
    return last


def pending():
    """(ib_to, ib_tries) from NVS; ib_to 0 means no install is pending.

    The app asks it at every boot: ib_to set makes the boot an install boot."""
    import esp32

    nvs = esp32.NVS(_NVS)
    values = []
    for key in (_PENDING, _TRIES):
        try:
            values.append(nvs.get_i32(key))
        except OSError:
            values.append(0)
    return values


def set_pending(to, tries, seq=None, digest=None):
    """Commit the pending topic, the try count and (if given) a new seq and the
    list's digest at once. to == 0 marks that list finished (ib_fin)."""
    import esp32

    nvs = esp32.NVS(_NVS)
    if seq is not None:
        nvs.set_i32(_SEQ, seq)
    if digest is not None:
        nvs.set_blob(_DIGEST, binascii.unhexlify(digest))
    nvs.set_i32(_FINISHED, 0 if to else 1)
    nvs.set_i32(_PENDING, to)
    nvs.set_i32(_TRIES, tries)
    nvs.commit()


def pending_digest():
    """The digest of the list the pending install is for, or None."""
    import esp32

    buf = bytearray(32)
    try:
        esp32.NVS(_NVS).get_blob(_DIGEST, buf)
    except OSError:
        return None
    return binascii.hexlify(buf).decode()


def finished_digest():
    """The digest of the last accepted list if an install boot finished with it
    (ok or failed): in NVS, because last.json may fail to be written."""
    import esp32

    try:
        if esp32.NVS(_NVS).get_i32(_FINISHED):
            return pending_digest()
    except OSError:
        pass  # never any install boot
    return None


def locked():
    """True once this device has held an update key: it never reads as keyless again."""
    import esp32

    try:
        return esp32.NVS(_NVS).get_i32(_LOCKED) == 1
    except OSError:
        return False


def lock():
    """Mark the device locked (the app, at every boot that finds a key). Written
    once: a boot must not cost an NVS write. Outside the secure store, so that
    store's corruption cannot undo it."""
    if not locked():
        import esp32

        nvs = esp32.NVS(_NVS)
        nvs.set_i32(_LOCKED, 1)
        nvs.commit()
        log.info("update key seen: updates locked to signed lists")


def unlock():
    """Forget the lock (provision.unprovision, over USB only)."""
    import esp32

    nvs = esp32.NVS(_NVS)
    try:
        nvs.erase_key(_LOCKED)
    except OSError:
        pass  # not locked
    nvs.commit()


def digest(payload):
    # Names a list in last_update: an unsigned list has no seq to know it by.
    return binascii.hexlify(hashlib.sha256(payload).digest()).decode()


def info(node, seq, last, available=None):
    """Put the agent's fields into node.info_extra (docs/protocol.md)."""
    extra = node.info_extra
    extra["packages"] = {k: v[0] for k, v in state.installed_wheels().items()}
    extra["src"] = state.src_index()
    extra["seq"] = seq
    extra["last_update"] = last
    if available is not None:
        extra["available"] = available


async def status(node, st, qos=1, **fields):
    await node.publish_status(st, qos, **{k: v for k, v in fields.items() if v is not None})


def _mkdir():
    try:
        os.mkdir("/.mpypi")
    except OSError:
        pass  # it exists
