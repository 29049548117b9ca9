"""A topic the broker respelled: RabbitMQ's MQTT plugin delivers '.' in a topic as '/'.

The device subscribes to exact topics (lists, packages): a message delivered on the
exact topic with some '.' turned into '/' still reaches that subscription's handler
(mpy_blox/mqtt/topic.py `respelled`); a filter that matches as MQTT says wins, and
wildcard filters never match that way.
"""

from __future__ import annotations

import json

from mqtt_wire import read_packet
from test_mqtt_fake_broker import hold_until_closed, publish


def test_respelled_is_the_exact_filter_with_dots_delivered_as_slashes(run_mpy):
    cases = [
        ("mpypi/packages/src/user_main.py/ab", "mpypi/packages/src/user_main/py/ab", True),
        ("mpypi/packages/src/lib/a.b.py/ab", "mpypi/packages/src/lib/a/b/py/ab", True),
        ("mpypi/packages/src/lib/a.b.py/ab", "mpypi/packages/src/lib/a.b/py/ab", True),
        ("mpypi/channels/v1.2", "mpypi/channels/v1/2", True),
        ("a/b.py", "a/b.py", True),  # unchanged: matches() takes it first anyway
        ("a/b/py", "a/b.py", False),  # only '.' becomes '/', never the other way
        ("a/b.py", "a/bxpy", False),
        ("a/b.py", "a/b/p", False),
        ("a/b.py", "a/b/pyc", False),
        ("a/+.py", "a/b/py", False),  # wildcards: never
        ("a/+", "a/b", False),
        ("a/#", "a/b/c", False),
        ("", "", True),
    ]
    out = run_mpy(f"""
import json
from mpy_blox.mqtt.topic import respelled
print(json.dumps([respelled(p, t) for p, t, _ in {cases!r}]))
""")
    got = json.loads(out.strip().splitlines()[-1])
    assert got == [expected for _, _, expected in cases]


DEVICE = """
import asyncio
from mpy_blox.mqtt import MQTTClient

def handler(name):
    async def on_message(msg):
        print("MSG", name, msg.topic, await msg.read(100))
    return on_message

client = MQTTClient("fake", "127.0.0.1", {port}, keepalive_s=30)

async def main():
    for topic_filter, name in {subs!r}:
        await client.subscribe(topic_filter, handler(name), 1)
    client.start()
    await asyncio.sleep_ms(1500)
    await client.stop()
    print("STOPPED")
asyncio.run(main())
"""

SUBS = [
    ("p/user_main.py/ab", "package"),
    ("q/main.py", "dotted"),  # before the exact match below: that one still wins
    ("q/main/py", "slashed"),
    ("r/+", "wildcard"),
]


def test_a_respelled_delivery_reaches_its_exact_subscription_and_nothing_else(fake_broker, device):
    pubacks = []

    def script(broker, conn, n):
        broker.accept_connect(conn)
        for _ in SUBS:
            first, body = read_packet(conn)
            assert first == 0x82, first
            conn.sendall(b"\x90\x03" + body[:2] + b"\x01")
        conn.sendall(
            publish(b"p/user_main/py/ab", b"one", qos=1, pid=1)
            + publish(b"q/main/py", b"two", qos=1, pid=2)
            + publish(b"r/a/b", b"three", qos=1, pid=3)  # "r/a.b" respelled: not for r/+
            + publish(b"p/user_main/py/abc", b"four", qos=1, pid=4)
        )
        for _ in range(4):
            pubacks.append(read_packet(conn))
        hold_until_closed(conn)

    broker = fake_broker(script)
    out = device(DEVICE.format(port=broker.port, subs=SUBS), heap="64K").wait(timeout=30)
    msgs = [line for line in out.splitlines() if line.startswith("MSG")]
    assert msgs == [
        "MSG package p/user_main/py/ab b'one'",
        "MSG slashed q/main/py b'two'",
    ], out
    # Every message is acknowledged, handled or not.
    assert pubacks == [(0x40, bytes([0, k])) for k in (1, 2, 3, 4)]
    assert "STOPPED" in out and not broker.errors
