"""Device MQTT client throughput: a retained message through Mosquitto vs raw TCP.

The same board code (read into one 4 KiB buffer, SHA256 each chunk) consumes the
payload twice in one MicroPython process with a 100K heap (the virtual board's
interpreter and heap; flash is not involved): once as an MQTT message from
Mosquitto, once from a plain TCP server that sends the same bytes and closes.
Each figure is the best of `REPEATS` runs, alternating the two paths.

Heap columns:
  live_heap_max_kib  the largest live heap (after gc.collect()) sampled every 64 chunks
                     while the payload streams: flat across sizes means O(1) memory;
  mem_peak_kib       micropython.mem_peak(): on the unix port this counts every byte
                     ever allocated (the GC's frees are not subtracted), so it grows
                     with the payload; it measures allocation churn, not a peak.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from pathlib import Path

import paho.mqtt.client as mqtt

from mpy_blox_tools import build, micropython
from mpy_blox_tools.broker import Mosquitto

TITLE = "Device MQTT client: 4 MiB retained message vs raw TCP, 100K heap"
SIZES = {"64 KiB": 64 * 1024, "1 MiB": 1024 * 1024, "4 MiB": 4 * 1024 * 1024}
REPEATS = 5
HEAP = "100K"

BOARD = """
import asyncio, gc, hashlib, micropython, time
from binascii import hexlify
from mpy_blox import log
from mpy_blox.mqtt import MQTTClient
log.set_level("WARNING")
HOST, MQTT_PORT, RAW_PORT, TOPIC, REPEATS = {host!r}, {mqtt_port}, {raw_port}, {topic!r}, {repeats}
BUF = bytearray(4096)
MV = memoryview(BUF)

async def consume(src):
    # The board code under test: one buffer, a hash, nothing kept. Timed from its
    # first read, on both paths, so connection set-up is left out of both.
    p0 = micropython.mem_peak()
    t0 = time.ticks_us()
    h = hashlib.sha256()
    got = chunks = 0
    live = 0
    while True:
        n = await src.readinto(MV)
        if not n:
            break
        h.update(MV[:n])
        got += n
        chunks += 1
        if not chunks % 64:
            gc.collect()
            live = max(live, gc.mem_alloc())
    us = time.ticks_diff(time.ticks_us(), t0)
    alloc = micropython.mem_peak() - p0
    gc.collect()
    live = max(live, gc.mem_alloc())
    return got, us, hexlify(h.digest()).decode(), live, alloc // max(chunks, 1)

def report(path, t0, result):
    got, us, digest, live, alloc = result
    e2e = time.ticks_diff(time.ticks_us(), t0)
    print("RESULT", path, got, us, digest, live, alloc, e2e)

async def raw():
    t0 = time.ticks_us()
    reader, writer = await asyncio.open_connection(HOST, RAW_PORT)
    report("raw", t0, await consume(reader))
    await reader.wait_closed()

async def main():
    done = asyncio.Event()
    state = {{}}

    async def handler(msg):
        report("mqtt", state["t0"], await consume(msg))
        done.set()

    client = MQTTClient("bench", HOST, MQTT_PORT, keepalive_s=30)
    client.start()
    await client.connected()
    for _ in range(REPEATS):
        gc.collect()
        await raw()
        gc.collect()
        done.clear()
        state["t0"] = time.ticks_us()
        await client.subscribe(TOPIC, handler)
        await done.wait()
        await client.unsubscribe(TOPIC)
    await client.stop()

asyncio.run(main())
"""


class _RawSender:
    """Sends `payload` to every connection, then closes it."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.payload)

    def close(self) -> None:
        self.sock.close()


def _publish_retained(broker: Mosquitto, topic: str, payload: bytes) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(30)
    finally:
        c.loop_stop()
        c.disconnect()


def run(workdir: Path) -> list[dict]:
    workdir = Path(workdir)
    lib = build.compile_framework(workdir / "lib").parent
    rows = []
    with Mosquitto(workdir / "mosquitto", persistence=False) as broker:
        for label, size in SIZES.items():
            payload = os.urandom(size)
            digest = hashlib.sha256(payload).hexdigest()
            topic = f"bench/{size}"
            _publish_retained(broker, topic, payload)
            sender = _RawSender(payload)
            try:
                code = BOARD.format(
                    host=broker.host,
                    mqtt_port=broker.port,
                    raw_port=sender.port,
                    topic=topic,
                    repeats=REPEATS,
                )
                proc = micropython.run_snippet(code, heap=HEAP, path=[str(lib)], timeout=300)
            finally:
                sender.close()
            out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
            results = re.findall(
                r"^RESULT (\w+) (\d+) (\d+) (\w+) (\d+) (\d+) (\d+)$", out, re.MULTILINE
            )
            if proc.returncode or len(results) != 2 * REPEATS:
                raise RuntimeError(f"board run failed for {label}:\n{out}")
            best: dict[str, dict] = {}
            for path, got, us, sha, live, alloc, e2e in results:
                if int(got) != size or sha != digest:
                    raise RuntimeError(f"{path} {label}: wrong payload ({got} bytes)")
                row = best.get(path)
                if row is None or int(us) < row["us"]:
                    best[path] = {
                        "us": max(int(us), 1),
                        "alloc": int(alloc),
                        "e2e": int(e2e),
                        "live_max": max(int(live), row["live_max"] if row else 0),
                    }
                else:  # keep the largest heap figure seen on that path
                    row["live_max"] = max(row["live_max"], int(live))
            raw_rate = size / 1048576 / (best["raw"]["us"] / 1e6)
            raw_e2e = best["raw"]["e2e"]
            for path, name in (("mqtt", "mqtt"), ("raw", "raw socket")):
                b = best[path]
                rate = size / 1048576 / (b["us"] / 1e6)
                rows.append(
                    {
                        "payload": label,
                        "path": name,
                        "ms": round(b["us"] / 1000, 1),
                        "MiB/s": round(rate, 1),
                        "ratio": round(rate / raw_rate, 2),
                        "e2e_ms": round(b["e2e"] / 1000, 1),
                        "e2e_ratio": round(raw_e2e / b["e2e"], 2),
                        "live_heap_max_kib": round(b["live_max"] / 1024, 1),
                        "alloc_per_chunk_b": b["alloc"],
                    }
                )
    return rows


if __name__ == "__main__":
    import tempfile

    for r in run(Path(tempfile.mkdtemp(prefix="bench-mqtt-"))):
        print(json.dumps(r))
