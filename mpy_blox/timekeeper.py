# The clock from NTP for as long as the device runs: mpy_blox/services.py starts
# keep() once when `ntp.enabled`, and imports this module only then. Each round
# imports mpy_blox.ntp (sync, log, republish, backoff), which says how long to
# sleep until the next and drops itself: between syncs (a day) only this loop
# stays on the heap (docs/runtime.md, "Time").
import asyncio


async def keep(cfg, node, wait_s, tried):
    """Sync every so often, the first after `wait_s`; the first round sets the
    Event `tried` (None: nobody waits), whatever its outcome."""
    while True:
        await asyncio.sleep(wait_s)
        try:
            from mpy_blox import ntp

            wait_s = await ntp.sync_round(cfg, node, wait_s, tried)
        except Exception as e:  # noqa: BLE001  (MemoryError: no room for it now)
            from mpy_blox.log import get_logger

            get_logger("ntp").exception("NTP round failed", e)
            wait_s = 600
        ntp = tried = None  # this frame sleeps a day: it must hold neither
