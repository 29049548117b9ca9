# Download over MQTT: fetch a retained list, and download its packages, each
# from its retained topic straight into the stage, verified (SHA256, size).
# A chunked package (docs/protocol.md, "Chunked packages") is mpy_blox.update.chunks'
# business, loaded only for one: chunk by chunk, resumable.
#
# Used by the install boot (mpy_blox.update.installboot); the handlers run in
# the client's receive loop and only stream into the installer's sinks.
import asyncio
import gc
import time

from mpy_blox.log import get_logger
from mpy_blox.topics import PREFIX
from mpy_blox.update import record

# A 4 KiB chunk (a flash sector) takes a quarter of the reads, hashes and
# writes of a 1 KiB one; only where the heap has plenty left.
_BIG_CHUNK = const(4096)
_BIG_FREE = const(32768)
_PROGRESS_MS = const(1000)  # at most one downloading status a second
_STALL_S = const(30)  # no byte for this long: the package is not on the broker
_RETRIES = const(5)
_MAX_LIST = const(16384)  # manifest.MAX_LIST_BYTES

log = get_logger("update")


class _Transfer:
    # One package download; `handler` runs in the client's receive loop.
    # What follow() reads of a transfer: done, finished, error.
    def __init__(self, inst, entry):
        self.inst = inst
        self.entry = entry
        self.done = 0
        self.error = None
        self.finished = asyncio.Event()

    async def handler(self, msg):
        if self.finished.is_set():
            return  # a second delivery of the retained package
        size = self.entry["size"]
        if size is not None and msg.size != size:
            from mpy_blox.update.paths import InvalidUpdate

            self.error = InvalidUpdate(
                "size mismatch: %d bytes published, %d listed" % (msg.size, size)
            )
            self.finished.set()
            return
        try:
            # The installer's buffer (idle while a package streams), or a 4 KiB
            # one where the heap has plenty.
            buf = self.inst.buf
            if gc.mem_free() > _BIG_FREE and len(buf) < _BIG_CHUNK:
                buf = bytearray(_BIG_CHUNK)
            sink = self.inst.download(self.entry)
        except (OSError, MemoryError) as e:  # reported as such, not as a stall
            self.error = e
            self.finished.set()
            return
        mv = memoryview(buf)
        try:
            while True:
                n = msg.readinto_nowait(buf)
                if n is None:
                    n = await msg.readinto(buf)
                if not n:
                    break
                sink.write(mv if n == len(buf) else mv[:n])
                self.done += n
            sink.close()
            sink.finish()
        except (ValueError, OSError, MemoryError) as e:  # InvalidUpdate is a ValueError
            # A MemoryError too: left to the client's receive loop, it was only
            # logged there, and the transfer looked finished without an error.
            self.error = e
        finally:
            sink.close()
            self.finished.set()


