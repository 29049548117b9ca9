# A received PUBLISH as the handler sees it: its header fields and a bounded
# reader over the payload, which is still in the socket.
#
# The payload never sits in RAM as a whole: the handler pulls it through its own
# buffer with readinto() (readinto_nowait() first, for what has arrived), or
# takes it in one piece when it knows it is small: read(max_size) as bytes, or
# read_buffer(max_size) as the bytearray it was read into (no second copy).
# Whatever the handler leaves is drained by the client.
from mpy_blox.mqtt.errors import MQTTError


class Message:
    def __init__(self, source, topic, size, qos, retain, dup):
        self._source = source  # the connection's Input; None once the handler returned
        self.topic = topic
        self.size = size
        self.qos = qos
        self.retain = bool(retain)
        self.dup = dup
        self.remaining = size

    def __repr__(self):
        return "<Message %s %d bytes qos=%d retain=%s>" % (
            self.topic,
            self.size,
            self.qos,
            self.retain,
        )

    def _input(self):
        if self._source is None:
            # The connection has moved on to the next packet: these bytes are gone.
            raise MQTTError("message read after its handler returned")
        return self._source

    async def readinto(self, buf):
        """Read up to len(buf) payload bytes into buf; 0 at the end of the payload."""
        left = self.remaining
        if not left:
            return 0
        if len(buf) > left:
            buf = memoryview(buf)[:left]  # never read into the next packet
        n = await self._input().readinto(buf)
        self.remaining = left - n
        return n

    def readinto_nowait(self, buf):
        """readinto() of what has arrived, without waiting: None when nothing
        has (then await readinto()). A loop over a big payload takes this
        first: no coroutine, no trip through the loop for bytes already there.
        """
        left = self.remaining
        if not left:
            return 0
        if len(buf) > left:
            buf = memoryview(buf)[:left]
        n = self._input().readinto_nowait(buf)
        if n:
            self.remaining = left - n
        return n

    async def read(self, max_size):
        """The rest of the payload as bytes, for small messages only.

        Raises ValueError, reading nothing, if it is over max_size bytes.
        """
        return bytes(await self.read_buffer(max_size))

    async def read_buffer(self, max_size):
        """read(), as the bytearray it is read into: for a payload of some KB
        (an update list), whose bytes() copy would hold it twice at once.

        Raises ValueError, reading nothing, if it is over max_size bytes.
        """
        if self.remaining > max_size:
            raise ValueError("%d-byte payload over the %d-byte cap" % (self.remaining, max_size))
        buf = bytearray(self.remaining)
        mv = memoryview(buf)
        got = 0
        while got < len(buf):
            got += await self.readinto(mv[got:])
        return buf

    async def skip(self):
        """Drain the rest of the payload."""
        if self.remaining:
            await self._input().skip(self.remaining)
            self.remaining = 0

    async def release(self):
        """The client's, after the handler returned: drain, then cut the handler off."""
        try:
            await self.skip()
        finally:
            self._source = None
