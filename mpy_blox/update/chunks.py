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
_CHUNK = const(1024)
_BIG_CHUNK = const(4096)  # as fetch: a flash sector, where the heap has room
_BIG_FREE = const(32768)
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
            if msg.size != self.size:
                raise InvalidUpdate(
                    "%s of %s: %d bytes published, %d expected"
                    % (self.what, self.dl.label, msg.size, self.size)
                )
            buf = self.dl.buf
            mv = memoryview(buf)
            while True:
                n = await msg.readinto(buf)
                if not n:
                    break
                self._write(mv[:n])
        except (ValueError, OSError, MemoryError) as e:  # InvalidUpdate is a ValueError
            self.error = e
        finally:
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
        self.buf = bytearray(_BIG_CHUNK if gc.mem_free() > _BIG_FREE else _CHUNK)
        self.want = bytearray(_HASH)  # the listed hash of the chunk being checked

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

    def listed(self, k):
        # Chunk k's SHA256 from the hash list on flash: 32 bytes, not the list.
        with open(self.path + ".h", "rb") as f:
            f.seek(k * _HASH)
            if f.readinto(self.want) != _HASH:
                raise InvalidUpdate("hash list of %s cut short" % self.label)
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

    def chunk_piece(self):
        self.h = hashlib.sha256()
        # The listed hash, then the package's file: never both open (a file's
        # cache is a 1 KB block, more than a 100K install boot has twice).
        self.listed(self.k)
        self.f = self.writer(self.done)
        return _Piece(self, self.size(self.k), "chunk %d" % self.k, self._chunk_write)

    def _chunk_write(self, mv):
        # Straight into the package's hasher too: a chunk that fails or
        # breaks off ends this attempt, and the next one rebuilds it (scan).
        self.h.update(mv)
        self.pkg.update(mv)
        self.f.write(mv)
        self.done += len(mv)

    def chunk_finish(self):
        # Chunk k arrived whole (its size was checked before a byte was read).
        if self.h.digest() != self.want:
            raise InvalidUpdate("chunk %d of %s: SHA256 mismatch" % (self.k, self.label))
        # On flash before it counts: a power cut from here keeps it (LittleFS
        # commits a file's new size when it is closed or synced, and only then).
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
        first = True
        while dl.k < dl.n:
            t = dl.chunk_piece()
            await _take(fetcher, chunk_topic(entry, dl.k), t, first, dl.k == dl.n - 1)
            dl.chunk_finish()
            first = False
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
