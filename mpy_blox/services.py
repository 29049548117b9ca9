# The optional services, started by the app after MQTT and the update agent:
# Home Assistant discovery (mpy_blox/hass/, `hass.enabled`), the remote log
# (mpy_blox/remotelog.py, `logging.remote`) and the clock from NTP
# (mpy_blox/timekeeper.py, `ntp.enabled`). The app imports this module only
# when one of them is enabled, and each step drops it again (_drop; the app
# keeps no name for it): the code of a service nobody enabled never takes heap
# on a device, nor this module's once its step is done.
import asyncio
import sys

from mpy_blox.log import get_logger

log = get_logger("app")


async def clock_for_tls(config, node):
    """Before a TLS broker (mqtt.ssl): keep the time from now on, and wait for the
    first NTP round up to ntp.wait_s unless the clock is set already.

    An ESP32's mbedTLS checks the certificate's dates (MicroPython >= 1.22), which
    an unset clock (2000-01-01) fails. A clock that ran on over a reset needs no
    wait; a round that fails or does not end in time lets the boot go on: MQTT
    retries, and connects once a later round sets the clock.
    """
    try:
        if config.get_bool("ntp.enabled", True):
            tried = asyncio.Event()  # set after the first round, whatever its outcome
            _keep_time(config, node, 0, tried)
            if not _clock_set():
                try:
                    await asyncio.wait_for(tried.wait(), config.get_int("ntp.wait_s", 10))
                except asyncio.TimeoutError:
                    pass
            if not _clock_set():
                log.warning("no time from NTP yet: TLS fails certificate dates until it comes")
    finally:
        _drop()


async def start(client, config, node, agent):
    """Start each enabled service; one that fails is logged, the device runs on."""
    try:
        if client is not None and config.get_bool("hass.enabled", False):
            try:
                from mpy_blox import hass

                await hass.start(client, config, node, agent)
            except Exception as e:  # noqa: BLE001  (MemoryError too)
                log.exception("Home Assistant discovery failed to start", e)
        if client is not None and config.get_bool("logging.remote", False):
            try:  # `mpy-blox logs DEVICE` reads it
                from mpy_blox import remotelog

                remotelog.start(client, node, config)
            except Exception as e:  # noqa: BLE001  (MemoryError: the device runs on without it)
                log.exception("remote log failed to start", e)
        # The clock keeper, unless clock_for_tls() started it. Its first round a
        # second on: a framework of .py sources loads user_main.py first, whose
        # compiling wants KB-sized blocks that NTP's module, loaded and dropped
        # in the middle of the boot, left holes in (64-bit lane, 100K).
        if config.get_bool("ntp.enabled", True) and "mpy_blox.timekeeper" not in sys.modules:
            _keep_time(config, node, 1, None)
    finally:
        _drop()


def _keep_time(config, node, wait_s, tried):
    try:
        from mpy_blox import timekeeper

        asyncio.create_task(timekeeper.keep(config, node, wait_s, tried))
    except Exception as e:  # noqa: BLE001  (MemoryError: the device runs on without it)
        log.exception("NTP failed to start", e)
        if tried is not None:
            tried.set()


def _clock_set():
    import time

    return time.gmtime()[0] >= 2025  # as node.py counts it: an unset ESP32 reads 2000


def _drop():
    # Out of sys.modules and its package: once the step returns, nothing holds it.
    sys.modules.pop("mpy_blox.services", None)
    delattr(sys.modules["mpy_blox"], "services")
