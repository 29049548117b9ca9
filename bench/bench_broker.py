"""What one Mosquitto holds: retained lists, chunked packages, board connections, fan-out.

The figures docs/scaling.md rests on (`make bench BENCH=broker`). One Mosquitto (as
the tests start it: loopback, persistence on) and, standing in for boards, raw-socket
MQTT 3.1.1 clients that do what a board does on the broker: connect with its will
(`offline`, retained, on its status topic), subscribe to its channel's list and its
own `cmd`, and publish its retained `info` (512 bytes, the order of a real one) and
`status`. Memory is Mosquitto's own count of its heap (`$SYS/broker/heap/current`) and
its resident set (VmRSS in /proc): the heap is what the retained messages and sessions
cost, the RSS what the machine gives the process (the kernel's socket buffers are in
neither). The fan-out rows time one Mosquitto sending a retained 4 MiB package in
64 KiB chunks to K subscribers at QoS 1 on loopback: the receivers share this
machine's cores with the broker, so the rate is a floor for a node of its own.
"""

from __future__ import annotations

import hashlib
import os
import resource
import selectors
import socket
import struct
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho

from mpy_blox_tools import chunks
from mpy_blox_tools.broker import Mosquitto

TITLE = "One Mosquitto: retained lists, chunked packages, board connections, fan-out"
CONNECTIONS = (1000, 5000, 10000)
LISTS = 10000  # one `cmd` list per device, 1 KiB each
LIST_SIZE = 1024
PACKAGE = 4 * 2**20
PACKAGES = 5  # 20 MiB retained
CHUNK = chunks.DEFAULT_CHUNK_SIZE
FAN_OUT = (10, 100, 500)
INFO = b"{" + b" " * 510 + b"}"
MIB = 2**20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def connect_packet(client_id: str, will_topic: str, keepalive_s: int = 600) -> bytes:
    # Clean session, will QoS 1 retained: what the board's MQTT client sends.
    flags = 0x02 | 0x04 | 0x08 | 0x20
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive_s)
    body += _string(client_id) + _string(will_topic) + _string(b'{"state": "offline"}')
    return _packet(0x10, body)


def subscribe_packet(packet_id: int, *filters: str) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_string(f) + b"\x01" for f in filters)
    return _packet(0x82, body)


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    # QoS 1, retained.
    return _packet(0x33, _string(topic) + struct.pack("!H", packet_id) + payload)


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    head = sock.recv(1)
    if not head:
        raise ConnectionError("the broker closed the connection")
    length, shift = 0, 0
    while True:
        digit = sock.recv(1)[0]
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            break
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return head[0] & 0xF0, body


def board(host: str, port: int, n: int) -> socket.socket:
    """A board stand-in, connected, subscribed, its info and status retained."""
    device = "esp32-%012x" % (0xBE4C00000000 + n)
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(connect_packet(device, f"mpypi/nodes/{device}/status"))
    kind, body = _read_packet(s)
    if kind != 0x20 or body[1] != 0:
        raise ConnectionError(f"{device}: CONNACK {body!r}")
    s.sendall(subscribe_packet(1, "mpypi/channels/bench", f"mpypi/nodes/{device}/cmd"))
    s.sendall(publish_packet(f"mpypi/nodes/{device}/info", INFO, 2))
    s.sendall(publish_packet(f"mpypi/nodes/{device}/status", b'{"state": "online"}', 3))
    acks = 0
    while acks < 3:  # SUBACK, then a PUBACK each
        kind, _ = _read_packet(s)
        acks += kind in (0x90, 0x40)
    return s


