# A chunked package (docs/protocol.md, "Chunked packages"): downloaded one chunk
# at a time, each checked on its own against the hash list, into a file that
# outlives the install boot, so that a broken link, a broker restart or a reset
# resumes from the last chunk verified on flash instead of from byte 0.
#
# Loaded by mpy_blox.update.fetch for a chunked entry only. Its files, in DIR:
#   {name}     the package as far as it came (chunks 0..k-1 verified); name is
#              its pkg_sha256 (a src file's: then "." and the CRC32 of its path)
#   {name}.h   its hash list, checked against the list's chunks_sha256
# They survive the install boot's restarts and Installer.begin() (the stage is
# cleaned there; these are not in it). They go when the package is staged
# (Installer.stage moves the download into the stage), on any failure
# (Installer.abort), and when the list being installed no longer needs them
# (Installer.drop_downloads).
#
# A resume trusts nothing on flash it has not hashed again: the download's
# chunks are read back and each compared with its hash, which also rebuilds the
# package's hasher (MicroPython's cannot be copied or saved). The first chunk
# that is short or does not match (a cut while it was written) is where the
# download goes on; the file is written in place from there (r+b): nothing
# after it was ever kept, and the package's size bounds the file.
import gc
import hashlib
import os

from mpy_blox.log import get_logger
from mpy_blox.topics import chunk_topic
from mpy_blox.update.paths import InvalidUpdate
from mpy_blox.update.state import hex_digest

DIR = "/.mpypi/dl"
_HASH = const(32)  # bytes of a chunk's SHA256 in the hash list
_BIG_CHUNK = const(4096)  # as fetch: a flash sector, where the heap has room
_BIG_FREE = const(32768)
_BATCH = const(8)  # hashes read from the hash list at once (256 bytes)
_RETRIES = const(5)

log = get_logger("update")


class _Piece:
    # One message of the package (a chunk, or the hash list) on its way to
    # flash; fetch.Fetcher.follow watches it, `handler` runs in the client's
    # receive loop. `write(mv)` takes its bytes.
    def __init__(self, dl, size, what, write):
        import asyncio

        self.dl = dl
        self.size = size
        self.what = what  # "chunk 7", "hash list"
        self._write = write
        self.error = None
        self.finished = asyncio.Event()

    @property
    def done(self):
        return self.dl.done

    async def handler(self, msg):
        if self.finished.is_set():
            return  # a second delivery of the retained message
        try:
            await _pour(msg, self.size, self.dl, self._write, self.what)
        except (ValueError, OSError, MemoryError) as e:  # InvalidUpdate is a ValueError
            self.error = e
        finally:
            self.finished.set()


async def _pour(msg, size, dl, write, what):
    # A message of `size` bytes (checked before a byte is read) through dl's
    # buffer into write(mv); what the socket holds already is taken without
    # waiting (Message.readinto_nowait).
    if msg.size != size:
        raise InvalidUpdate(
            "%s of %s: %d bytes published, %d expected" % (what, dl.label, msg.size, size)
        )
    buf = dl.buf
    mv = memoryview(buf)
    while True:
        n = msg.readinto_nowait(buf)
        if n is None:
            n = await msg.readinto(buf)
        if not n:
            break
        write(mv if n == len(buf) else mv[:n])


