"""Exact bytes and malformed input, against a scripted fake broker."""

from __future__ import annotations

from mqtt_wire import read_packet, remaining_length

# Device side: connect with a quick backoff, print each (re)connection, run `body`.
DEVICE = """
import asyncio
from mpy_blox.mqtt import MQTTClient
n = 0
async def on_connect():
    global n
    n += 1
    print("CONNECTED", n)

async def handler(msg):
    data = await msg.read(100)
    print("MSG", msg.topic, msg.qos, int(msg.dup), data)
    await client.publish("handled", data)

client = MQTTClient("fake", "127.0.0.1", {port}, keepalive_s=30, backoff_min_ms=20,
                    backoff_max_ms=100)
client.add_connect_callback(on_connect)

async def main():
    await client.subscribe("t/#", handler, 1)
    client.start()
    while n < {connections}:
        await asyncio.sleep_ms(20)
    await asyncio.sleep_ms(300)
    await client.stop()
    print("STOPPED")
asyncio.run(main())
"""


def publish(topic: bytes, payload: bytes, qos: int = 0, pid: int = 0, dup: bool = False) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (pid.to_bytes(2, "big") if qos else b"")
    first = 0x30 | (qos << 1) | (0x08 if dup else 0)
    return bytes([first]) + remaining_length(len(body) + len(payload)) + body + payload


def hold_until_closed(conn, timeout: float = 10) -> None:
    """Keep the connection until the device closes it (what a script waits for)."""
    conn.settimeout(timeout)
    try:
        while conn.recv(1024):
            pass
    except OSError:  # TimeoutError included
        pass


def answer_subscribe(conn) -> None:
    first, body = read_packet(conn)
    assert first == 0x82, first
    conn.sendall(b"\x90\x03" + body[:2] + b"\x01")


def test_qos1_puback_is_sent_after_the_handler_and_duplicates_are_tolerated(fake_broker, device):
    seen = []

    def script(broker, conn, n):
        broker.accept_connect(conn)
        answer_subscribe(conn)
        if n:
            hold_until_closed(conn)
            return
        msg = publish(b"t/a", b"hello", qos=1, pid=0x1234)
        dup = publish(b"t/a", b"hello", qos=1, pid=0x1234, dup=True)
        conn.sendall(msg + dup)
        for _ in range(4):
            seen.append(read_packet(conn))
        conn.sendall(b"\xe0\x00")  # not a packet a broker sends: the device reconnects
        hold_until_closed(conn)

    broker = fake_broker(script)
    dev = device(DEVICE.format(port=broker.port, connections=2), heap="64K")
    out = dev.wait(timeout=30)
    assert out.count("MSG t/a 1") == 2 and "MSG t/a 1 1 b'hello'" in out, out
    # The handler's own publish reaches the broker before the PUBACK of its message.
    handled = (0x30, b"\x00\x07handledhello")
    assert seen == [handled, (0x40, b"\x12\x34"), handled, (0x40, b"\x12\x34")]
    assert "unexpected packet type 14" in out
    assert not broker.errors


MALFORMED = [
    ("bad remaining length", b"\x30\xff\xff\xff\xff\x01", "remaining length longer than 4 bytes"),
    (
        "oversize topic",
        b"\x30\x82\x08\x03\xe8" + b"t" * 1000 + b"x" * 20,
        "PUBLISH topic of 1000 bytes",
    ),
    ("topic longer than packet", b"\x30\x05\x00\x09t/a", "PUBLISH topic of 9 bytes in a 5-byte"),
    ("unexpected packet type", b"\x82\x02\x00\x01", "unexpected packet type 8"),
    ("reserved packet type", b"\xf0\x00", "unexpected packet type 15"),
    ("QoS 3", b"\x36\x05\x00\x01tab", "PUBLISH with QoS 3"),
    ("bad PUBACK length", b"\x40\x03\x00\x01\x00", "malformed packet type 4"),
    ("truncated", b"\x30\x64\x00\x03t/a" + b"x" * 10, "connection closed by the broker"),
]


