# The update's persistent state, owned here and nowhere else (the table is in
# docs/protocol.md, "Persistent state"): in NVS namespace mpypi the accepted
# seq and the pending install (which list topic, how many install boots it
# took so far, the list's digest, whether it finished, the last list finished
# from each list topic); on flash last_update (/.mpypi/last.json). Also the
# agent's info fields. The journal and the stage are mpypi_recover's; the src
# index is state's.
#
# Each NVS write is durable on its own (ESP-IDF: nvs_commit is a no-op), so a
# power cut can fall between any two. The pending install is therefore one
# blob, written whole by one set_blob (which ESP-IDF replaces atomically):
#   ib = to (1 byte) | tries (1) | finished (1) | SHA256 of the list (32, zeros: none)
#        | SHA256 of the last list finished from the channel topic (32) | from cmd (32)
# and seq is the one other key. set_pending writes seq first, then ib: a cut
# between leaves seq raised and the old ib (no install pending, not finished
# with this list), which the agent resumes as "equal but unfinished"; a cut
# before either changes nothing. Separate keys (seq, ib_list, ib_fin, ib_to)
# once let a cut leave a new list's digest beside the last list's finished
# flag: it looked finished and was never installed.
# The two per-topic digests are for keyless devices, whose unsigned lists have
# no seq: each reconnect delivers the retained cmd list and the retained
# channel list; with only the last finished list known, the other one looked
# new every time and the two were installed in turn forever. An ib of 35 bytes
# (written before them) reads with both zero.
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

NAMESPACE = "mpypi"  # NVS: this module's keys, and trust's rot_keys
_SEQ = "seq"  # NVS i32: the seq of the last accepted signed list
_IB = "ib"  # NVS blob: the pending install, as above
_IB_SIZE = const(99)
_IB_V1 = const(35)  # an ib written before the per-topic digests
_LIST = const(3)  # ib: the list's SHA256; the last finished from channel +32, cmd +64
_LOCKED = "locked"  # NVS i32: 1 once this device has held an update key (fail closed)
_LAST = "/.mpypi/last.json"  # last_update, as info reports it
CHANNEL = const(1)  # ib to: mpypi/channels/{update.channel}
CMD = const(2)  # ib to: mpypi/nodes/{id}/cmd

log = get_logger("update")


def nvs_seq():
    import esp32

    try:
        return esp32.NVS(NAMESPACE).get_i32(_SEQ)
    except OSError:
        return 0


def load_last():
    try:
        with open(_LAST) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_last(result, seq, error=None, digest=None, broker=True, firmware=None):
    """Write and return last_update; `digest` names the list (see digest()).

    result: "ok", "failed", "trial" (committed, proving itself) or
    "rolled_back"; broker=False: the install boot found no broker after its
    commit, so the trial does not wait for one; firmware: the OTA partition
    a firmware update set to boot (with "trial": its image is on trial)."""
    last = {"result": result, "at": seq}
    if firmware:
        last["firmware"] = firmware
    if error:
        last["error"] = error
    if digest:
        last["list"] = digest
    if not broker:
        last["broker"] = False
    try:
        _mkdir()
        with open(_LAST, "w") as f:
            json.dump(last, f)
    except (OSError, MemoryError) as e:  # a busy heap: report it still, over MQTT
        log.warning("cannot write %s: %r", _LAST, e)
    return last


def _ib():
    # The ib blob, or all zeros (nothing pending, nothing finished) without one.
    import esp32

    buf = bytearray(_IB_SIZE)
    try:
        if esp32.NVS(NAMESPACE).get_blob(_IB, buf) not in (_IB_SIZE, _IB_V1):
            buf[:] = bytes(_IB_SIZE)
    except OSError:
        pass  # never any install: ESP_ERR_NVS_NOT_FOUND
    return buf


def pending():
    """[to, tries] from NVS ib; to 0 means no install is pending.

    The app asks it at every boot: to set makes the boot an install boot."""
    ib = _ib()
    return [ib[0], ib[1]]


