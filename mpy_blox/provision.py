# Provisioning: /provision.json (plain secrets, dropped on the flash over USB)
# goes into the secure store and is then scrubbed from the flash; `mpy-blox
# deploy provision` calls apply() over the REPL instead, so no file is written.
#
#   {"wlan.ssid": "home", "wlan.psk": "...", "mqtt.password": "...", "update.key": "...",
#    "update.seq": 42}
#
# Keys are merged into what the store holds; a null value removes that key, and
# "unprovision": true empties the store first. "update.seq" is not stored: it is
# the fleet's seq floor, raised into NVS (record.raise_seq, never lowered) so an
# old signed list cannot be replayed onto a new device. Order, so that a power
# cut at any instant loses nothing and duplicates nothing:
#   1. read and parse the file (malformed: logged, file kept, nothing changes)
#   2. merge into the stored values; write NVS only if that changes something (a
#      second run after a cut finds the merge already done): one set_blob
#   3. read the blob back from NVS and compare (verify)
#   4. raise the seq floor (one set_i32; idempotent)
#   5. only then zero the file, clear the raw flash of its secrets and delete it
#      (mpy_blox.scrub; the zeroed file marks a scrub a cut interrupted).
# A cut before 2 or between 2 and 5 leaves the file; the next boot redoes the
# merge, which is idempotent. The plain file lives only until step 5.
import json
import os

from mpy_blox.log import get_logger

PROVISION = "/provision.json"
SEQ = "update.seq"  # the seq floor: to NVS (update/record.py), not to the store
_MAX_FILE = const(2048)  # the store holds at most about this much
_PUBLIC = ("wlan.ssid", "update.pubkey")  # not secret: not looked for on the flash
_SCRUBBING = "scrubbing"  # _read: the file is the zeroed marker of a scrub

log = get_logger("provision")


def _read(path):
    try:
        size = os.stat(path)[6]
    except OSError:
        return None  # nothing to provision: the normal case
    if size > _MAX_FILE:
        log.error("%s is too large (%d > %d bytes): not provisioned", path, size, _MAX_FILE)
        return None
    try:
        with open(path, "rb") as f:
            if f.read(1) == b"\0":
                return _SCRUBBING  # zeroed by scrub(): a cut came before its end
            f.seek(0)
            values = json.load(f)
    except (OSError, ValueError) as e:
        log.error("%s is malformed (%s): not provisioned, file kept", path, e)
        return None
    if not isinstance(values, dict):
        log.error("%s is malformed (not a JSON object): not provisioned, file kept", path)
        return None
    return values


def key_error(store, path=PROVISION):
    """Why an update key may be unreadable after ingest(), or None: the app
    puts it in its Config for mpy_blox.update.trust, which then refuses every
    update list instead of reading "no key" (fail closed)."""
    if store.state == "corrupt":
        return "secure store unreadable"
    try:
        os.stat(path)
        return "%s not provisioned" % path  # malformed, too large, or not stored
    except OSError:
        return None  # ingested, or none: the normal case


def merge(stored, update):
    """The store's new contents after applying a provision.json dict."""
    merged = {} if update.get("unprovision") is True else dict(stored)
    for key, value in update.items():
        if key == "unprovision":
            continue
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def apply(store, update):
    """Merge `update` (a provision dict) into `store` (loaded) and raise the seq
    floor (its "update.seq", taken out). None once stored and read back, else the
    reason. One path for provision.json and for `deploy provision` over the REPL."""
    seq = update.pop(SEQ, None)
    if seq is not None and (
        isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= 0x7FFFFFFF
    ):
        return "%s must be a whole number from 0 to 2147483647, not %r" % (SEQ, seq)
    merged = merge(store.values, update)
    try:
        if merged != store.values or store.state != "ok":
            store.save(merged)
        if store.load() != merged:
            return "the secure store did not read back as written"
        if seq is not None:
            try:
                from mpy_blox.update import record
            except ImportError:  # nothing to update, nothing to replay
                log.warning("%s ignored: the update package is not installed", SEQ)
                return None
            if record.raise_seq(seq):
                log.info("update seq floor raised to %d", seq)
    except (OSError, ValueError) as e:
        return "cannot store secrets (%s)" % e
    return None


def _scrub(path, values, names=None):
    from mpy_blox import scrub

    secret = [k for k in (names or values) if k not in _PUBLIC]
    try:
        scrub.scrub(path, scrub.needles(values, secret))
    except OSError as e:  # the secrets are stored: the next boot scrubs again
        log.error("secrets stored, but cannot scrub %s (%s)", path, e)
        return False
    return True


def ingest(store, path=PROVISION):
    """Move `path` into `store` (a loaded SecureStore); True if the file was consumed."""
    update = _read(path)
    if update is None:
        return False
    if update == _SCRUBBING:
        log.info("finishing the scrub of %s", path)
        return _scrub(path, store.values)
    names = [k for k in update if k not in ("unprovision", SEQ)]
    values = dict(update)  # the plain values, to look for on the flash
    error = apply(store, update)
    if error:
        log.error("%s: %s kept", error, path)
        return False
    if not _scrub(path, values, names):
        return False
    log.info("provisioned %s; %s removed", ", ".join(sorted(names)) or "nothing", path)
    return True


def provision_text(text):
    """`mpy-blox deploy provision` over the REPL: a provision.json's text, merged as
    the file would be (apply), with nothing written to the filesystem. The result line."""
    from mpy_blox.secure import SecureStore

    try:
        update = json.loads(text)
    except ValueError:
        return "failed: not JSON"
    if not isinstance(update, dict):
        return "failed: not a JSON object"
    names = sorted(k for k in update if k not in ("unprovision", SEQ))
    store = SecureStore()
    store.load()
    error = apply(store, update)
    if error:
        return "failed: " + error
    return "provisioned " + (", ".join(names) or "nothing")


def unprovision(store=None):
    """Clear the secure store, and with this device's store the update lock and
    key rotation (for `make unprovision` over mpremote: physical access is the
    authority; a store passed in, as tests do, is not this device's NVS)."""
    own = store is None
    if own:
        from mpy_blox.secure import SecureStore

        store = SecureStore()
    store.clear()
    if own:
        try:  # after the store: a cut between leaves the device locked, not open
            from mpy_blox.update import record, trust

            trust.forget_rotation()
            record.unlock()
            log.info("secure store cleared; updates unlocked")
            return
        except ImportError:  # a framework without the update package
            pass
    log.info("secure store cleared")