class _Stream:
    # The missing chunks of one attempt, as one transfer that
    # fetch.Fetcher.follow watches (done, error, finished). Each chunk's
    # handler, as the chunk begins to arrive, asks for the next (SUBSCRIBE,
    # and UNSUBSCRIBE of its own: sent from the handler, so not waited for),
    # then reads, checks and syncs its chunk: the next one is on its way
    # behind it meanwhile, so the link never idles for a round trip between
    # chunks. Still one chunk subscribed at a time, but for the moment between
    # the two requests; at most two messages on the connection, the second
    # in the socket's buffers, not in the heap. Its handler takes only the
    # chunk the download is at: a chunk that failed ends the attempt, and the
    # next one is then ignored.
    def __init__(self, client, dl):
        import asyncio

        self.client = client
        self.dl = dl
        self.topic = None  # the chunk topic subscribed to
        self.error = None
        self.finished = asyncio.Event()

    @property
    def done(self):
        return self.dl.done

    @property
    def missing(self):
        # What a stall names (follow): "big 1.0 (chunk 7)".
        return "%s (chunk %d)" % (self.dl.label, self.dl.k)

    def _handler(self, k):
        # Chunk k's own: a late copy of a chunk already taken (its
        # subscription ends with the next one's request) changes nothing.
        async def handler(msg):
            if k == self.dl.k and not self.finished.is_set():
                await self._take(msg)

        return handler

    async def run(self, fetcher):
        dl = self.dl
        dl.chunk_open()
        self.topic = chunk_topic(dl.entry, dl.k)
        try:
            await self.client.subscribe(self.topic, self._handler(dl.k))
            await fetcher.follow(self)
        except OSError as e:
            self.error = e
        finally:
            try:
                await self.client.unsubscribe(self.topic)
            except OSError:
                pass  # not connected: a new connection has no subscription
        if self.error is not None:
            raise self.error

    async def _take(self, msg):
        dl = self.dl
        try:
            k = dl.k + 1
            if k < dl.n:
                # The next chunk is asked for as this one begins to arrive:
                # the broker queues it right behind this one, and no round
                # trip a chunk is left (20-40 ms each on Wi-Fi). Dropping this
                # chunk's subscription cuts nothing: its PUBLISH is under way
                # on the connection. That one goes first: should the link fail
                # between the two, no stale one is left to come back with the
                # reconnect (run() forgets the one in self.topic). If this
                # chunk fails, the next one arrives to a handler that ignores it.
                old, self.topic = self.topic, chunk_topic(dl.entry, k)
                await self.client.unsubscribe(old)
                await self.client.subscribe(self.topic, self._handler(k))
            await _pour(msg, dl.size(dl.k), dl, dl.chunk_write, "chunk %d" % dl.k)
            dl.chunk_check()
            dl.chunk_finish()
            if k < dl.n:
                dl.chunk_open()
                return
        except (ValueError, OSError, MemoryError) as e:  # InvalidUpdate is a ValueError
            self.error = e
        self.finished.set()