class Fetcher:
    def __init__(self, client, node, stall_s=_STALL_S):
        self.client = client  # the started MQTTClient
        self.node = node
        # No byte for this long: not on the broker (update.stall_s).
        self.stall_s = stall_s if stall_s > 0 else _STALL_S
        self.current = None  # the package being worked on, for status
        self.total = None  # its size
        self.resumed_at = None  # where a chunked download resumed, for status
        self._shown_ms = 0  # when progress was last published
        self._shown = 0  # and the bytes it said were done

    async def status(self, st, qos=1, **fields):
        await record.status(self.node, st, qos, **fields)

    async def fetch_list(self, to):
        """The list retained on mpypi/{to}, as the agent accepted it (or newer)."""
        from mpy_blox.mqtt.errors import SubscribeError
        from mpy_blox.update.paths import InvalidUpdate

        got = []
        arrived = asyncio.Event()

        async def handler(msg):
            if msg.size and not arrived.is_set():
                try:
                    got.append(await msg.read_buffer(_MAX_LIST))
                except ValueError:
                    got.append(b"")  # too long: decode_list refuses it
                except MemoryError as e:
                    got.append(e)  # raised below: it is there, the heap is not
                arrived.set()

        topic = PREFIX + to
        try:
            await self.client.subscribe(topic, handler)
        except SubscribeError:
            raise
        except OSError as e:
            # The link dropped before the SUBACK (a broker may close a new
            # connection while it ends the old session of the same client id):
            # the client subscribes again when it reconnects, and the retained
            # list comes then.
            log.warning("subscribing to the list broke (%r): waiting for the reconnect", e)
        try:
            await asyncio.wait_for(arrived.wait(), self.stall_s)
        except asyncio.TimeoutError:
            raise InvalidUpdate("update list no longer on the broker") from None
        finally:
            try:
                await self.client.unsubscribe(topic)
            except OSError:
                pass  # not connected: nothing subscribed any more
        if isinstance(got[0], MemoryError):
            raise got[0]
        return got[0]

    async def download(self, entries):
        """Plan, pre-flight and download every package into the stage.

        Returns the Installer holding the downloads (its finish() stages and
        commits them, and the src index's news), or None when nothing is needed.
        """
        from mpy_blox.update.install import Installer

        inst = Installer(lean=True)
        needed = inst.plan(entries)
        # Chunked downloads kept from an earlier attempt, for a list that no
        # longer needs them, go before the pre-flight counts the flash.
        inst.drop_downloads([e["pkg_sha256"] for e in needed if "chunks" in e])
        if not needed and not inst.indexed:
            return None  # nothing to download, nothing to commit
        inst.preflight(needed, wheel_code=False)
        try:
            for entry in needed:
                self.current = entry.get("name") or entry["path"]
                self.total = entry["size"]
                if "chunks" in entry:
                    from mpy_blox.update import chunks

                    await chunks.download(self, inst, entry)
                else:
                    await self.download_package(inst, entry)
                # Its size and SHA256 checked; a wheel's files (RECORD) are
                # checked while it is staged, under "installing".
                await self.status("verifying", package=self.current)
                gc.collect()
        except BaseException:
            inst.abort()
            raise
        self.current = None
        return inst

    async def download_package(self, inst, entry):
        # One package's single message into inst.download(entry)'s sink, retried.
        from mpy_blox.topics import package_topic
        from mpy_blox.update.paths import InvalidUpdate

        topic = package_topic(entry)
        error = None
        for _ in range(_RETRIES):
            await self.client.connected()
            t = _Transfer(inst, entry)
            await self.transfer(topic, t)
            if t.error is None:
                return
            if isinstance(t.error, (InvalidUpdate, MemoryError)):
                raise t.error  # a retry would fare no better
            error = t.error
            log.warning("download of %s broken (%r): retrying", topic, error)
        raise InvalidUpdate("download failed: %r" % error)

    async def transfer(self, topic, t, what=None, first=True, last=True):
        """Take one retained message on `topic` (its exact name) into transfer `t`.

        A broken link ends up in t.error (OSError), as does what t's handler
        raised; a stall raises InvalidUpdate.
        """
        try:
            await self.client.subscribe(topic, t.handler)
            await self.follow(t, what, first, last)
        except OSError as e:
            t.error = e
        finally:
            try:
                await self.client.unsubscribe(topic)
            except OSError:
                pass  # not connected: a new connection has no subscription

    async def follow(self, t, what=None, first=True, last=True):
        """Wait for transfer `t` to finish, reporting its progress.

        first, last: publish its start, and its end; a chunk of a package is
        neither unless it is the package's first or last. Raises OSError when
        the link drops, InvalidUpdate when no byte comes for stall_s ("package
        not on the broker: " + what, by default t.missing if it says, else
        the package's name).
        """
        # Progress from here, not from the handler, and at QoS 0: a QoS 1
        # publish waits for its PUBACK, which the receive loop reads only after
        # the package it is streaming; QoS 0 goes out at once.
        if first:
            # Where it starts (the handler may be streaming already).
            await self._progress(t, self.resumed_at or 0)
        seen = t.done  # the bytes at the last look (not `last`: the argument)
        idle_ms = 0
        while not t.finished.is_set():
            try:
                await asyncio.wait_for_ms(t.finished.wait(), _PROGRESS_MS)
            except asyncio.TimeoutError:
                pass
            if t.finished.is_set():
                break
            if not self.client.is_connected:
                raise OSError("broker connection lost")
            if t.done != seen:
                seen = t.done
                idle_ms = 0
            else:
                idle_ms += _PROGRESS_MS
                if idle_ms > self.stall_s * 1000:
                    from mpy_blox.update.paths import InvalidUpdate

                    what = what or getattr(t, "missing", None) or self.current
                    raise InvalidUpdate("package not on the broker: " + what)
            if t.done != self._shown:
                # Not only this transfer's bytes: chunks that came in under a
                # second each, before one that stalls, are shown too.
                await self._progress(t)
        if t.error is None and (
            last or time.ticks_diff(time.ticks_ms(), self._shown_ms) >= _PROGRESS_MS
        ):
            # The end too: a package that streams in under a second would
            # otherwise show only its 0%; and a chunk's, once a second, as
            # chunks may each take less.
            await self._progress(t)

    async def _progress(self, t, done=None):
        self._shown_ms = time.ticks_ms()
        self._shown = done = t.done if done is None else done
        await self.status(
            "downloading",
            0,
            package=self.current,
            done=done,
            total=self.total,
            resumed_at=self.resumed_at,
        )