class Probe:
    """Mosquitto's $SYS figures (sys_interval 1) and its VmRSS."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.heap = 0
        self.updated = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-probe")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("$SYS/broker/heap/current", 0)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        self.heap = int(msg.payload)
        self.updated.set()

    def settle(self) -> tuple[float, float]:
        """(heap MiB, RSS MiB) after two fresh $SYS updates."""
        for _ in range(2):
            self.updated.clear()
            self.updated.wait(5)
        return self.heap / MIB, rss_mib(self.broker.process.pid)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _publisher(broker: Mosquitto) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    c.max_inflight_messages_set(20)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def _publish_all(client: paho.Client, messages: list[tuple[str, bytes]]) -> float:
    started = time.monotonic()
    infos = [client.publish(t, p, qos=1, retain=True) for t, p in messages]
    for info in infos:
        info.wait_for_publish(120)
    return time.monotonic() - started


def _package(n: int) -> tuple[dict, bytes]:
    data = os.urandom(PACKAGE)
    entry = {
        "type": "wheel",
        "name": f"bench{n}",
        "version": "1.0",
        "pkg_sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    return entry, data


def _row(what: str, n: int, unit: str, before, after, seconds=None, payload=0) -> dict:
    heap = (after[0] - before[0]) * MIB
    row = {
        "what": what,
        "n": n,
        "payload MiB": round(payload / MIB, 2),
        "heap MiB": round(after[0], 1),
        "RSS MiB": round(after[1], 1),
        "heap delta MiB": round(after[0] - before[0], 2),
        "RSS delta MiB": round(after[1] - before[1], 2),
        f"heap per {unit}": "",
        "seconds": round(seconds, 2) if seconds is not None else "",
    }
    row[f"heap per {unit}"] = round(heap / (n if unit != "MiB" else payload / MIB))
    return row


def _fan_out(
    broker: Mosquitto, topic_filter: str, receivers: int, expected: int, messages: int
) -> float:
    """Seconds until `receivers` QoS 1 subscribers to `topic_filter` have `expected`
    payload bytes each (PUBACKs sent as each PUBLISH arrives)."""
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(receivers):
        s = socket.create_connection((broker.host, broker.port))
        s.sendall(
            _packet(0x10, _string("MQTT") + bytes([4, 0x02]) + b"\x02\x58" + _string(f"r{i}"))
        )
        _read_packet(s)
        socks.append(s)
    state = {s: [bytearray(), 0, 0] for s in socks}  # buffer, payload bytes, messages
    started = time.monotonic()
    for s in socks:
        s.sendall(subscribe_packet(1, topic_filter))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    done = 0
    while done < receivers:
        for key, _ in sel.select(30):
            s = key.fileobj
            buf, got, count = state[s]
            buf += s.recv(1 << 20)
            acks = bytearray()
            while len(buf) >= 2:
                length, shift, i = 0, 0, 1
                while i < len(buf):
                    length |= (buf[i] & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not buf[i - 1] & 0x80:
                        break
                else:
                    break
                if len(buf) < i + length:
                    break
                if buf[0] & 0xF0 == 0x30:
                    tlen = struct.unpack_from("!H", buf, i)[0]
                    pid = buf[i + 2 + tlen : i + 4 + tlen]
                    acks += b"\x40\x02" + pid
                    got += length - 4 - tlen
                    count += 1
                del buf[: i + length]
            if acks:
                s.setblocking(True)
                s.sendall(acks)
                s.setblocking(False)
            state[s][1:] = [got, count]
            if got >= expected and sel.get_map().get(s):
                sel.unregister(s)
                done += 1
    elapsed = time.monotonic() - started
    if any(got != expected or count != messages for _, got, count in state.values()):
        raise RuntimeError(f"fan-out: not every receiver got {messages} messages")
    for s in socks:
        s.close()
    return elapsed


def run(workdir: Path) -> list[dict]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # Mosquitto inherits it
    rows = []
    extra = "sys_interval 1\nmax_packet_size 16777216\nmax_queued_messages 10000"
    with Mosquitto(workdir / "broker", extra_config=extra) as broker:
        probe = Probe(broker)
        base = probe.settle()
        rows.append({"what": "empty broker", "n": 0, "heap MiB": round(base[0], 2),
                     "RSS MiB": round(base[1], 1)})  # fmt: skip
        pub = _publisher(broker)

        # One 1 KiB retained list per device (`publish --device-ids`).
        lists = [(f"mpypi/nodes/esp32-{n:012x}/cmd", os.urandom(LIST_SIZE)) for n in range(LISTS)]
        before = probe.settle()
        seconds = _publish_all(pub, lists)
        after = probe.settle()
        rows.append(_row("retained 1 KiB lists", LISTS, "list", before, after, seconds,
                         LISTS * LIST_SIZE))  # fmt: skip

        # Chunked 4 MiB packages, then the same bytes as single messages.
        for label, size in (
            ("retained 4 MiB packages, 64 KiB chunks", CHUNK),
            ("retained 4 MiB packages, one message each", 0),
        ):
            messages = []
            for n in range(PACKAGES):
                entry, data = _package(n + (100 if size else 0))
                if size:
                    messages += chunks.chunk(entry, data, size).messages()
                else:
                    messages.append((f"mpypi/packages/wheel/{entry['pkg_sha256']}", data))
            before = probe.settle()
            seconds = _publish_all(pub, messages)
            after = probe.settle()
            row = _row(label, len(messages), "MiB", before, after, seconds, PACKAGES * PACKAGE)
            row["publish MiB/s"] = round(PACKAGES * PACKAGE / MIB / seconds, 1)
            row["msgs/s"] = round(len(messages) / seconds)
            rows.append(row)
        time.sleep(2)  # autosave_interval 1: the store is on disk
        db = broker.dir / "mosquitto.db"
        rows.append({"what": "persistence file (mosquitto.db)", "n": 1,
                     "payload MiB": round(db.stat().st_size / MIB, 2)})  # fmt: skip

        # Fan-out: K subscribers fetch one retained chunked 4 MiB package.
        entry, data = _package(999)
        chunked = chunks.chunk(entry, data, CHUNK)
        _publish_all(pub, chunked.messages())
        package_filter = chunked.messages()[0][0].rsplit("/", 1)[0] + "/#"
        expected = sum(len(p) for _, p in chunked.messages())
        for k in FAN_OUT:
            seconds = _fan_out(broker, package_filter, k, expected, len(chunked.messages()))
            rows.append({
                "what": "fan-out of a 4 MiB package (QoS 1)",
                "n": k,
                "payload MiB": round(k * expected / MIB, 1),
                "seconds": round(seconds, 2),
                "delivered MiB/s": round(k * expected / MIB / seconds, 1),
                "msgs/s": round(k * len(chunked.messages()) / seconds),
            })  # fmt: skip

        # Board connections, held open together.
        held: list[socket.socket] = []
        previous = 0
        for n in CONNECTIONS:
            before = probe.settle()
            started = time.monotonic()
            try:
                while len(held) < n:
                    held.append(board(broker.host, broker.port, len(held)))
            except OSError as e:
                rows.append({"what": f"connections: stopped at {len(held)} ({e})", "n": n})
                break
            seconds = time.monotonic() - started
            after = probe.settle()
            if n == CONNECTIONS[0]:
                unconnected = before
            row = _row("boards connected (total)", n, "board", unconnected, after, seconds)
            row["connects/s"] = round((n - previous) / seconds)
            previous = n
            rows.append(row)
        for s in held:
            s.close()
        pub.loop_stop()
        pub.disconnect()
        probe.close()
    return rows
