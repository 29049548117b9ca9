# The clock from NTP for as long as the device runs (`ntp.enabled`): the app
# starts keep() once, and imports this module only then. mpy_blox.ntp does one
# round (sync, log, republish, backoff) and says how long to sleep until the
# next; it is imported for each round and dropped after it, so between syncs (a
# day) only this loop stays on the heap (docs/runtime.md, "Time").
import asyncio
import sys
from micropython import const

from mpy_blox.log import get_logger

log = get_logger("ntp")

_AGAIN_S = const(600)  # after a round that could not run at all


async def keep(cfg, node, tried, wait_s):
    """Sync every so often, the first after `wait_s`; `tried` is set by the first round."""
    while True:
        await asyncio.sleep(wait_s)
        try:
            from mpy_blox import ntp

            wait_s = await ntp.sync_round(cfg, node, tried, wait_s)
        except Exception as e:  # noqa: BLE001  (MemoryError: no room for it now)
            log.exception("NTP round failed", e)
            tried.set()
            wait_s = _AGAIN_S
        ntp = None  # this frame sleeps a day: it must not hold the module
        sys.modules.pop("mpy_blox.ntp", None)
        if hasattr(sys.modules["mpy_blox"], "ntp"):
            delattr(sys.modules["mpy_blox"], "ntp")
