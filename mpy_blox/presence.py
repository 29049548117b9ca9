# Presence: the answer to a request on mpypi/announce (docs/protocol.md, "Topics"): this
# device publishes its info and its last status again, live, so that `mpy-blox
# status` sees it on a broker that sends no retained report to a wildcard
# subscription (RabbitMQ's MQTT plugin, docs/scaling.md). Imported by the app
# boot only (mpy_blox/startup.py), which sets `node`: an install boot keeps its
# heap and its link for the download. Module state, not a class: one device,
# one answer, and a class costs the app heap for nothing.
import asyncio
import time
from micropython import const

# At most one answer per this: the requests inside it are answered once, at
# its end, so a flood of them costs two publishes every 2 s.
_WINDOW_MS = const(2000)

node = None  # the mpy_blox.node.Node that answers
_last = None  # ticks_ms of the last answer
_owed = False  # an answer is scheduled


async def handler(msg):
    """The client's handler of mpypi/announce."""
    global _owed
    # A retained request is stale (and would be answered at every connect).
    if msg.retain or _owed:
        return
    _owed = True
    # A task, not the handler: it may wait, and the receive loop must not.
    asyncio.create_task(_answer())


async def _answer():
    global _last, _owed
    if _last is not None:
        since = time.ticks_diff(time.ticks_ms(), _last)
        if 0 <= since < _WINDOW_MS:
            await asyncio.sleep_ms(_WINDOW_MS - since)
    _last = time.ticks_ms()
    _owed = False
    if await node.publish_info():  # else not connected: the next connect reports
        await node.republish_status()
