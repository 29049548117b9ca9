# The install boot: installs the list the agent accepted before the reset.
#
# mpy_blox.app runs this instead of the app while NVS mpypi/ib_to is set:
# WLAN, MQTT and the install core only (no user code, no supervisor, no agent).
# It fetches the retained list again, downloads each package from its retained
# topic straight into the stage, stages, commits, and resets into the new code.
# No loop: each start counts itself in NVS first and every outcome clears
# ib_to, so an install boot that dies (power cut, crash) runs at most
# _MAX_TRIES times. A power cut leaves the old or the new set (the journal).
import gc

from mpy_blox import app
from mpy_blox.log import get_logger
from mpy_blox.update import record
from mpy_blox.update.fetch import Fetcher

_MAX_TRIES = const(3)

log = get_logger("update")


async def run(config, mqtt, boot_count):
    """The install boot, from mpy_blox.app once the configuration and MQTT
    module are loaded (mqtt not None); it ends in a reset."""
    import machine
    from mpy_blox.node import Node, device_id

    to, tries = record.pending()
    tries += 1
    record.set_pending(to, tries)  # counted before anything else can fail
    node = app.node = Node(device_id(), config, boot_count)
    node.state = "installing"
    log.info("%s install boot %d (attempt %d)", node.device_id, boot_count, tries)
    error = None
    seq = record.nvs_seq()
    if tries > _MAX_TRIES:
        error = "install boot did not finish in %d attempts" % _MAX_TRIES
        # Before the network, which may be what keeps failing. Named as the
        # agent accepted it, so that the app does not take it up again.
        signed = config.get_str("update.key") and seq or None
        _done(error, signed, record.pending_digest())
    record.info(node, seq, record.load_last())  # before the connect: its info carries it
    await app._wlan_up(config)
    client = app.client = await app._mqtt_up(mqtt, config, node)
    if error is None and (client is None or not client.is_connected):
        log.error("install boot without a broker: retrying after a reset")
        machine.reset()  # counted: after _MAX_TRIES the app boots again
    # The install core after the connection has its buffers (it takes fewer,
    # smaller blocks); without room for it, the next attempt may fare better.
    if error is None and app._import("mpy_blox.update.install") is None:
        log.error("no room for the install core: retrying after a reset")
        machine.reset()  # counted
    ib = Fetcher(client, node)
    installed = False
    if error is None:
        if to == record.CMD:
            to = "nodes/%s/cmd" % node.device_id
        else:
            to = "channels/" + config.get_str("update.channel", "stable")
        listed = digest = None
        try:
            from mpy_blox.update import manifest

            payload = await ib.fetch_list(to)
            digest = record.digest(payload)
            key = config.get_str("update.key") or None
            listed, entries = manifest.decode_list(payload, key, to)
            payload = None
            if listed is not None:
                if listed < seq:
                    raise manifest.InvalidUpdate("replayed or older list: seq %d, device at %d"
                                                 % (listed, seq))
                if listed > seq:  # a newer list replaced the accepted one: accept it
                    record.set_pending(record.pending()[0], tries, listed, digest)
                    seq = listed
            gc.collect()
            log.info("install boot; free heap %d bytes", gc.mem_free())
            installed = await ib.install(entries)
        except ValueError as e:  # InvalidUpdate: a short reason for status
            error = str(e)
        except Exception as e:  # noqa: BLE001  (report it; the app boots next either way)
            log.exception("install failed", e)
            error = repr(e)[:100]
        _done(error, listed, digest)
    record.info(node, seq, record.load_last())
    await node.publish_info()
    if error is not None:
        log.error("update failed: %s", error)
        await ib.status("failed", error=error, package=ib.current)
    elif installed:
        log.info("update installed: resetting")
        await ib.status("rebooting", seq=listed)
    else:
        await ib.status("idle")
    machine.reset()


def _done(error, seq=None, digest=None):
    # last_update names the list (seq and digest) even when it failed, so the
    # retained copy is not taken up again: a new list (a new seq) is needed.
    # Then nothing is pending: the next boot is the app's.
    record.save_last("failed" if error else "ok", seq, error, digest)
    record.set_pending(0, 0)