class Download:
    # One attempt at a chunked package: its hash list checked, its chunks on
    # flash verified, then each missing chunk fetched into the file in place.
    # The package's bytes go through have(), reader(at) and writer(at): a file
    # here; the next OTA partition for a firmware image (mpy_blox.update.firmware).
    def __init__(self, inst, entry):
        self.inst = inst
        self.entry = entry
        self.label = label(entry)
        self.path = path(inst.root, entry)
        self.cs = entry["chunk_size"]
        self.n = entry["chunks"]
        self.k = 0  # chunks verified on flash
        self.done = 0  # their bytes
        self.pkg = hashlib.sha256()  # the package's hasher, over chunks 0..k-1
        self.h = None  # the chunk's hasher, or the hash list's
        self.f = None
        gc.collect()
        # The download's buffer: the installer's own, idle while chunks
        # stream (scan() and hashes_ok() are done with it by then), but where
        # the heap has room for a 4 KiB one.
        big = gc.mem_free() > _BIG_FREE and len(inst.buf) < _BIG_CHUNK
        self.buf = bytearray(_BIG_CHUNK) if big else inst.buf
        self.want = bytearray(_HASH)  # the listed hash of the chunk being checked
        # The next _BATCH hashes of the list, read from flash at once: the
        # package's file then stays open from one chunk to the next (synced,
        # not closed), where each chunk used to close it, open the hash list
        # and open it again (0.6 ms a chunk on the 32-bit lane at 100K).
        self.batch = bytearray(_HASH * _BATCH)
        self.first = -_BATCH  # the chunk whose hash starts the batch

    def size(self, k):
        return min(self.cs, self.entry["size"] - k * self.cs)

    def have(self):
        # Bytes of the package on flash, verified or not.
        try:
            return os.stat(self.path)[6]
        except OSError:
            return 0

    def reader(self, at):
        f = open(self.path, "rb")
        f.seek(at)
        return f

    def writer(self, at):
        try:
            f = open(self.path, "r+b")
        except OSError:
            f = open(self.path, "wb")
        f.seek(at)
        return f

    def batched(self, k):
        # Chunk k's hash is in the batch: listed(k) opens no file.
        return 0 <= k - self.first < _BATCH

    def listed(self, k):
        # Chunk k's SHA256 from the hash list on flash: a batch of them at
        # a time, never the list. Opens the list unless batched(k), so not
        # while the package's file is open (two 1 KB caches).
        if not self.batched(k):
            want = min(_BATCH, self.n - k) * _HASH
            with open(self.path + ".h", "rb") as f:
                f.seek(k * _HASH)
                if f.readinto(self.batch) < want:
                    raise InvalidUpdate("hash list of %s cut short" % self.label)
            self.first = k
        i = (k - self.first) * _HASH
        self.want[:] = memoryview(self.batch)[i : i + _HASH]
        return self.want

    # The hash list.

    def hashes_ok(self):
        # The hash list on flash, if there is one, is the listed one.
        size = _HASH * self.n
        try:
            if os.stat(self.path + ".h")[6] != size:
                return False
        except OSError:
            return False
        h = hashlib.sha256()
        buf = self.inst.buf
        with open(self.path + ".h", "rb") as f:
            while True:
                got = f.readinto(buf)
                if not got:
                    break
                h.update(memoryview(buf)[:got])
        return hex_digest(h.digest()) == self.entry["chunks_sha256"]

    def hashes_piece(self):
        self.h = hashlib.sha256()
        self.f = open(self.path + ".h", "wb")
        return _Piece(self, _HASH * self.n, "hash list", self._hashes_write)

    def _hashes_write(self, mv):
        self.h.update(mv)
        self.f.write(mv)

    def hashes_finish(self):
        self.f.close()
        self.f = None
        if hex_digest(self.h.digest()) != self.entry["chunks_sha256"]:
            raise InvalidUpdate("hash list of %s: SHA256 mismatch" % self.label)

    # The chunks.

    def scan(self):
        # Verify the chunks already on flash; returns the bytes kept.
        have = self.have()
        if not have:
            return 0
        mv = memoryview(self.inst.buf)
        # Each whole chunk against its hash, up to the first that fails; one
        # file open at a time (each holds a 1 KB cache): its hash first.
        while self.k < self.n:
            size = self.size(self.k)
            if have < self.done + size:
                break  # the chunk a cut left short
            want = self.listed(self.k)
            h = hashlib.sha256()
            f = self.reader(self.done)
            try:
                _feed(f, size, h, mv)
            finally:
                f.close()
            if h.digest() != want:
                break  # written in part, or damaged: fetched again
            self.k += 1
            self.done += size
        # Then those into the package's hasher, which cannot take back the
        # bytes of a chunk that failed.
        if self.done:
            f = self.reader(0)
            try:
                _feed(f, self.done, self.pkg, mv)
            finally:
                f.close()
        return self.done

    def chunk_open(self):
        # Chunk k's listed hash, then the package's file at its start, if
        # chunk_finish closed it: never both open (a file's cache is a 1 KB
        # block, more than a 100K install boot has twice).
        self.h = hashlib.sha256()
        self.listed(self.k)
        if self.f is None:
            self.f = self.writer(self.done)

    def chunk_write(self, mv):
        # Straight into the package's hasher too: a chunk that fails or
        # breaks off ends this attempt, and the next one rebuilds it (scan).
        self.h.update(mv)
        self.pkg.update(mv)
        self.f.write(mv)
        self.done += len(mv)

    def chunk_check(self):
        # Chunk k arrived whole (its size was checked before a byte was read).
        if self.h.digest() != self.want:
            raise InvalidUpdate("chunk %d of %s: SHA256 mismatch" % (self.k, self.label))

    def chunk_finish(self):
        # On flash before it counts: a power cut from here keeps it (LittleFS
        # commits a file's new size when it is closed or synced, and only then).
        # Synced and kept open while the next chunk's hash is in the batch.
        if self.batched(self.k + 1) and self.k + 1 < self.n:
            self.f.flush()
        else:
            self.close()
        self.k += 1

    def finish(self):
        self.close()
        size = self.entry["size"]
        if self.done != size:
            raise InvalidUpdate("truncated package: %d of %d bytes" % (self.done, size))
        if hex_digest(self.pkg.digest()) != self.entry["pkg_sha256"]:
            raise InvalidUpdate("SHA256 mismatch")

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