def set_pending(to, tries, seq=None, digest=None):
    """Store the pending topic, the try count, and (if given) a new seq and the
    list's digest. to == 0 marks that list finished, also as the last finished
    from the topic it was pending on. A power cut at any instant leaves the old
    state, the new one, or (with a seq) the seq alone raised."""
    import esp32

    nvs = esp32.NVS(NAMESPACE)
    ib = _ib()
    was = ib[0]
    ib[0] = to
    ib[1] = min(tries, 255)
    ib[2] = 0 if to else 1
    if digest is not None:
        ib[_LIST : _LIST + 32] = binascii.unhexlify(digest)
    if not to and was in (CHANNEL, CMD):
        at = _LIST + 32 * was
        ib[at : at + 32] = ib[_LIST : _LIST + 32]
    if seq is not None:
        nvs.set_i32(_SEQ, seq)
    nvs.set_blob(_IB, ib)


def raise_seq(seq):
    """Raise the accepted seq to `seq` (a provisioned floor); never lower it."""
    if seq > nvs_seq():
        import esp32

        esp32.NVS(NAMESPACE).set_i32(_SEQ, seq)
        return True
    return False


def pending_digest():
    """The digest of the list the pending install is for, or None."""
    d = _ib()[_LIST : _LIST + 32]
    return binascii.hexlify(d).decode() if any(d) else None


def finished(digest):
    """True if an install boot finished the list `digest` (ok or failed): the
    last list finished, or the last one from either list topic. In NVS, because
    last.json may fail to be written."""
    ib = _ib()
    d = binascii.unhexlify(digest)
    return (ib[2] and ib[_LIST : _LIST + 32] == d) or d in (ib[_LIST + 32 : _LIST + 64], ib[-32:])


def locked():
    """True once this device has held an update key: it never reads as keyless again."""
    import esp32

    try:
        return esp32.NVS(NAMESPACE).get_i32(_LOCKED) == 1
    except OSError:
        return False


def lock():
    """Mark the device locked (the app, at every boot that finds a key). Written
    once: a boot must not cost an NVS write. Outside the secure store, so that
    store's corruption cannot undo it."""
    if not locked():
        import esp32

        nvs = esp32.NVS(NAMESPACE)
        nvs.set_i32(_LOCKED, 1)
        nvs.commit()
        log.info("update key seen: updates locked to signed lists")


def unlock():
    """Forget the lock (provision.unprovision, over USB only)."""
    erase(_LOCKED)


def erase(key):
    """Erase `key` of NAMESPACE if it is there: one durable NVS write."""
    import esp32

    nvs = esp32.NVS(NAMESPACE)
    try:
        nvs.erase_key(key)
    except OSError:
        pass  # ESP_ERR_NVS_NOT_FOUND: nothing to forget
    nvs.commit()


def on_trial():
    """True while a committed set awaits its verdict (mpy_blox/update/trial.py):
    mpypi_recover's journal is applied. Asked by stat, without loading it.
    (A firmware update commits a journal too, bound to the image's partition.)"""
    try:
        os.stat("/.mpypi/applied")
        os.stat("/.mpypi/journal")
    except OSError:
        return False
    return True


def digest(payload):
    # Names a list in last_update: an unsigned list has no seq to know it by.
    return binascii.hexlify(hashlib.sha256(payload).digest()).decode()


_firmware_read = False  # info.firmware: the running image, the same all boot


def info(node, seq, last, available=None, reread=True):
    """Put the agent's fields into node.info_extra (docs/protocol.md).

    reread=False keeps the packages and src files of the last call: only an install
    boot changes them, and reading them opens files (a 1148-byte block on an ESP32,
    which a busy app's heap may not have when a list is announced)."""
    global _firmware_read
    extra = node.info_extra
    if reread or "src" not in extra:
        extra["packages"] = {k: v[0] for k, v in state.installed_wheels().items()}
        extra["src"] = state.src_index()
    extra["seq"] = seq
    extra["last_update"] = last
    if not _firmware_read:
        # Read at the first info of a boot, while the heap is whole: importing
        # fwstate later, in a busy app (Home Assistant on), could not find its block.
        _firmware_read = True
        from mpy_blox.update import fwstate

        fwstate.put(extra)  # info.firmware; the module unloads itself
    if available is not None:
        extra["available"] = available


async def status(node, st, qos=1, **fields):
    await node.publish_status(st, qos, **{k: v for k, v in fields.items() if v is not None})


def _mkdir():
    try:
        os.mkdir("/.mpypi")
    except OSError:
        pass  # it exists
