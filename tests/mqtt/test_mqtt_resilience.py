"""Reconnects, keepalive and dispatch against the real Mosquitto, device code on the
MicroPython unix port (and on a virtual board for the Wi-Fi)."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid

import paho.mqtt.client as mqtt

CYCLES = """
import asyncio, gc, os, socket
from mpy_blox import log
from mpy_blox.mqtt import MQTTClient, packet
log.set_level("ERROR")
HOST, PORT, CYCLES = {host!r}, {port}, {cycles}
ADDR = socket.getaddrinfo(HOST, PORT)[0][-1]
KICK = packet.connect("cycler", None, None, 60, True, None)

def kick():
    # Another client with our id: Mosquitto closes our connection to let it in.
    s = socket.socket()
    s.connect(ADDR)
    s.write(KICK)
    s.read(4)
    s.close()

def census():
    gc.collect()
    fds = os.listdir("/proc/self/fd")
    return gc.mem_free(), len(fds)

async def handler(msg):
    pass

async def main():
    c = MQTTClient("cycler", HOST, PORT, backoff_min_ms=2, backoff_max_ms=4)
    await c.subscribe("cycler/x", handler)
    c.start()
    first = last = None
    for i in range(CYCLES):
        await c.connected()
        if i in (5, CYCLES - 1):
            await asyncio.sleep_ms(50)  # let the re-subscription settle
            first, last = last, census()
        kick()
        await c.disconnected()
    await c.connected()
    print("CENSUS", first[0], first[1], last[0], last[1])
    await c.stop()
    print("STOPPED", census()[1])

asyncio.run(main())
"""


def test_500_forced_reconnects_leak_neither_heap_nor_descriptors(broker, device):
    dev = device(CYCLES.format(host=broker.host, port=broker.port, cycles=500), heap="64K")
    out = dev.wait(timeout=120)
    m = re.search(r"CENSUS (\d+) (\d+) (\d+) (\d+)", out)
    assert m, out
    heap0, fds0, heap1, fds1 = map(int, m.groups())
    assert fds1 == fds0, out
    assert abs(heap1 - heap0) < 256, f"free heap {heap0} -> {heap1}"
    stopped = re.search(r"STOPPED (\d+)", out)
    assert stopped and int(stopped.group(1)) == fds0 - 1  # stop() closed the socket


SLOW = """
import asyncio, hashlib
from binascii import hexlify
from mpy_blox.mqtt import MQTTClient
BUF = bytearray(4096)
done = asyncio.Event()
attempts = 0
paused = []

async def handler(msg):
    global attempts
    attempts += 1
    print("ATTEMPT", attempts, msg.size)
    h = hashlib.sha256()
    got = 0
    while True:
        n = await msg.readinto(BUF)
        if not n:
            break
        h.update(memoryview(BUF)[:n])
        got += n
        if attempts == 1 and got >= {pause_at} and not paused:
            paused.append(got)
            print("PAUSED")
            await asyncio.sleep_ms({pause_ms})
        await asyncio.sleep_ms({delay_ms})
    print("MSG", got, hexlify(h.digest()).decode())
    done.set()

async def main():
    c = MQTTClient("{client_id}", "{host}", {port}, keepalive_s={keepalive},
                   backoff_min_ms=100, backoff_max_ms=500)
    await c.subscribe("{topic}", handler)
    c.start()
    await done.wait()
    await c.stop()
    print("STOPPED")

asyncio.run(main())
"""


def publish_retained(target, topic: str, payload: bytes) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    c.connect(target.host, target.port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(20)
    finally:
        c.loop_stop()
        c.disconnect()


def test_a_broker_killed_mid_message_is_reconnected_and_the_message_arrives_whole(
    broker_factory, device
):
    b = broker_factory()
    payload = os.urandom(8 * 1024 * 1024)
    publish_retained(b, "big/firmware", payload)
    # SIGKILL saves nothing: wait until the autosave holds the retained message.
    db = b.dir / "mosquitto.db"
    deadline = time.monotonic() + 20
    while not (db.exists() and db.stat().st_size > len(payload)):
        assert time.monotonic() < deadline, "Mosquitto never saved the retained message"
        time.sleep(0.1)
    dev = device(
        SLOW.format(
            client_id="killed",
            host=b.host,
            port=b.port,
            keepalive=10,
            topic="big/#",
            pause_at=1024 * 1024,
            pause_ms=3000,
            delay_ms=0,
        ),
        heap="64K",
    )
    dev.wait_for("PAUSED", timeout=30)
    b.kill()
    b.start()  # the retained message comes back from the persistence file
    out = dev.wait(timeout=60)
    assert "disconnected" in out and "ATTEMPT 2" in out, out
    m = re.search(r"MSG (\d+) (\w+)", out)
    assert m and int(m.group(1)) == len(payload), out
    assert m.group(2) == hashlib.sha256(payload).hexdigest()


def test_keepalive_survives_a_payload_slower_than_the_keepalive(broker, device):
    topic = f"slow/{uuid.uuid4().hex[:8]}"
    payload = os.urandom(256 * 1024)
    publish_retained(broker, topic, payload)
    # 64 chunks of 4 KiB, 60 ms apart: about 4 s against a 1 s keepalive, which
    # Mosquitto enforces at 1.5 s.
    client_id = f"slow-{uuid.uuid4().hex[:6]}"
    dev = device(
        SLOW.format(
            client_id=client_id,
            host=broker.host,
            port=broker.port,
            keepalive=1,
            topic=topic,
            pause_at=1 << 30,
            pause_ms=0,
            delay_ms=60,
        ),
        heap="64K",
    )
    out = dev.wait(timeout=60)
    assert "disconnected" not in out and "ATTEMPT 2" not in out, out
    m = re.search(r"MSG (\d+) (\w+)", out)
    assert m and m.group(2) == hashlib.sha256(payload).hexdigest(), out
    log = [line for line in broker.log().splitlines() if client_id in line]
    assert not any("exceeded timeout" in line for line in log), log


DISPATCH = """
import asyncio
from mpy_blox.mqtt import MQTTClient
P = {prefix!r}
got = []

