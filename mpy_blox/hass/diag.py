# The device's diagnostics as Home Assistant sensors (entity_category
# diagnostic): free heap, free flash, Wi-Fi RSSI, uptime and the last update's
# result. One retained JSON state for all of them, every hass.diagnostics_s
# seconds; each sensor picks its field with a value_template.
import asyncio
import gc
import json
import os
import time

from mpy_blox.hass.entity import Entity

# object_id, name, unit, device_class, state_class
_SENSORS = (
    ("mem_free", "Free heap", "B", "data_size", "measurement"),
    ("fs_free", "Free flash", "B", "data_size", "measurement"),
    ("rssi", "Wi-Fi signal", "dBm", "signal_strength", "measurement"),
    ("uptime", "Uptime", "s", "duration", "total_increasing"),
    ("last_update", "Last update", None, None, None),
)


class _Diag(Entity):
    component = "sensor"

    def __init__(self, oid, name, unit, dev_class, state_class, topic):
        super().__init__(
            name,
            "diag_" + oid,
            state_topic=topic,
            value_template="{{ value_json.%s }}" % oid,
            unit_of_measurement=unit,
            device_class=dev_class,
            state_class=state_class,
            entity_category="diagnostic",
        )


def start(hub, every_s):
    topic = hub.base("sensor", "diagnostics") + "/state"
    for s in _SENSORS:
        _Diag(*s, topic=topic)
    asyncio.create_task(_loop(hub, topic, max(every_s, 5)))


def _fs_free():
    try:
        st = os.statvfs("/")
        return st[1] * st[4]  # fragment size * blocks free to us
    except OSError:
        return None


def _rssi():
    try:
        import network

        return network.WLAN(network.STA_IF).status("rssi")
    except Exception:  # noqa: BLE001  (no station, or a port without rssi)
        return None


async def _loop(hub, topic, every_s):
    uptime = 0
    last = time.ticks_ms()
    while True:
        now = time.ticks_ms()
        uptime += time.ticks_diff(now, last) // 1000
        last = time.ticks_add(now, -(time.ticks_diff(now, last) % 1000))  # keep the rest
        lu = hub.node.info_extra.get("last_update") or {}
        gc.collect()
        state = {
            "mem_free": gc.mem_free(),
            "fs_free": _fs_free(),
            "rssi": _rssi(),
            "uptime": uptime,
            "last_update": lu.get("result") or "none",
        }
        c = hub.client
        if c.is_connected:
            try:
                await c.publish(topic, json.dumps(state), True, 0)
            except OSError:  # the link went: the next round publishes again
                pass
        await asyncio.sleep(every_s)
