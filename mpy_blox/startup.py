# The boot steps the app boot (mpy_blox.app) and the install boot
# (mpy_blox.update.installboot) share: the network up, the MQTT client up,
# an optional part imported, modules unloaded again. The two boots call
# these; neither reaches into the other.
import asyncio
import gc
import sys

from mpy_blox.log import get_logger

log = get_logger("app")


def drop(names):
    """Unload modules (full names): out of sys.modules and their parent package,
    so their bytecode goes back to the heap at the next collection."""
    for name in names:
        sys.modules.pop(name, None)
        parent, _, leaf = name.rpartition(".")
        try:
            delattr(sys.modules[parent], leaf)
        except (KeyError, AttributeError):  # the parent went first, or never had it
            pass
    gc.collect()


def drop_all(prefix, keep=()):
    """Unload every loaded module whose name starts with `prefix`, but `keep`."""
    drop([m for m in sys.modules if m.startswith(prefix) and m not in keep])


def import_optional(name):
    """Import `name`; None if it is not installed or fails to import.

    An optional part that fails to import (MemoryError on a small heap, a
    syntax error) is logged and left out; whatever it had half-imported is
    dropped again so the rest of the boot gets that heap back.
    """
    before = list(sys.modules)
    try:
        return __import__(name, None, None, ("_",))
    except ImportError as e:
        if ("'%s'" % name) in str(e) or "mpy_blox.update'" in str(e):
            return None  # not installed
        failure = e
    except Exception as e:  # noqa: BLE001  (MemoryError, SyntaxError: run without it)
        failure = e
    drop([m for m in sys.modules if m not in before])
    log.exception(
        "cannot import %s: running without it (free heap %d)", failure, name, gc.mem_free()
    )
    return None


async def wlan_up(cfg):
    """Start keeping the WLAN up; wait for it up to wlan.wait_s."""
    ssid = cfg.get_str("wlan.ssid")
    if not ssid:
        log.info("no wlan.ssid provisioned: using the network as it is")
        return
    from mpy_blox import wlan

    up = asyncio.Event()
    asyncio.create_task(wlan.keep(ssid, cfg.get_str("wlan.psk"), cfg.get_str("hostname"), up))
    try:
        await asyncio.wait_for(up.wait(), cfg.get_int("wlan.wait_s", 30))
    except asyncio.TimeoutError:
        log.warning("no WLAN yet: carrying on, it keeps retrying")


async def mqtt_up(mqtt, cfg, nd, announce=True):
    """Start node `nd`'s MQTT client (module `mqtt`); wait for it up to mqtt.wait_s.

    Returns the client, None without mqtt.server. announce: publish info and
    status on every connect (nd.on_connect), and again when mpypi/announce asks.
    """
    server = cfg.get_str("mqtt.server")
    if not server:
        log.error("no mqtt.server configured: running without MQTT and updates")
        return None
    from mpy_blox.node import OFFLINE
    from mpy_blox.topics import ANNOUNCE, node_topic

    ssl = cfg.get_bool("mqtt.ssl", False)
    ssl_params = cfg.get_dict("mqtt.ssl_params", {})
    insecure = cfg.get_bool("mqtt.ssl_insecure", False)
    if ssl and not insecure and not ssl_params.get("ca_file"):
        # Fail closed: whoever answers could be in the middle, and would get
        # mqtt.password. Said once on the console; user code runs on without MQTT.
        log.error(mqtt.dial.NO_CA)
        return None
    c = mqtt.MQTTClient(
        nd.device_id,
        server,
        cfg.get_int("mqtt.port", 1883),
        user=cfg.get_str("mqtt.username"),
        password=cfg.get_str("mqtt.password"),
        keepalive_s=cfg.get_int("mqtt.keepalive_s", 60),
        will=mqtt.Will(node_topic(nd.device_id, "status"), OFFLINE, retain=True, qos=1),
        ssl=ssl,
        ssl_params=ssl_params,
        ssl_insecure=insecure,
    )
    nd.client = c
    if announce:
        c.add_connect_callback(nd.on_connect)
    if announce and nd.state != "installing":
        # Registered only (not connected yet): sent with the others at connect.
        # Not by an install boot: its heap and its link are the download's (its
        # progress is published live anyway).
        from mpy_blox import presence

        presence.node = nd
        await c.subscribe(ANNOUNCE, presence.handler, 0)
    c.start()
    try:
        await asyncio.wait_for(c.connected(), cfg.get_int("mqtt.wait_s", 30))
    except asyncio.TimeoutError:
        log.warning("MQTT not connected yet: carrying on, it keeps retrying")
    return c
