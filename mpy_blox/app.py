# The app-managed runtime: main.py calls main(); everything runs in one asyncio loop.
#
# An accepted update list makes the next boot an install boot instead
# (mpy_blox.update.installboot, docs/protocol.md). The steps both boots take
# (WLAN, MQTT, optional imports, unloading) are mpy_blox.startup's.
#
# Boot: settings.json -> logging level -> secure store + /provision.json ->
# boot_count -> WLAN -> NTP before a TLS broker (mpy_blox/services.py, `ntp.enabled`:
# waited for up to ntp.wait_s, the certificate's dates need it) ->
# MQTT (info/status on every connect, will = offline) ->
# update agent (if installed) -> the optional services (mpy_blox/services.py:
# Home Assistant, the remote log, NTP in the background, every ntp.interval_s)
# -> user_main() under the supervisor, and beside
# it the trial of a new update (mpy_blox.update.trial) if one is on trial, and
# the watchdog's feeder (mpy_blox.watchdog, started by the supervisor). Boot waits
# for WLAN and MQTT only up to wlan.wait_s / mqtt.wait_s (default 30 s each):
# user code runs without a network too, and both reconnect in the background.
#
# User code may read the configuration as `mpy_blox.app.config` (a Config) and
# reach the MQTT client as `mpy_blox.app.client` (None without MQTT).
import asyncio
import gc
import sys
import time

from mpy_blox import log as logging
from mpy_blox import startup
from mpy_blox.log import get_logger

log = get_logger("app")

config = None
client = None
node = None
_on_trial = False  # a new update is on trial: a fatal error rolls it back

_FATAL_RESET_MS = const(5000)
# The room user_main.py must leave the framework to be imported early
# (Supervisor.preload); the figures on both lanes are in docs/runtime.md,
# "Memory": the framework takes 47 KB after it on the 64-bit board and 32 KB
# on the 32-bit one (an ESP32's sizes), so 52 KB leaves 5 KB to spare on the
# first and 20 KB on the second.
_FRAMEWORK_HEAP = const(52 * 1024)


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
    conf = cfg.Config(settings, store.values)
    # Fail closed: a key we may not have read is not "no key" (update/trust.py).
    conf.key_error = provision.key_error(store)
    return conf


async def _run():
    global config, client, node, startup
    # Order matters on a 100 KB heap (docs/runtime.md, "Heap"): every import
    # fragments it. The configuration comes first, while its buffers still
    # find room, and its boot-only modules are dropped again (their bytecode
    # goes back to the heap; not hmac: the update list needs it again). A
    # framework of .py sources then compiles its largest part, the MQTT
    # client, while the heap still has KB-sized blocks; a .mpy framework
    # asks record (cheap as .mpy) whether this is an install boot, then
    # imports user_main.py early (Supervisor.preload), whose compiling wants
    # those blocks, if it leaves the framework its room. Then the two large
    # parts, MQTT client and update agent, before the small ones, so that what
    # a failed import leaves behind are holes the small ones can still use.
    # Without the agent (not installed, or no room) the device runs and stays
    # reachable.
    started = time.ticks_ms()  # a trial's deadline counts from here
    config = _configure()
    boot_count = _boot_count()
    startup.drop(["mpy_blox.provision", "mpy_blox.scrub", "mpy_blox.secure"])
    mpy = sys.modules["mpy_blox"].__file__.endswith(".mpy")
    mqtt = None if mpy else startup.import_optional("mpy_blox.mqtt")
    if _install_pending(config):
        if mqtt is None:
            mqtt = startup.import_optional("mpy_blox.mqtt")
        ib = startup.import_optional("mpy_blox.update.installboot") if mqtt is not None else None
        if ib is not None:
            mqtt = None  # the install boot drops the client's modules to commit
            ib = ib.InstallBoot(config, boot_count)
            node = ib.node
            await ib.download()
            return ib  # main() goes on with it, after this loop
        # It cannot be imported: the app boots and its agent reports the failure.
    sup = None
    if mpy:
        node, sup = _node_and_supervisor(config, boot_count)
        sup.preload(_FRAMEWORK_HEAP, startup.drop)
    if mqtt is None:
        mqtt = startup.import_optional("mpy_blox.mqtt")
    agent = startup.import_optional("mpy_blox.update.agent") if mqtt is not None else None
    if sup is None:
        node, sup = _node_and_supervisor(config, boot_count)
    trial = _trial(config, sup, started)  # before MQTT: its connect says "trial"
    await startup.wlan_up(config)
    if config.get_bool("mqtt.ssl", False):  # the certificate's dates need the clock: NTP first
        from mpy_blox import services  # it drops itself after each step

        await services.clock_for_tls(config, node)
        services = None
    if mqtt is None:
        log.error("no MQTT client: running without MQTT and updates")
    else:
        try:
            client = await startup.mqtt_up(mqtt, config, node)
        except Exception as e:  # noqa: BLE001  (no MQTT is no reason to stop user code)
            log.exception("MQTT failed to start", e)
    # The boot steps are done: their code goes back to the heap, for the
    # agent's start (measured: docs/runtime.md, "Memory"). The install boot
    # keeps them to its end.
    sys.modules.pop("mpy_blox.startup", None)
    startup = sys.modules["mpy_blox"].startup = None
    if agent is None or client is None:
        log.info("no update agent")
    else:
        try:
            agent = await agent.start(client, config, node, trial and trial.done)
        except Exception as e:  # noqa: BLE001  (a broken agent must not stop the device)
            agent = None
            log.exception("update agent failed to start", e)
    if (
        config.get_bool("hass.enabled", False)
        or config.get_bool("logging.remote", False)
        or config.get_bool("ntp.enabled", True)
    ):
        from mpy_blox import services  # only then: a device without them pays nothing

        await services.start(client, config, node, agent)
        services = None
    asyncio.get_event_loop().set_exception_handler(sup.handle_exception)
    gc.collect()
    log.info("booted; free heap %d bytes", gc.mem_free())
    if trial is not None:
        asyncio.create_task(trial.run(sup, lambda: client))
    await sup.run()
    while True:  # the background tasks (WLAN, MQTT, agent) keep the device going
        await asyncio.sleep(3600)


