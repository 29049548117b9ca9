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
# them in a row end in safe mode, with the device online for a fix. The feeder
# erases the count once user_main ran app.crash_window_s without failing; with
# the watchdog off nothing is counted. On trial
# (mpypi_recover's /.mpypi/applied exists) it is not counted: boot recovery
# rolls the new set back after a watchdog reset instead.
import asyncio
import machine
import os

from mpy_blox.log import get_logger

# Names are few and short on purpose: each new one is a qstr, and the qstr
# pool grows by doubling, in one block, late in a boot whose heap is full.
_DEFAULT_S = const(30)
_MAX_S = const(86400)  # a day: the timeout in ms stays a small int on an ESP32
# Fed every quarter of the timeout, at most every 5 s: a feed may then come
# three quarters of the timeout late (a long flash write, a slow handler)
# before the chip resets, and with the 30 s default a stall must last 25 s.
# A wake-up every 5 s costs the loop nothing worth counting.
_MAX_INTERVAL_MS = const(5000)
_HOLD_MS = const(600_000)

log = get_logger("watchdog")
_armed_ms = 0


def start(sup):
    """Arm the watchdog and feed it; tell `sup` (the Supervisor) the resets in a row.

    Returns the task that arms and feeds it, or None when watchdog.timeout_s is 0.
    """
    t = sup.config.get_int("watchdog.timeout_s", _DEFAULT_S)
    if not 0 <= t <= _MAX_S:
        # Fail closed: a typo must not switch the watchdog off.
        log.warning("watchdog.timeout_s %d: 0 (off) to %d; using %d", t, _MAX_S, _DEFAULT_S)
        t = _DEFAULT_S
    n = _count()
    if t == 0:
        if n:  # off: nothing would forget a count, so there is none
            _forget()
        log.info("watchdog off (watchdog.timeout_s 0)")
        return None
    sup.resets = n
    if n >= sup.limit:
        # Safe mode lasts until the next reset, as a crash loop's does: a reset
        # (a fix installed, a power cycle) gives user code its chance again.
        _forget()
        n = 0
    log.info("armed: %d s, fed every %d ms", t, min(t * 250, _MAX_INTERVAL_MS))
    # The task arms it: once the task exists, nothing can fail between arming
    # and the first feed (a MemoryError before leaves the device without one).
    return asyncio.create_task(_feed(t * 1000, sup, n))


async def _feed(ms, sup, n):
    global _armed_ms
    try:
        wdt = machine.WDT(timeout=ms)
    except (OSError, ValueError) as e:  # ESP-IDF refused: run without, and say so
        log.error("cannot arm: %r", e)
        return
    _armed_ms = ms
    ms = min(ms // 4, _MAX_INTERVAL_MS)
    while True:
        wdt.feed()
        # The resets were a crash loop no more once user_main ran a whole window
        # without failing (or returned, or there is none: Supervisor.healthy_ms).
        if n and (sup.healthy_ms() or 0) >= sup.window_ms:
            n = 0
            _forget()
        await asyncio.sleep_ms(ms)


def hold():
    """Ctrl-C stopped the loop: give the USB session time before the watchdog resets."""
    if 0 < _armed_ms < _HOLD_MS:
        machine.WDT(timeout=_HOLD_MS)  # the same watchdog, a new timeout from now
        log.warning("Ctrl-C: the watchdog resets the device in %d s", _HOLD_MS // 1000)


def _count():
    # The watchdog resets in a row, this boot's included; NVS namespace
    # mpy_blox (mpy_blox.secure.NAMESPACE, not imported again), beside boot_count.
    import esp32

    nvs = esp32.NVS("mpy_blox")
    try:
        n = nvs.get_i32("wdt_resets")
    except OSError:  # ESP_ERR_NVS_NOT_FOUND: none since the last healthy run
        n = 0
    if machine.reset_cause() != machine.WDT_RESET:
        return n
    try:
        # On trial: boot recovery rolls back instead. A stat of mpypi_recover's
        # marker, not an import: main.py dropped that module to free its heap.
        os.stat("/.mpypi/applied")
        return n
    except OSError:
        pass
    n += 1
    log.warning("reset by the watchdog (%d in a row)", n)
    try:
        nvs.set_i32("wdt_resets", n)
        nvs.commit()
    except OSError as e:  # NVS full or worn: the reset goes uncounted
        log.warning("cannot count the watchdog reset: %r", e)
    return n


def _forget():
    # Only with a count to forget: one NVS erase.
    import esp32

    try:
        nvs = esp32.NVS("mpy_blox")
        nvs.erase_key("wdt_resets")
        nvs.commit()
        log.info("watchdog resets forgotten")
    except OSError as e:  # it stays counted; the next healthy run tries again
        log.warning("cannot forget the watchdog resets: %r", e)