def recorder(name):
    async def handler(msg):
        got.append(1)
        print("HANDLER", name, msg.topic, msg.qos, await msg.read(64))
    return handler

async def boom(msg):
    got.append(1)
    await msg.readinto(bytearray(1))
    raise ValueError("handler bug")

async def main():
    c = MQTTClient("dispatch-" + P, {host!r}, {port}, keepalive_s=30)
    await c.subscribe(P + "/boom", boom)
    await c.subscribe(P + "/+/temp", recorder("temp"))
    await c.subscribe(P + "/#", recorder("all"), 1)
    c.start()
    await c.connected()
    await c.publish(P + "/x/temp", "1", qos=1)
    await c.publish(P + "/boom", "a long payload the handler leaves unread", qos=1)
    await c.publish(P + "/y/other", "2", qos=1)
    await c.publish(P + "/x/temp", "3", qos=1)
    print("READY")
    while len(got) < 5:
        await asyncio.sleep_ms(20)
    await c.unsubscribe(P + "/#")
    await c.stop()
    print("STOPPED")

asyncio.run(main())
"""


def test_qos1_both_ways_wildcards_and_a_raising_handler_does_not_stall(
    broker, mqtt_client, device
):
    prefix = f"w{uuid.uuid4().hex[:6]}"
    seen: list[tuple[str, bytes, int]] = []
    ready = threading.Event()
    host = mqtt_client()
    host.on_message = lambda c, u, m: seen.append((m.topic, m.payload, m.qos))
    host.on_subscribe = lambda *a: ready.set()
    host.subscribe(f"{prefix}/#", qos=1)
    assert ready.wait(10)
    dev = device(DISPATCH.format(prefix=prefix, host=broker.host, port=broker.port), heap="64K")
    dev.wait_for("READY")
    host.publish(f"{prefix}/z/temp", b"from host", qos=1).wait_for_publish(10)
    out = dev.wait(timeout=30)
    handled = re.findall(r"^HANDLER (\w+) (\S+) (\d) (.*)$", out, re.MULTILINE)
    assert handled == [
        ("temp", f"{prefix}/x/temp", "1", "b'1'"),
        ("all", f"{prefix}/y/other", "1", "b'2'"),
        ("temp", f"{prefix}/x/temp", "1", "b'3'"),
        ("temp", f"{prefix}/z/temp", "1", "b'from host'"),
    ], out
    assert f"handler for {prefix}/boom failed" in out and "ValueError: handler bug" in out
    assert "disconnected" not in out and "STOPPED" in out
    # The device's QoS 1 publishes reached another client, at QoS 1.
    assert (f"{prefix}/y/other", b"2", 1) in seen


NET = """
import asyncio, network
from mpy_blox.mqtt import MQTTClient
wlan = network.WLAN(network.STA_IF)
wlan.active(True)
wlan.connect("any", "any")
n = 0

async def on_connect():
    global n
    n += 1
    print("CONNECTED", n)

async def main():
    c = MQTTClient("netdown", {host!r}, {port}, keepalive_s=60, backoff_min_ms=100,
                   backoff_max_ms=200)
    c.add_connect_callback(on_connect)
    c.start()
    while n < 2:
        await asyncio.sleep_ms(50)
        if not c.is_connected:
            try:
                await c.publish("netdown/x", "lost?")
            except OSError as e:
                print("PUBLISH REFUSED", e)
                await c.connected()
    await c.stop()
    print("STOPPED")

asyncio.run(main())
"""


def test_wifi_down_is_noticed_and_the_client_reconnects_when_it_returns(broker, boards):
    board = boards.create(
        framework=True, files={"main.py": NET.format(host=broker.host, port=broker.port)}
    )
    rb = boards.start(board, heap="100K")
    rb.wait_for("CONNECTED 1")
    board.set_network(False)
    rb.wait_for(r"disconnected \(MQTTError: network down\)")
    rb.wait_for("PUBLISH REFUSED not connected")
    board.set_network(True)
    rb.wait_for("CONNECTED 2")
    rb.wait_for("STOPPED")


WILL = """
import asyncio
from mpy_blox.mqtt import MQTTClient, Will
async def main():
    c = MQTTClient({cid!r}, {host!r}, {port}, will=Will({topic!r}, "offline"))
    c.start()
    await c.connected()
    await c.publish({topic!r}, "online", retain=True, qos=1)
    print("ONLINE")
    if {clean}:
        await c.stop()
        print("STOPPED")
    else:
        await asyncio.sleep(60)  # killed by the test
