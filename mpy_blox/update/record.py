# What the update agent and the install boot both keep: in NVS the accepted
# seq and the pending install (which list topic, how many install boots it
# took so far); on flash last_update (/.mpypi/last.json); the agent's info fields.
#
# Small on purpose: the app's idle agent and the install boot both import it,
# and neither can spare the heap of the other's code.
import os
import json
import binascii
import hashlib

from mpy_blox.log import get_logger

NVS = "mpypi"
PENDING = "ib_to"  # NVS i32: the list topic to install from, 0 for none (mpy_blox.app reads it)
TRIES = "ib_tries"  # NVS i32: install boots started for it
CHANNEL = const(1)  # ib_to: mpypi/channels/{update.channel}
CMD = const(2)  # ib_to: mpypi/nodes/{id}/cmd
_DIGEST = "ib_list"  # NVS blob: the SHA256 of that list, for last_update
FINISHED = "ib_fin"  # NVS i32: 1 once the install boot finished with that list
_LAST = "/.mpypi/last.json"

log = get_logger("update")


def nvs_seq():
    import esp32

    try:
        return esp32.NVS(NVS).get_i32("seq")
    except OSError:
        return 0


def load_last():
    try:
        with open(_LAST) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_last(result, seq, error=None, digest=None):
    """Write and return last_update; `digest` names the list (see agent._digest)."""
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
    """(ib_to, ib_tries) from NVS; ib_to 0 means no install is pending."""
    import esp32

    nvs = esp32.NVS(NVS)
    values = []
    for key in (PENDING, TRIES):
        try:
            values.append(nvs.get_i32(key))
        except OSError:
            values.append(0)
    return values


def set_pending(to, tries, seq=None, digest=None):
    """Commit the pending topic, the try count and (if given) a new seq and the
    list's digest at once. to == 0 marks that list finished (FINISHED)."""
    import esp32

    nvs = esp32.NVS(NVS)
    if seq is not None:
        nvs.set_i32("seq", seq)
    if digest is not None:
        nvs.set_blob(_DIGEST, binascii.unhexlify(digest))
    nvs.set_i32(FINISHED, 0 if to else 1)
    nvs.set_i32(PENDING, to)
    nvs.set_i32(TRIES, tries)
    nvs.commit()


def pending_digest():
    """The digest of the list the pending install is for, or None."""
    import esp32

    buf = bytearray(32)
    try:
        esp32.NVS(NVS).get_blob(_DIGEST, buf)
    except OSError:
        return None
    return binascii.hexlify(buf).decode()


def finished_digest():
    """The digest of the last accepted list if an install boot finished with it
    (ok or failed): in NVS, because last.json may fail to be written."""
    import esp32

    try:
        if esp32.NVS(NVS).get_i32(FINISHED):
            return pending_digest()
    except OSError:
        pass  # never any install boot
    return None


def digest(payload):
    # Names a list in last_update: an unsigned list has no seq to know it by.
    return binascii.hexlify(hashlib.sha256(payload).digest()).decode()


def info(node, seq, last, available=None):
    """Put the agent's fields into node.info_extra (docs/protocol.md)."""
    from mpy_blox.update import state

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
