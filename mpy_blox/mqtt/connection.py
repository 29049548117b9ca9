# One TCP (or TLS) connection to the broker: opening it without leaking the
# socket, a buffered reader that knows how long it has been starved, and a
# writer that sends each packet whole.
import asyncio
import errno
import socket
import sys
import time
from micropython import const

from mpy_blox.mqtt import packet
from mpy_blox.mqtt.errors import MQTTError

# A packet up to this size (header and payload) is sent in one write, copied into a
# buffer of this size the connection holds (one block for its life, not one per
# packet: the install boot's heap is too fragmented for that); a larger one goes out
# in two writes, as it is.
_JOIN = const(256)
_CONTROL_MAX = const(8)  # the longest non-PUBLISH packet we accept (CONNACK, SUBACK, ...)
_EAGER = const(16)  # reads without waiting in a row before the loop gets a turn
_IPPROTO_TCP = const(6)
_TCP_NODELAY = const(1)  # on Linux, macOS and lwIP alike


async def open_connection(host, port, ssl_context=None, server_hostname=None, buffer_size=1024):
    # asyncio.open_connection() leaks the socket when connect() fails at once
    # (MicroPython 1.22-1.29): open it here so every failure path closes it.
    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    sock = socket.socket(ai[0], ai[1], ai[2])
    ok = False
    try:
        sock.setblocking(False)
        # Nagle off (docs/mqtt.md, "Nagle off"): small packets back to back
        # (a PUBACK then an UNSUBSCRIBE, a header then its payload) each waited
        # for the broker's delayed ACK of the one before, 40 ms on Linux. The
        # ESP32 port has TCP_NODELAY from MicroPython 1.23 (1.22 has no such
        # option and prints a warning for one: left alone); the unix port has
        # no constant but hands the option to the OS.
        opt = getattr(socket, "TCP_NODELAY", None)
        if opt is None and sys.platform in ("linux", "darwin"):
            opt = _TCP_NODELAY
        if opt is not None:
            try:
                sock.setsockopt(_IPPROTO_TCP, opt, 1)
            except OSError:
                pass  # a stack without it: slower, not wrong
        try:
            sock.connect(ai[-1])
        except OSError as e:
            if e.errno != errno.EINPROGRESS:
                raise
        if ssl_context is not None:
            # The handshake runs, non-blocking, inside the first write and reads.
            sock = ssl_context.wrap_socket(
                sock, server_hostname=server_hostname or host, do_handshake_on_connect=False
            )
            sock.setblocking(False)
        conn = Connection(sock, buffer_size)
        ok = True
        return conn
    finally:
        if not ok:
            sock.close()


class Connection:
    def __init__(self, sock, buffer_size):
        self._sock = sock
        self._stream = asyncio.StreamReader(sock)
        self._lock = asyncio.Lock()
        self._buf = bytearray(buffer_size)
        self._mv = memoryview(self._buf)
        self._start = self._end = 0  # unread bytes are _buf[_start:_end]
        self._control = memoryview(bytearray(_CONTROL_MAX))
        self._out = memoryview(bytearray(_JOIN))
        self._waiting = False
        self._wait_ms = 0
        self._eager = 0  # reads left before the next one waits in the loop
        self.error = None  # the first read error: every later read raises it again
        self.tx_ms = time.ticks_ms()

    def close(self):
        self._sock.close()

    def starved_ms(self):
        """How long a read has waited for the socket without a byte (0 if none waits)."""
        if not self._waiting:
            return 0  # a busy handler is not a dead connection
        return time.ticks_diff(time.ticks_ms(), self._wait_ms)

    # -- writing -------------------------------------------------------------

    async def send(self, data, payload=None):
        """Send one packet (a header and an optional payload) without interleaving."""
        async with self._lock:
            n = len(data)
            if payload and n + len(payload) <= _JOIN:
                # One write, one segment: written apart, the payload's small segment
                # waits (Nagle) for the ACK of the header's, which the broker delays
                # (~40 ms a packet on loopback: docs/benchmarks.md). The stream copies
                # what it cannot send at once, so the buffer is free after drain().
                out = self._out
                out[:n] = data
                out[n : n + len(payload)] = payload
                data, payload = out[: n + len(payload)], None
            self._stream.write(data)
            if payload:
                self._stream.write(payload)
            await self._stream.drain()
            self.tx_ms = time.ticks_ms()

    # -- reading -------------------------------------------------------------

    def readinto_nowait(self, buf):
        """Read 1 to len(buf) bytes into buf straight from the socket if it has
        them; None if it has none, or for what readinto() serves (bytes in our
        buffer, reads smaller than it).

        What the socket holds is taken without a trip through the loop: the
        stream's readinto waits for the poller first, every time, and each
        coroutine is garbage the collector pays for (together a third of a
        4 MiB download's time through a 1 KiB buffer). After _EAGER reads in a
        row it says None anyway, so that a payload streaming at full speed
        gives the other tasks (ping, progress) their turn.
        """
        if self._end > self._start or len(buf) < len(self._buf) or not self._eager:
            return None
        if self.error is not None:
            raise self.error
        self._eager -= 1
        try:
            n = self._sock.readinto(buf)  # None: nothing there (or TLS: not a whole record)
        except Exception as e:
            self.error = e
            raise
        if n == 0:
            self.error = MQTTError("connection closed by the broker")
            raise self.error
        return n

    async def readinto(self, buf):
        """Read 1 to len(buf) bytes into buf (a bytearray or memoryview)."""
        avail = self._end - self._start
        if avail:
            n = min(avail, len(buf))
            buf[:n] = self._mv[self._start : self._start + n]
            self._start += n
            return n
        # Big reads go straight from the socket to the caller, small ones through
        # our buffer. One coroutine, no helper: this runs once per payload chunk.
        direct = len(buf) >= len(self._buf)
        target = buf if direct else self._mv
        if self.error is not None:
            raise self.error
        self._eager = _EAGER
        self._waiting = True
        self._wait_ms = time.ticks_ms()
        try:
            n = await self._stream.readinto(target)
            while n is None:  # TLS: a record is not complete yet
                n = await self._stream.readinto(target)
        except Exception as e:
            self.error = e
            raise
        finally:
            self._waiting = False
        if not n:
            self.error = MQTTError("connection closed by the broker")
            raise self.error
        if direct:
            return n
        self._start = 0
        self._end = n
        return await self.readinto(buf)  # now served from the buffer

    async def readexactly(self, mv):
        got = 0
        while got < len(mv):
            got += await self.readinto(mv[got:])

    async def _fill(self):
        # Refill the empty buffer: a 1-byte read is served from it and leaves the rest.
        await self.readinto(self._control[:1])
        self._start -= 1

    async def skip(self, n):
        while n:
            if self._start == self._end:
                await self._fill()
            k = min(self._end - self._start, n)
            self._start += k
            n -= k

    async def read_byte(self):
        if self._start == self._end:
            await self._fill()
        self._start += 1
        return self._buf[self._start - 1]

    async def read_u16(self):
        return (await self.read_byte()) << 8 | (await self.read_byte())

    async def read_header(self):
        """(first byte, remaining length) of the next packet."""
        first = await self.read_byte()
        length = 0
        i = 0
        more = True
        while more:
            length, more = packet.length_byte(length, await self.read_byte(), i)
            i += 1
        return first, length

    async def read_control(self, length):
        """The body of a short packet, in a fixed buffer valid until the next call."""
        mv = self._control[:length]
        await self.readexactly(mv)
        return mv