def _node_and_supervisor(cfg, boot_count):
    from mpy_blox.node import Node, device_id
    from mpy_blox.supervisor import Supervisor

    nd = Node(device_id(), cfg, boot_count)
    log.info("%s boot %d", nd.device_id, nd.boot_count)
    return nd, Supervisor(cfg, nd)


def _trial(cfg, sup, started):
    # A committed update on trial (mpy_blox/update/trial.py): it rolls back at
    # the first failure of user_main, and confirms once the set is healthy.
    global _on_trial
    try:
        from mpy_blox.update import record
    except ImportError:  # a framework without the update package
        return None
    if not record.on_trial():
        return None
    from mpy_blox.update.trial import Trial, user_main_failed

    trial = Trial(cfg, node, started)
    sup.on_failure = lambda exc: trial.failed(user_main_failed(exc))
    _on_trial = True
    log.info("on trial: %d s to prove the update healthy", trial.left_s())
    return trial


def _grow_qstr_pool():
    # Indexing a str interns the 1-char result as a qstr, and a new qstr can
    # need a new qstr pool: one contiguous block, twice the last. Interning the
    # printable characters grows it while the heap is still whole. Only where
    # pointers are 8 bytes: docs/runtime.md, "Memory", has what it buys there
    # and what it costs on the 32-bit lane (an ESP32's sizes).
    if sys.maxsize > 0x7FFFFFFF:
        for c in range(32, 127):
            chr(c)


def _install_pending(cfg):
    # An update list is pending (docs/protocol.md, "The install boot"): this
    # boot runs mpy_blox.update.installboot instead of the app. Asked of
    # record, the state's owner, which the agent imports later anyway.
    try:
        from mpy_blox.update import record
    except ImportError:  # a framework without the update package
        return False
    # First, before any list can arrive: a device that has an update key is
    # locked for good (docs/protocol.md, "Fail closed"); if the key becomes
    # unreadable later, it refuses every list instead of taking unsigned ones.
    if cfg.get("update.key") is not None or cfg.get("update.pubkey") is not None:
        record.lock()
    return record.pending()[0] != 0


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
        if "mpy_blox.watchdog" in sys.modules:  # time for the USB session: see there
            sys.modules["mpy_blox.watchdog"].hold()
        raise  # Ctrl-C over USB (mpremote) must reach the REPL
    except BaseException as e:  # noqa: BLE001  (the device must never stop at a REPL)
        _fatal(e)


def _fatal(exc):
    import machine

    try:
        gc.collect()
        log.exception("fatal: %r; reset in %d s", exc, exc, _FATAL_RESET_MS // 1000)
        if _on_trial:  # the new framework fails: boot recovery puts the old one back
            import mpypi_recover

            mpypi_recover.request_rollback(("framework failed: %r" % (exc,))[:160])
        time.sleep_ms(_FATAL_RESET_MS)  # a pause that leaves time to Ctrl-C in
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001  (even logging may fail out of memory)
        pass
    machine.reset()
