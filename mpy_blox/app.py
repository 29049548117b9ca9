# The app-managed runtime: main.py calls main(); everything runs in one asyncio loop.
#
# An accepted update list makes the next boot an install boot instead
# (mpy_blox.update.installboot, docs/protocol.md).
#
# Boot: settings.json -> logging level -> secure store + /provision.json ->
# boot_count -> WLAN -> MQTT (info/status on every connect, will = offline) ->
# update agent (if installed) -> user_main() under the supervisor. Boot waits
# for WLAN and MQTT only up to wlan.wait_s / mqtt.wait_s (default 30 s each):
# user code runs without a network too, and both reconnect in the background.
#
# User code may read the configuration as `mpy_blox.app.config` (a Config) and
# reach the MQTT client as `mpy_blox.app.client` (None without MQTT).
import asyncio
import gc
import sys

from mpy_blox import log as logging
from mpy_blox.log import get_logger

log = get_logger("app")

config = None
client = None
node = None

_FATAL_RESET_MS = const(5000)
# What the framework loads after user_main: the MQTT client and the update
# agent (39 KB), the connection, tasks and first messages (12 KB), measured on
# the 64-bit virtual board, where objects are twice their ESP32 size.
_FRAMEWORK_HEAP = const(52 * 1024)
_PENDING = "ib_to"  # NVS mpypi: mpy_blox.update.record.PENDING


def _boot_count():
    # Kept in NVS, not on flash: a boot must not cost a flash write.
    import esp32
    from mpy_blox.secure import NAMESPACE

    nvs = esp32.NVS(NAMESPACE)
    try:
        count = nvs.get_i32("boot_count") + 1
    except OSError:  # ESP_ERR_NVS_NOT_FOUND: the first boot
        count = 1
    try:
        nvs.set_i32("boot_count", count)
        nvs.commit()
    except OSError as e:  # NVS full or worn: not worth stopping the device for
        log.warning("cannot keep boot_count: %r", e)
    return count


def _configure():
    from mpy_blox import config as cfg
    from mpy_blox import provision
    from mpy_blox.secure import SecureStore

    settings = cfg.load_settings()
    level = cfg.Config(settings).get_str("logging.level", "INFO")
    try:
        logging.set_level(level)
    except ValueError:
        log.warning("logging.level %r unknown: using INFO", level)
    store = SecureStore()
    store.load()
    provision.ingest(store)
    return cfg.Config(settings, store.values)


def _drop(names):
    # Unload modules (full names): out of sys.modules and their parent package,
    # so their bytecode goes back to the heap at the next collection.
    for name in names:
        sys.modules.pop(name, None)
        parent, _, leaf = name.rpartition(".")
        try:
            delattr(sys.modules[parent], leaf)
        except (KeyError, AttributeError):  # the parent went first, or never had it
            pass
    gc.collect()


def _forget(*names):
    # Boot-only modules: dropping them returns their bytecode to the heap, which
    # the MQTT client and the update agent need more (compiling from source even
    # more so: it wants large contiguous blocks).
    _drop(["mpy_blox." + name for name in names])  # "provision", "mqtt.client"


def _forget_all(prefix, keep=()):
    # Every loaded module under mpy_blox.<prefix>, but those named in `keep`.
    loaded = [m[9:] for m in sys.modules if m.startswith("mpy_blox." + prefix)]  # 9: "mpy_blox."
    _forget(*[m for m in loaded if m not in keep])


async def _wlan_up(cfg):
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


async def _mqtt_up(mqtt, cfg, nd, announce=True):
    server = cfg.get_str("mqtt.server")
    if not server:
        log.error("no mqtt.server configured: running without MQTT and updates")
        return None
    from mpy_blox.node import OFFLINE, topic

    c = mqtt.MQTTClient(
        nd.device_id, server, cfg.get_int("mqtt.port", 1883),
        user=cfg.get_str("mqtt.username"), password=cfg.get_str("mqtt.password"),
        keepalive_s=cfg.get_int("mqtt.keepalive_s", 60),
        will=mqtt.Will(topic(nd.device_id, "status"), OFFLINE, retain=True, qos=1),
        ssl=cfg.get_bool("mqtt.ssl", False), ssl_params=cfg.get_dict("mqtt.ssl_params", {}),
    )
    nd.client = c
    if announce:  # info and status on every connect
        c.add_connect_callback(nd.on_connect)
    c.start()
    try:
        await asyncio.wait_for(c.connected(), cfg.get_int("mqtt.wait_s", 30))
    except asyncio.TimeoutError:
        log.warning("MQTT not connected yet: carrying on, it keeps retrying")
    return c


def _import(name):
    # An optional part that fails to import (MemoryError on a small heap, a
    # syntax error) is logged and left out; whatever it had half-imported is
    # dropped again so the rest of the boot gets that heap back.
    before = list(sys.modules)
    try:
        return __import__(name, None, None, ("_",))
    except ImportError as e:
        if ("'%s'" % name) in str(e) or "mpy_blox.update'" in str(e):
            return None  # not installed
        failure = e
    except Exception as e:  # noqa: BLE001  (MemoryError, SyntaxError: run without it)
        failure = e
    _drop([m for m in sys.modules if m not in before])
    log.exception("cannot import %s: running without it (free heap %d)", failure, name,
                  gc.mem_free())
    return None


