"""Payloads of any size stream through a fixed buffer, on the MicroPython unix port,
from the real Mosquitto."""

from __future__ import annotations

import hashlib
import os
import re
import uuid

# Device side: subscribe to the given filters, hash every message through a
# `chunk`-byte buffer (the topic's last level when it is a number), taking what
# has arrived without waiting first, as the update's handlers do; print one
# line per message (with the turns another task got meanwhile), stop after
# `expect` messages.
RECEIVER = """
import asyncio, gc, hashlib, micropython
from binascii import hexlify
from mpy_blox.mqtt import MQTTClient
HOST, PORT, FILTERS, EXPECT, PUBLISH = {host!r}, {port}, {filters!r}, {expect}, {publish!r}
BUF = bytearray(4096)
seen = []
done = asyncio.Event()
turns = [0]

async def other_task():
    while True:
        turns[0] += 1
        await asyncio.sleep_ms(0)

async def handler(msg):
    last = msg.topic.rsplit("/", 1)[-1]
    chunk = int(last) if last.isdigit() else 1024
    mv = memoryview(BUF)[:chunk]
    gc.collect()
    before = gc.mem_free()
    h = hashlib.sha256()
    n = got = 0
    turns0 = turns[0]
    while True:
        k = msg.readinto_nowait(mv)
        if k is None:
            k = await msg.readinto(mv)
        if not k:
            break
        if k > chunk or k > msg.size - got:
            print("OVERREAD", k)
        h.update(mv[:k])
        got += k
        n += 1
    digest = hexlify(h.digest()).decode()
    gc.collect()
    print("MSG", msg.topic, msg.size, got, msg.qos, int(msg.retain), digest,
          before - gc.mem_free(), micropython.mem_peak(), turns[0] - turns0)
    seen.append(msg.topic)
    if len(seen) >= EXPECT:
        done.set()

async def main():
    c = MQTTClient("recv-" + FILTERS[0][0].replace("/", "-"), HOST, PORT, keepalive_s=30)
    for f, qos in FILTERS:
        await c.subscribe(f, handler, qos)
    c.start()
    asyncio.create_task(other_task())
    await c.connected()
    for topic, size, qos in PUBLISH:
        await c.publish(topic, b"x" * size, qos=qos)
    await done.wait()
    await c.stop()
    print("DONE")

asyncio.run(main())
"""


def receiver(broker, filters, expect, publish=()):
    return RECEIVER.format(
        host=broker.host,
        port=broker.port,
        filters=list(filters),
        expect=expect,
        publish=list(publish),
    )


def messages(output: str) -> dict[str, dict]:
    out = {}
    for m in re.finditer(
        r"^MSG (\S+) (\d+) (\d+) (\d) (\d) (\w+) (-?\d+) (\d+) (\d+)$", output, re.MULTILINE
    ):
        topic, size, got, qos, retain, sha, heap, peak, turns = m.groups()
        out[topic] = {
            "size": int(size),
            "got": int(got),
            "qos": int(qos),
            "retain": bool(int(retain)),
            "sha": sha,
            "heap": int(heap),
            "peak": int(peak),
            "turns": int(turns),
        }
    return out


def publish_retained(client, items: dict[str, bytes]) -> None:
    for topic, payload in items.items():
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)


def test_a_4_mib_retained_message_streams_whole_through_a_64k_heap(broker, mqtt_client, device):
    prefix = f"big-{uuid.uuid4().hex[:8]}"
    payload = os.urandom(4 * 1024 * 1024)
    publish_retained(mqtt_client(), {f"{prefix}/4096": payload})
    dev = device(receiver(broker, [(f"{prefix}/#", 1)], 1), heap="64K")
    out = dev.wait(timeout=20)
    assert f"{prefix}/4096" in messages(out), out
    got = messages(out)[f"{prefix}/4096"]
    assert "OVERREAD" not in out and "DONE" in out, out
    assert got["size"] == got["got"] == len(payload)
    assert got["sha"] == hashlib.sha256(payload).hexdigest()
    assert got["retain"] and got["qos"] == 1
    assert abs(got["heap"]) < 2048, f"heap changed by {got['heap']} bytes over the stream"
    # Bytes already there are taken without waiting, but not for ever: the
    # other tasks (ping, progress) get their turns while it streams.
    assert got["turns"] >= len(payload) // 4096 // 16 // 2, got


def test_remaining_length_boundaries_and_chunk_sizes_plus_minus_one(broker, mqtt_client, device):
    prefix = uuid.uuid4().hex[:6]
    items = {}
    # Remaining length = 2 + topic [+ 2 for the QoS 1 packet id] + payload.
    for rl in (127, 128, 16383, 16384):
        for qos in (0, 1):
            topic = f"{prefix}/q{qos}/r{rl:05d}/1000"
            items[topic] = os.urandom(rl - 2 - len(topic) - 2 * qos)
    # The client's own buffer is 1024 bytes: reads around it, and payloads around them.
    for size in (1023, 1024, 1025, 2049):
        for chunk in (1023, 1024, 1025):
            items[f"{prefix}/c{size:04d}/{chunk}"] = os.urandom(size)
    publish_retained(mqtt_client(), items)
    filters = [(f"{prefix}/q0/#", 0), (f"{prefix}/q1/#", 1), (f"{prefix}/+/+", 1)]
    dev = device(receiver(broker, filters, len(items)), heap="64K")
    got = messages(dev.wait(timeout=60))
    assert "OVERREAD" not in dev.output()
    for topic, payload in items.items():
        assert topic in got, dev.output()
        assert got[topic]["got"] == len(payload), topic
        assert got[topic]["sha"] == hashlib.sha256(payload).hexdigest(), topic
        assert got[topic]["qos"] == (0 if "/q0/" in topic else 1)


def test_empty_payloads_are_delivered_and_published(broker, device):
    prefix = f"empty-{uuid.uuid4().hex[:6]}"
    publish = [(f"{prefix}/a", 0, 0), (f"{prefix}/b", 0, 1), (f"{prefix}/c", 1, 1)]
    dev = device(receiver(broker, [(f"{prefix}/+", 1)], 3, publish), heap="64K")
    got = messages(dev.wait(timeout=30))
    empty = hashlib.sha256(b"").hexdigest()
    assert got[f"{prefix}/a"]["size"] == 0 and got[f"{prefix}/a"]["sha"] == empty
    assert got[f"{prefix}/b"]["size"] == 0 and got[f"{prefix}/b"]["qos"] == 1
    assert got[f"{prefix}/c"]["size"] == 1