async def download(fetcher, inst, entry, kind=Download):
    """Download chunked `entry` into its file in DIR, resuming what is there;
    hand it to inst (Installer.downloaded) once every chunk and the whole
    package are verified. InvalidUpdate when a piece is refused or missing.
    kind: the Download class (firmware's writes into a partition)."""
    error = None
    for _ in range(_RETRIES):
        await fetcher.client.connected()
        try:
            if await _attempt(fetcher, inst, entry, kind):
                return
        except OSError as e:  # the link broke: resume from what is on flash
            error = e
            log.warning("download of %s broken (%r): resuming", label(entry), e)
        finally:
            fetcher.resumed_at = None
    raise InvalidUpdate("download failed: %r" % error)


async def _attempt(fetcher, inst, entry, kind):
    try:
        os.mkdir(inst.root + DIR)  # in /.mpypi, which Installer.begin() made
    except OSError:
        pass  # it exists
    dl = kind(inst, entry)
    try:
        if not dl.hashes_ok():
            t = dl.hashes_piece()
            await _take(fetcher, chunk_topic(entry, None), t, True, False)
            dl.hashes_finish()
        if dl.scan():
            fetcher.resumed_at = dl.done
            log.info("%s: resuming at chunk %d, byte %d", dl.label, dl.k, dl.done)
        if dl.k < dl.n:
            await _Stream(fetcher.client, dl).run(fetcher)
        dl.finish()
    finally:
        dl.close()
    inst.downloaded(entry, dl.path)
    return True


async def _take(fetcher, topic, t, first, last):
    what = "%s (%s)" % (t.dl.label, t.what)  # if it stalls: not on the broker
    await fetcher.transfer(topic, t, what, first, last)
    if t.error is not None:
        raise t.error


def _feed(f, size, h, mv):
    # The next `size` bytes of file f into hasher h, through mv.
    while size:
        got = f.readinto(mv[: min(size, len(mv))])
        if not got:
            raise OSError("file ended early")
        h.update(mv[:got])
        size -= got


def label(entry):
    # How errors name a package: a wheel by name and version, a src file by path.
    if entry["type"] == "src":
        return entry["path"]
    return entry.get("name", entry["type"]) + " " + entry["version"]


def path(root, entry):
    """Where `entry`'s download is kept: named by its SHA256, and a src file by
    its path's CRC too (two paths may list the same bytes, each its own topic)."""
    name = root + DIR + "/" + entry["pkg_sha256"]
    if entry["type"] == "src":
        import binascii

        name += ".%08x" % binascii.crc32(entry["path"].encode())
    return name


def forget(path):
    """Remove a download kept at `path` and its hash list."""
    for p in (path, path + ".h"):
        try:
            os.remove(p)
        except OSError:
            pass  # not there


def kept(root, entry):
    """The bytes of `entry`'s download already on flash (the pre-flight's)."""
    try:
        return os.stat(path(root, entry))[6]
    except OSError:
        return 0