async def _run():
    global config, client, node
    # Order matters on a 100 KB heap, which every import fragments (measured on
    # the unix port after all imports: 27 KB free, no free block over 700
    # bytes). The configuration comes first, while its buffers still find
    # room, and its boot-only modules are dropped again. Then, with the
    # framework as .mpy, user_main.py, whose compiling needs KB-sized blocks
    # (Supervisor.preload), but only if it leaves the framework its room; a
    # framework of .py sources needs those blocks more and compiles first.
    # Then the two large parts, MQTT client and update agent, before the small
    # ones, so that what a failed import leaves behind are holes the small
    # ones can still use. Without the agent (not installed, or no room) the
    # device runs and stays reachable.
    config = _configure()
    boot_count = _boot_count()
    install = _install_pending()
    _forget("provision", "secure")  # not hmac: the update list needs it again
    asyncio.Event, asyncio.wait_for  # noqa: B018  (asyncio loads these lazily: now)
    mqtt = None
    if install:
        mqtt = _import("mpy_blox.mqtt")
        ib = _import("mpy_blox.update.installboot") if mqtt is not None else None
        if ib is not None:
            mqtt = None  # the install boot drops the client's modules to commit
            ib = ib.InstallBoot(config, boot_count)
            await ib.download()
            return ib  # main() goes on with it, after this loop
        # It cannot be imported: the app boots and its agent reports the failure.
    sup = None
    if sys.modules["mpy_blox"].__file__.endswith(".mpy"):  # else the framework compiles first
        node, sup = _node_and_supervisor(config, boot_count)
        sup.preload(_FRAMEWORK_HEAP, _drop)
    if mqtt is None:
        mqtt = _import("mpy_blox.mqtt")
    agent = _import("mpy_blox.update.agent") if mqtt is not None else None
    if sup is None:
        node, sup = _node_and_supervisor(config, boot_count)
    await _wlan_up(config)
    if mqtt is None:
        log.error("no MQTT client: running without MQTT and updates")
    else:
        try:
            client = await _mqtt_up(mqtt, config, node)
        except Exception as e:  # noqa: BLE001  (no MQTT is no reason to stop user code)
            log.exception("MQTT failed to start", e)
    if agent is None or client is None:
        log.info("no update agent")
    else:
        try:
            await agent.start(client, config, node)
        except Exception as e:  # noqa: BLE001  (a broken agent must not stop the device)
            log.exception("update agent failed to start", e)
    asyncio.get_event_loop().set_exception_handler(sup.handle_exception)
    gc.collect()
    log.info("booted; free heap %d bytes", gc.mem_free())
    await sup.run()
    while True:  # the background tasks (WLAN, MQTT, agent) keep the device going
        await asyncio.sleep(3600)


def _node_and_supervisor(cfg, boot_count):
    from mpy_blox.node import Node, device_id
    from mpy_blox.supervisor import Supervisor

    nd = Node(device_id(), cfg, boot_count)
    log.info("%s boot %d", nd.device_id, nd.boot_count)
    return nd, Supervisor(cfg, nd)


def _grow_qstr_pool():
    # Indexing a str interns the 1-char result as a qstr, and a new qstr can
    # need a new, larger qstr pool: one contiguous block. Late in boot the heap
    # has no such block left (measured: 640-byte allocations failing with 25 KB
    # free, in the MQTT topic check and every later import). Interning the
    # printable characters now grows the pool while the heap is still whole.
    for c in range(32, 127):
        chr(c)


def _install_pending():
    # An update list is pending (docs/protocol.md, "The install boot"): this
    # boot runs mpy_blox.update.installboot instead of the app.
    import esp32

    try:
        return esp32.NVS("mpypi").get_i32(_PENDING) != 0
    except OSError:  # ESP_ERR_NVS_NOT_FOUND: never any
        return False


def main():
    """Run the device forever; on any unexpected error, log it and reset."""
    try:
        _grow_qstr_pool()
        ib = asyncio.run(_run())  # the app never returns; an install boot does
        # A new loop: the old one's finished tasks, and the stopped MQTT client
        # with them, can go (mpy_blox/update/installboot.py).
        asyncio.new_event_loop()
        ib.commit()
        asyncio.run(ib.report())  # ends in a reset
    except KeyboardInterrupt:
        raise  # Ctrl-C over USB (mpremote) must reach the REPL
    except BaseException as e:  # noqa: BLE001  (the device must never stop at a REPL)
        _fatal(e)


def _fatal(exc):
    import machine
    import time

    try:
        gc.collect()
        log.exception("fatal: %r; reset in %d s", exc, exc, _FATAL_RESET_MS // 1000)
        time.sleep_ms(_FATAL_RESET_MS)  # a pause that leaves time to Ctrl-C in
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001  (even logging may fail out of memory)
        pass
    machine.reset()
