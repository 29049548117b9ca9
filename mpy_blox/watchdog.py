# The hardware watchdog: the app arms machine.WDT and feeds it from its own loop.
#
# watchdog.timeout_s (default 30; 0 turns it off) arms the ESP32's task
# watchdog just before user code starts. A task of the framework's asyncio loop
# feeds it, not a timer: what it watches is the loop itself. A user_main that
# blocks the loop (a busy loop, a blocking socket read, time.sleep) starves the
# feeder, and the chip resets with machine.reset_cause() == machine.WDT_RESET.
# Once armed it cannot be stopped; a reset disarms it.
#
# Ctrl-C over USB (mpremote: a deploy, a REPL session) stops the loop that
# feeds it, not the watchdog: app.main() calls hold() on its way to the REPL,
# which gives the session 10 minutes (or the longer timeout_s) before a reset
# brings the device back to its app.
#
# The install boot (mpy_blox/update/installboot.py) never arms it: it is a
# boot of its own, and its staging and commit are synchronous (a large file is
# copied and hashed without a turn of the loop), so no task could feed it;
# what interrupts it there is what the journal is made to survive anyway.
#
# A watchdog reset is a crash that outlives its boot. Outside a trial it is
# counted in NVS (key wdt_resets, beside boot_count; this module owns it) and
# the Supervisor takes the count as failures already seen: app.crash_limit of
# them in a row end in safe mode, with the device online for a fix. The count
# is erased once user_main ran app.crash_window_s without failing. On trial
# (mpypi_recover's /.mpypi/applied exists) it is not counted: boot recovery
# rolls the new set back after a watchdog reset instead.
import asyncio
import machine
import os

from mpy_blox.log import get_logger

_DEFAULT_TIMEOUT_S = const(30)
_MAX_TIMEOUT_S = const(86400)  # a day: the timeout in ms stays a small int on an ESP32
# Fed every quarter of the timeout, at most every 5 s: a feed may then come
# three quarters of the timeout late (a long flash write, a slow handler)
# before the chip resets, and with the 30 s default a stall must last 25 s.
# A wake-up every 5 s costs the loop nothing worth counting.
_MAX_INTERVAL_MS = const(5000)
_HOLD_MS = const(600_000)
_NAMESPACE = "mpy_blox"  # mpy_blox.secure.NAMESPACE, without importing it again
_KEY = "wdt_resets"
_APPLIED = "/.mpypi/applied"  # mpypi_recover's: the journal's set is on trial

log = get_logger("watchdog")
_timeout_ms = 0  # once armed


def start(config, sup=None):
    """Count a watchdog reset for `sup` (a Supervisor), then arm and feed the watchdog.

    Returns the task that arms and feeds it, or None when watchdog.timeout_s is 0.
    """
    resets = _count_resets()
    if resets and sup is not None:
        sup.carry_resets(resets, _forget)
    timeout_s = config.get_int("watchdog.timeout_s", _DEFAULT_TIMEOUT_S)
    if not 0 <= timeout_s <= _MAX_TIMEOUT_S:
        # Fail closed: a typo must not switch the watchdog off.
        log.warning(
            "watchdog.timeout_s %d: 0 (off) to %d; using %d",
            timeout_s,
            _MAX_TIMEOUT_S,
            _DEFAULT_TIMEOUT_S,
        )
        timeout_s = _DEFAULT_TIMEOUT_S
    if timeout_s == 0:
        log.info("watchdog off (watchdog.timeout_s 0)")
        return None
    interval_ms = min(timeout_s * 250, _MAX_INTERVAL_MS)
    log.info("armed: %d s, fed every %d ms", timeout_s, interval_ms)
    # The task arms it: once the task exists, nothing can fail between arming
    # and the first feed (a MemoryError before leaves the device without one).
    return asyncio.create_task(_feed(timeout_s * 1000, interval_ms))


async def _feed(timeout_ms, interval_ms):
    global _timeout_ms
    try:
        wdt = machine.WDT(timeout=timeout_ms)
    except (OSError, ValueError) as e:  # ESP-IDF refused: run without, and say so
        log.error("cannot arm: %r", e)
        return
    _timeout_ms = timeout_ms
    while True:
        wdt.feed()
        await asyncio.sleep_ms(interval_ms)


def hold():
    """Ctrl-C stopped the loop: give the USB session time before the watchdog resets."""
    if 0 < _timeout_ms < _HOLD_MS:
        machine.WDT(timeout=_HOLD_MS)  # the same watchdog, a new timeout from now
        log.warning("Ctrl-C: the watchdog resets the device in %d s", _HOLD_MS // 1000)


def _count_resets():
    # The watchdog resets in a row, this boot's included.
    import esp32

    nvs = esp32.NVS(_NAMESPACE)
    try:
        count = nvs.get_i32(_KEY)
    except OSError:  # ESP_ERR_NVS_NOT_FOUND: none since the last healthy run
        count = 0
    if machine.reset_cause() == machine.WDT_RESET and not _on_trial():
        count += 1
        log.warning("reset by the watchdog (%d in a row)", count)
        try:
            nvs.set_i32(_KEY, count)
            nvs.commit()
        except OSError as e:  # NVS full or worn: the reset goes uncounted
            log.warning("cannot count the watchdog reset: %r", e)
    return count


def _on_trial():
    # A stat, not an import of mpypi_recover: main.py dropped it to free its heap.
    try:
        os.stat(_APPLIED)
        return True
    except OSError:
        return False


def _forget():
    # Called by the Supervisor, only with a count to forget: one NVS erase.
    import esp32

    try:
        nvs = esp32.NVS(_NAMESPACE)
        nvs.erase_key(_KEY)
        nvs.commit()
        log.info("user_main ran well: watchdog resets forgotten")
    except OSError as e:  # it stays counted; the next healthy run tries again
        log.warning("cannot forget the watchdog resets: %r", e)
