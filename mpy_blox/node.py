# This device on MQTT: its id, and its retained `info` and `status` topics
# (DESIGN §4). The runtime publishes both on every (re)connect; the update agent
# adds its own info fields to `info_extra` and reports through publish_status().
#
#   info   {"device_id": "esp32-840d8ed29760", "platform": "esp32", "ts": 1767225600,
#           "micropython": "1.22.2", "framework": "0.1.0", "hostname": "mpy-blox",
#           "channel": "stable", "auto_update": true, "boot_count": 12,
#           "mem_free": 61234, "fs_free": 1830912, "safe_mode": false,
#           ... plus the agent's "packages", "src", "seq", "last_update"}
#   status {"state": "online", "ts": 1767225600}   or, in safe mode,
#          {"state": "safe_mode", "safe_mode": true, "error": "user_main failed 5 times in 60 s"}
#   will   {"state": "offline"}  (retained, set by the broker when the link dies)
#
# `ts`: UTC seconds since 1970 (an int) when the message was made, once the
# clock is set (mpy_blox/ntp.py); before that, no `ts`. The will has none.
#
# A request on mpypi/announce is answered with both again: mpy_blox/presence.py.
import gc
import json
import os

from mpy_blox.log import get_logger
from mpy_blox.topics import node_topic

log = get_logger("node")

OFFLINE = b'{"state": "offline"}'
# The clock counts as set once it is past 2025-01-01: an ESP32 starts at its
# epoch at power-on (2000-01-01 on MicroPython's bare-metal ports, gmtime(0) says
# which), decades before. Counted from 2000, that date is still a small int.
_EPOCH_2000 = const(946684800)  # Unix time of 2000-01-01
_SET_2000 = const(789004800)  # 2025-01-01 in seconds since 2000


def device_id():
    """'esp32-' and the lower-case hex of machine.unique_id() (the base MAC)."""
    import binascii
    import machine

    return "esp32-" + binascii.hexlify(machine.unique_id()).decode()


def _fs_free():
    try:
        st = os.statvfs("/")
        return st[1] * st[4]  # fragment size * blocks free to us
    except OSError:
        return None


class Node:
    def __init__(self, dev_id, config, boot_count=None):
        self.device_id = dev_id
        self.config = config
        self.boot_count = boot_count
        self.client = None
        self.safe_mode = None  # the reason, once the supervisor gave up on user code
        self.info_extra = {}  # fields owned by the update agent
        self.state = "online"  # the status every (re)connect publishes; an install boot's differs
        self.state_fields = {}  # and its fields (a trial's seq and time left)
        self._status = None  # the fields of the last status, for an announce answer
        self.on_info = None  # `await on_info()` after each info (mpy_blox/hass/update.py)
        # `await on_status(fields)` before each status (mpy_blox/hass/progress.py).
        # Hooks, not code here: this module is resident on every device.
        self.on_status = None

    def info(self):
        import mpy_blox

        u = os.uname()
        gc.collect()
        info = {
            "device_id": self.device_id,
            "platform": u.sysname,
            "micropython": u.release,
            "framework": mpy_blox.__version__,
            "hostname": self.config.get_str("hostname"),
            "channel": self.config.get_str("update.channel", "stable"),
            "auto_update": self.config.get_bool("update.auto_update", True),
            "boot_count": self.boot_count,
            "mem_free": gc.mem_free(),
            "fs_free": _fs_free(),
            "safe_mode": self.safe_mode is not None,
        }
        info.update(self.info_extra)
        return info

    async def _publish(self, leaf, fields, qos=1):
        # `fields` as JSON, with `ts` when it is said: a status said again is as new
        # as its answer. The clock is set once past 2025 (update/trust.py reads it so too).
        client = self.client
        if client is None or not client.can_publish:
            return False  # (a status said while the subscriptions are re-sent is sent)
        import time

        t = int(time.time())
        if time.gmtime(0)[0] != 2000:  # the unix port counts from 1970, an ESP32 from 2000
            t -= _EPOCH_2000
        if t >= _SET_2000:
            fields["ts"] = t + _EPOCH_2000
        payload = json.dumps(fields)
        try:
            await client.publish(node_topic(self.device_id, leaf), payload, retain=True, qos=qos)
            return True
        except OSError as e:  # MQTTError: the link went away; the next connect republishes
            log.warning("cannot publish %s: %r", leaf, e)
            return False

    async def publish_info(self):
        ok = await self._publish("info", self.info())
        if self.on_info is not None:
            await self.on_info()
        return ok

    async def publish_status(self, state, qos=1, **fields):
        """Publish `status`; while in safe mode, online/idle read as safe_mode.

        qos=0 is for progress: a QoS 1 publish waits for its PUBACK, which
        sits behind a package the receive loop is still streaming."""
        if self.safe_mode is not None:
            fields["safe_mode"] = True
            if state in ("online", "idle", "safe_mode"):
                state = "safe_mode"
                fields.setdefault("error", self.safe_mode)
        fields["state"] = state
        if self.on_status is not None:
            await self.on_status(fields)
        self._status = fields
        return await self.republish_status(qos)

    async def on_connect(self):
        await self.publish_info()
        await self.publish_status(self.state, **self.state_fields)

    async def republish_status(self, qos=1):
        """The last status, again, with a fresh `ts` (mpy_blox/presence.py, and
        mpy_blox/ntp.py once the clock is set); the connect's own before there is one."""
        if self._status is None:
            return await self.publish_status(self.state, **self.state_fields)
        return await self._publish("status", self._status, qos)
