# The remote log: log records over MQTT, for `mpy-blox logs DEVICE --follow`.
#
#   mpypi/nodes/<id>/log   {"t": 12345, "level": "I", "logger": "user_main",
#                           "msg": "..."}   (QoS 0, not retained; t: ms since boot)
#
# On when logging.remote is true (the app starts it after MQTT): records at
# logging.remote_level (default INFO) and above are kept in a bounded replay
# buffer (logging.replay, default 20 records) and sent by one task, at most
# logging.remote_rate per second (default 5: a chatty loop must not flood the
# broker or the heap; records that leave the buffer unsent are counted, and
# the next record sent says how many: "dropped"). On every (re)connect the
# buffer is sent again: the last records, also those logged while the link
# was down. A message is at most 200
# characters. A record that sending itself logs (the link going down) is
# sent like any other: only a failure logs, and a failure stops the round.
import asyncio
import json
import time

from mpy_blox import log as logging
from mpy_blox.topics import node_topic

_MAX_MSG = const(200)


class RemoteLog:
    def __init__(self, client, device_id, level, size, rate):
        self.client = client
        self.topic = node_topic(device_id, "log")
        self.level = level
        self.size = max(1, size)
        self.rate = max(1, rate)
        self.buf = []  # (t, letter, name, msg): the last `size` records
        self.sent = 0  # how many records of buf went out (from the end)
        self.dropped = 0  # over the rate since the last one sent
        self.wake = asyncio.Event()

    def record(self, level, t, name, msg):
        if level < self.level:
            return
        self.buf.append((t, logging.LETTERS.get(level, "?"), name, msg[:_MAX_MSG]))
        if len(self.buf) > self.size:
            self.buf.pop(0)
            if self.sent:
                self.sent -= 1
            else:
                self.dropped += 1  # one not sent yet: counted, said with the next one
        self.wake.set()

    async def on_connect(self):
        self.sent = 0  # the replay: the whole buffer again
        self.wake.set()

    async def run(self):
        window = time.ticks_ms()
        n = 0
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.sent < len(self.buf) and self.client.is_connected:
                now = time.ticks_ms()
                if time.ticks_diff(now, window) >= 1000:
                    window, n = now, 0
                if n >= self.rate:  # over the rate: wait; the buffer's bound drops the excess
                    await asyncio.sleep_ms(1000 - time.ticks_diff(now, window))
                    continue
                t, letter, name, msg = self.buf[self.sent]
                rec = {"t": t, "level": letter, "logger": name, "msg": msg}
                if self.dropped:
                    rec["dropped"] = self.dropped
                try:
                    await self.client.publish(self.topic, json.dumps(rec))
                except OSError:  # the link went: the next connect replays
                    break
                self.sent += 1
                self.dropped = 0
                n += 1


def start(client, node, config):
    level = config.get_str("logging.remote_level", "INFO").upper()
    r = RemoteLog(
        client,
        node.device_id,
        {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40}.get(level, 20),
        config.get_int("logging.replay", 20),
        config.get_int("logging.remote_rate", 5),
    )
    client.add_connect_callback(r.on_connect)
    logging.sink = r.record
    asyncio.create_task(r.run())
    return r