asyncio.run(main())
"""


def test_the_will_is_published_when_the_device_dies_but_not_after_stop(broker, device):
    statuses = {}
    for clean in (True, False):
        topic = f"will/{uuid.uuid4().hex[:8]}"
        code = WILL.format(
            cid=topic.replace("/", "-"),
            host=broker.host,
            port=broker.port,
            topic=topic,
            clean=clean,
        )
        dev = device(code, heap="64K")
        dev.wait_for("STOPPED" if clean else "ONLINE")
        dev.stop()  # the process dies: the broker sees the socket close without DISCONNECT
        got = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"w-{uuid.uuid4().hex[:6]}")

        def on_message(client, userdata, m, topic=topic, got=got):
            statuses[topic] = m.payload
            got.set()

        c.on_message = on_message
        c.connect(broker.host, broker.port)
        c.loop_start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                c.subscribe(topic, qos=1)
                if got.wait(1) and statuses.get(topic) == (b"online" if clean else b"offline"):
                    break
        finally:
            c.loop_stop()
            c.disconnect()
        assert statuses.get(topic) == (b"online" if clean else b"offline"), (clean, statuses)


CHATTY = """
import asyncio
from mpy_blox.mqtt import MQTTClient

async def quiet(msg):
    pass

async def main():
    c = MQTTClient("{client_id}", "{host}", {port}, keepalive_s=2,
                   backoff_min_ms=100, backoff_max_ms=500)
    await c.subscribe("{client_id}/quiet", quiet)
    c.start()
    await c.connected()
    # QoS 0 every 300 ms for three keepalives: the broker answers none of it.
    for i in range(20):
        await c.publish("{client_id}/chatter", str(i))
        await asyncio.sleep_ms(300)
    print("CONNECTED", c.can_publish)
    await c.stop()

asyncio.run(main())
"""


def test_a_client_that_only_publishes_qos0_still_pings_and_stays_connected(broker, device):
    # A device sending diagnostics often, and subscribed to quiet topics, hears
    # nothing from the broker unless it pings: it must not take that silence
    # for a dead connection (it did, once a keepalive, in a Home Assistant test).
    client_id = f"chatty-{uuid.uuid4().hex[:6]}"
    dev = device(CHATTY.format(client_id=client_id, host=broker.host, port=broker.port))
    out = dev.wait(timeout=30)
    assert "CONNECTED True" in out, out
    assert "disconnected" not in out, out


SEND_FAILS = """
import asyncio, socket
from mpy_blox.mqtt import MQTTClient, packet
HOST, PORT, ID = {host!r}, {port}, {client_id!r}

def kick():
    # Another client with our id: Mosquitto closes our connection.
    s = socket.socket()
    s.connect(socket.getaddrinfo(HOST, PORT)[0][-1])
    s.write(packet.connect(ID, None, None, 60, True, None))
    s.read(4)
    s.close()

async def handler(msg):
    # The receive task is in here: nothing reads the socket, so only a write
    # can find the connection gone.
    kick()
    await asyncio.sleep_ms(200)
    for i in range(50):
        try:
            await c.publish(ID + "/x", "after the kick")
        except OSError as e:
            print("WRITE FAILED", type(e).__name__)
            break
        await asyncio.sleep_ms(10)
    print("IS_CONNECTED", c.is_connected)
    done.set()
    try:  # raises before it awaits anything, when the connection is known lost
        await c.publish(ID + "/x", "again")
    except Exception as e:
        print("NEXT", type(e).__name__, e)

done = asyncio.Event()
c = MQTTClient(ID, HOST, PORT, backoff_min_ms=50, backoff_max_ms=100)

async def main():
    await c.subscribe(ID + "/go", handler)
    c.start()
    await c.connected()
    await c.publish(ID + "/go", "go")
    await done.wait()
    await asyncio.wait_for(c.connected(), 10)  # the next connection
    print("RECONNECTED", c.is_connected)
    await c.stop()

asyncio.run(main())
"""


def test_a_write_that_fails_ends_the_connection_at_once(broker, device):
    # A handler (the chunked download's) sends while the receive task is busy in
    # it: a failed write must end the connection there and then, so that a retry
    # waits in connected() for the next connection instead of sending into the
    # dead one five times in a row (it did: 'download failed: OSError(32,)').
    client_id = f"sendfail-{uuid.uuid4().hex[:6]}"
    code = SEND_FAILS.format(host=broker.host, port=broker.port, client_id=client_id)
    out = device(code).wait(timeout=30)
    assert "WRITE FAILED" in out, out
    assert "IS_CONNECTED False" in out, out
    assert "NEXT MQTTError not connected" in out, out
    assert "RECONNECTED True" in out, out