def test_each_malformed_packet_drops_the_connection_with_a_reason_and_reconnects(
    fake_broker, device
):
    def script(broker, conn, n):
        broker.accept_connect(conn)
        answer_subscribe(conn)
        if n < len(MALFORMED):
            conn.sendall(MALFORMED[n][1])
            # The truncated packet is cut by our close; the others the client drops.
            if MALFORMED[n][0] != "truncated":
                hold_until_closed(conn)
        else:
            conn.sendall(publish(b"t/ok", b"fine"))
            hold_until_closed(conn)

    broker = fake_broker(script)
    dev = device(DEVICE.format(port=broker.port, connections=len(MALFORMED) + 1), heap="64K")
    out = dev.wait(timeout=60)
    lines = [line for line in out.splitlines() if "mqtt: disconnected" in line]
    for (name, _, reason), line in zip(MALFORMED, lines):
        assert reason in line, f"{name}: {line}"
    assert len(lines) >= len(MALFORMED), out
    assert "MSG t/ok 0 0 b'fine'" in out and "STOPPED" in out, out
    assert "Traceback" not in out
    assert broker.connections == len(MALFORMED) + 1


REFUSED = """
import asyncio
from mpy_blox.mqtt import MQTTClient, Will
c = MQTTClient("refused", "127.0.0.1", {port}, user="dev", password="wrong", keepalive_s=7,
               will=Will("st", "offline"), backoff_min_ms=20, backoff_max_ms=40)
async def main():
    c.start()
    await asyncio.sleep_ms(400)
    print("CONNECTED" if c.is_connected else "NOT CONNECTED")
asyncio.run(main())
"""


def test_a_refused_connect_is_logged_by_reason_and_retried(fake_broker, device):
    connects = []

    def script(broker, conn, n):
        _, body = read_packet(conn)
        connects.append(body)
        conn.sendall(b"\x20\x02\x00\x04")  # bad user name or password

    broker = fake_broker(script)
    out = device(REFUSED.format(port=broker.port), heap="64K").wait(timeout=30)
    assert "NOT CONNECTED" in out
    assert (
        "failed (ConnectError: connection refused: bad user name or password "
        "(check mqtt.username, mqtt.password))" in out
    ), out
    assert len(connects) >= 2  # it keeps trying
    # MQTT 3.1.1; flags user, password, will (QoS 1, retained), clean session; keepalive 7.
    assert connects[0] == (
        b"\x00\x04MQTT\x04\xee\x00\x07"
        b"\x00\x07refused\x00\x02st\x00\x07offline\x00\x03dev\x00\x05wrong"
    )


READS = """
import asyncio
from mpy_blox.mqtt import MQTTClient
got = []

async def handler(msg):
    try:
        if msg.topic == "t/bytes":
            data = await msg.read(100)
        else:
            data = await msg.read_buffer(100)
        print("READ", msg.topic, type(data).__name__, data == b"hello list", msg.remaining)
    except ValueError as e:
        print("REFUSED", msg.topic, e, msg.remaining)
    got.append(msg.topic)

client = MQTTClient("reads", "127.0.0.1", {port}, keepalive_s=30)

async def main():
    await client.subscribe("t/#", handler, 0)
    client.start()
    while len(got) < 3:
        await asyncio.sleep_ms(20)
    await client.stop()
asyncio.run(main())
"""


def test_read_gives_bytes_read_buffer_the_bytearray_and_a_payload_over_the_cap_is_refused(
    fake_broker, device
):
    def script(broker, conn, n):
        broker.accept_connect(conn)
        answer_subscribe(conn)
        conn.sendall(
            publish(b"t/bytes", b"hello list")
            + publish(b"t/buffer", b"hello list")
            + publish(b"t/big", b"x" * 101)
        )
        hold_until_closed(conn)

    broker = fake_broker(script)
    out = device(READS.format(port=broker.port), heap="64K").wait(timeout=30)
    assert "READ t/bytes bytes True 0" in out, out
    assert "READ t/buffer bytearray True 0" in out, out
    # Nothing read: the client drains it after the handler.
    assert "REFUSED t/big 101-byte payload over the 100-byte cap 101" in out, out
