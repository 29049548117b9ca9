# Provisioning: /provision.json (plain secrets, written once over USB) goes into
# the secure store and is then deleted.
#
#   {"wlan.ssid": "home", "wlan.psk": "...", "mqtt.password": "...", "update.key": "..."}
#
# Keys are merged into what the store holds; a null value removes that key, and
# "unprovision": true empties the store first. Order, so that a power cut at any
# instant loses nothing and duplicates nothing:
#   1. read and parse the file (malformed: logged, file kept, nothing changes)
#   2. merge into the stored values; write and commit to NVS only if that changes
#      something (a second run after a cut finds the merge already done)
#   3. read the blob back from NVS and compare (verify)
#   4. only then delete the file.
# A cut before 2 or between 2 and 4 leaves the file; the next boot redoes the
# merge, which is idempotent. The plain file lives only until step 4.
import json
import os

from mpy_blox.log import get_logger

PROVISION = "/provision.json"
_MAX_FILE = const(2048)  # the store holds at most about this much

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
        with open(path) as f:
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


def ingest(store, path=PROVISION):
    """Move `path` into `store` (a loaded SecureStore); True if the file was consumed."""
    update = _read(path)
    if update is None:
        return False
    merged = merge(store.values, update)
    try:
        if merged != store.values or store.state != "ok":
            store.save(merged)
        if store.load() != merged:
            log.error("secure store did not read back as written: %s kept", path)
            return False
    except (OSError, ValueError) as e:
        log.error("cannot store secrets (%s): %s kept", e, path)
        return False
    try:
        os.remove(path)
    except OSError as e:  # the secrets are stored: the next boot retries the delete
        log.error("secrets stored, but cannot delete %s (%s)", path, e)
        return False
    names = [k for k in update if k != "unprovision"]
    log.info("provisioned %s; %s removed", ", ".join(sorted(names)) or "nothing", path)
    return True


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
