"""A TCP proxy for the benchmarks: counts the bytes a board exchanges and, when asked,
shapes the link like an ESP32's Wi-Fi (not a benchmark: bench/run.py runs bench_*).

Each direction is a pipe with a bandwidth (`rate`, bytes per second; 0: unlimited)
and a one-way delay (`delay_s`): a chunk read at t leaves the far end at
max(t, when the previous chunk finished serialising) + its size / rate + delay_s,
as on a link with that bandwidth and latency. Both pipes are bounded queues, so a
slow reader slows the writer as TCP would. Runs its own asyncio loop in a thread.

    with Shaper(("127.0.0.1", broker_port), rate=1_000_000, delay_s=0.02) as link:
        ... the board connects to link.port ...
        link.reset(); ...; link.up, link.down   # bytes since the reset
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

CHUNK = 4096
# An ESP32 on Wi-Fi, for the benchmarks' shaped rows: 1 MB/s and 20 ms each way.
WIFI_RATE = 1_000_000
WIFI_DELAY_MS = 20


def link_from_env(prefix: str) -> tuple[float, float]:
    """(rate, delay_s) of a bench's shaped link: {prefix}_RATE bytes/s and
    {prefix}_DELAY_MS each way, from the environment, else an ESP32's Wi-Fi."""
    rate = float(os.environ.get(f"{prefix}_RATE", WIFI_RATE))
    delay_ms = float(os.environ.get(f"{prefix}_DELAY_MS", WIFI_DELAY_MS))
    return rate, delay_ms / 1000


QUEUE = 64  # chunks in flight per direction: 256 KiB, enough for 1 MB/s x 40 ms


class Shaper:
    def __init__(self, target: tuple[str, int], rate: float = 0, delay_s: float = 0) -> None:
        self.target = target
        self.rate = rate
        self.delay_s = delay_s
        self.up = 0  # bytes from the board to the server
        self.down = 0  # bytes from the server to the board
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def reset(self) -> None:
        self.up = self.down = 0

    @property
    def total(self) -> int:
        return self.up + self.down

    def __enter__(self) -> Shaper:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = started.result(timeout=10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._server.close()
        for task in asyncio.all_tasks(self._loop) - {asyncio.current_task()}:
            task.cancel()

    async def _accept(self, board_r, board_w) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            board_w.close()
            return
        await asyncio.gather(
            self._pipe(board_r, server_w, "up"),
            self._pipe(server_r, board_w, "down"),
            return_exceptions=True,
        )

    async def _pipe(self, reader, writer, direction: str) -> None:
        queue: asyncio.Queue = asyncio.Queue(QUEUE)
        sender = asyncio.create_task(self._send(queue, writer))
        free_at = 0.0  # when the link finishes serialising what it holds
        try:
            while data := await reader.read(CHUNK):
                setattr(self, direction, getattr(self, direction) + len(data))
                now = time.monotonic()
                free_at = max(now, free_at) + (len(data) / self.rate if self.rate else 0)
                await queue.put((free_at + self.delay_s, data))
        except OSError:
            pass
        finally:
            await queue.put((0.0, b""))  # end of stream, after what is in flight
            await sender

    async def _send(self, queue: asyncio.Queue, writer) -> None:
        try:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
