"""Fixtures for the device MQTT client: compiled device code, live device processes,
and a scripted fake broker for exact bytes and malformed packets."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mqtt_wire import read_packet

from mpy_blox_tools import micropython

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def mpy_lib(full_mpy) -> Path:
    """The folder holding mpy_blox compiled, as the device wheel ships it.

    A 64K heap cannot compile the client from source; a device never does.
    """
    return full_mpy.parent


class Device:
    """A MicroPython process running a snippet, whose output a test can wait on."""

    def __init__(self, code: str, lib: Path, heap: str) -> None:
        prologue = f"import sys\nsys.path[:0] = [{str(lib)!r}]\n"
        self.proc = subprocess.Popen(
            [
                micropython.executable(),
                "-X",
                f"heapsize={micropython.parse_size(heap)}",
                "-c",
                prologue + code,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<exit>")
            self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30, count: int = 1) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in map(rx.search, self.lines) if m]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "<exit>"):
                    raise AssertionError(
                        f"no {pattern!r} (x{count}) in:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(left)

    def wait(self, timeout: float = 60) -> str:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"device still running after {timeout}s:\n{self.output()}"
            ) from None
        self.wait_for("<exit>", timeout=5)
        return self.output()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def device(mpy_lib):
    """Start a device snippet (compiled mpy_blox importable); killed after the test."""
    started: list[Device] = []

    def start(code: str, heap: str = "64K") -> Device:
        d = Device(code, mpy_lib, heap)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


class FakeBroker:
    """A TCP server that runs `script(conn, n)` for the n-th connection (0-based).

    The script talks bytes; `accept_connect(conn)` reads CONNECT and answers CONNACK.
    """

    def __init__(self, script) -> None:
        self.script = script
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.events: list[tuple] = []
        self.errors: list[BaseException] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            n = self.connections
            self.connections += 1
            threading.Thread(target=self._run, args=(conn, n), daemon=True).start()

    def _run(self, conn: socket.socket, n: int) -> None:
        with conn:
            try:
                self.script(self, conn, n)
            except (EOFError, ConnectionError, OSError):
                pass
            except AssertionError as e:  # a script's own check: reported by the test
                self.errors.append(e)

    def accept_connect(self, conn: socket.socket) -> bytes:
        first, body = read_packet(conn)
        assert first == 0x10, first
        conn.sendall(b"\x20\x02\x00\x00")
        return body

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_broker():
    made: list[FakeBroker] = []

    def make(script) -> FakeBroker:
        b = FakeBroker(script)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()
