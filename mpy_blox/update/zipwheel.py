# Read a staged wheel from flash through its central directory and extract
# it, verified against its RECORD, into staging files.
#
# Memory: one fixed buffer, one central-directory record at a time, one deflate
# window; the only thing that grows is the RECORD table (one tuple a file).
# A wheel is a zip: we support stored (0) and deflated (8) entries, no zip64,
# no encryption, no symlinks, no `.data` folder, and refuse anything else
# before writing a byte.
#
# The deflate window: a raw deflate stream does not say how far back it refers,
# so the builder declares it in the zip's archive comment as "wbits=N" (9..15,
# see docs/protocol.md); a wheel without it is a standard wheel (wbits 15). The
# window must fit the free heap or the wheel is refused before allocating it.
import gc
import io
import struct
import hashlib
import binascii

from mpy_blox.update.manifest import InvalidUpdate
from mpy_blox.update.paths import check_wheel_path

_CHUNK = const(1024)
_EOCD = const(22)
_MAX_COMMENT = const(256)
_CDH = const(46)
_LFH = const(30)
_MAX_NAME = const(255)
_MAX_FILES = const(1000)
_WINDOW_MARGIN = const(4096)  # the decoder's own state (~1.4 KB), and some slack
_S_IFMT = const(0o170000)
_S_IFLNK = const(0o120000)


class _Section(io.IOBase):
    # A bounded reader over the compressed bytes of one entry: deflate reads
    # ahead, and must never read the next entry's header as data.
    def __init__(self, f, n):
        self.f = f
        self.n = n

    def readinto(self, buf):
        if self.n <= 0:
            return 0
        mv = memoryview(buf)
        if len(mv) > self.n:
            mv = mv[: self.n]
        k = self.f.readinto(mv)
        self.n -= k
        return k


def _wbits(comment):
    i = comment.find(b"wbits=")
    if i < 0:
        return 15
    try:
        w = int(comment[i + 6 : i + 8].strip())
    except ValueError:
        raise InvalidUpdate("bad wbits in wheel comment")
    if not 9 <= w <= 15:
        raise InvalidUpdate("bad wbits in wheel comment")
    return w


def window_fits(wbits):
    """True if a deflate window of 2**wbits bytes can be allocated now."""
    gc.collect()
    if gc.mem_free() < (1 << wbits) + _WINDOW_MARGIN:
        return False
    # Enough in total is not enough: the window is one block, and the heap may
    # be fragmented. Probe for it, then give it back for the decoder.
    try:
        probe = bytearray((1 << wbits) + 1024)
    except MemoryError:
        return False
    probe = None
    gc.collect()
    return True


class Wheel:
    """A staged wheel file; iterate its entries, extract them verified."""

    def __init__(self, path, size):
        self.f = open(path, "rb")
        self.buf = bytearray(_CHUNK)
        self.dist_info = None
        n = min(size, _EOCD + _MAX_COMMENT)
        if n < _EOCD:
            raise InvalidUpdate("not a wheel (too short)")
        self.f.seek(size - n)
        tail = memoryview(self.buf)[:n]
        self.f.readinto(tail)
        i = bytes(tail).rfind(b"PK\x05\x06")
        if i < 0:
            raise InvalidUpdate("not a wheel (no zip directory)")
        disk, cd_disk, _, count, cd_size, cd_off, clen = struct.unpack(
            "<HHHHIIH", tail[i + 4 : i + _EOCD]
        )
        if disk or cd_disk or count == 0xFFFF or cd_off == 0xFFFFFFFF:
            raise InvalidUpdate("zip64 or multi-disk wheels are not supported")
        if cd_off + cd_size > size - n + i or count > _MAX_FILES:
            raise InvalidUpdate("corrupt wheel directory")
        self.wbits = _wbits(bytes(tail[i + _EOCD : i + _EOCD + clen]))
        self.count = count
        self.cd_off = cd_off

    def close(self):
        self.f.close()

    def entries(self):
        """Yield (name, method, csize, usize, local header offset), all checked."""
        pos = self.cd_off
        hdr = memoryview(self.buf)[:_CDH]
        for _ in range(self.count):
            self.f.seek(pos)
            if self.f.readinto(hdr) != _CDH or hdr[:4] != b"PK\x01\x02":
                raise InvalidUpdate("corrupt wheel directory")
            (made_by, _, flags, method, _, _, _, csize, usize, nlen, xlen, clen, _, _, attrs,
             off) = struct.unpack("<HHHHHHIIIHHHHHII", hdr[4:])
            if nlen > _MAX_NAME:
                raise InvalidUpdate("wheel entry name too long")
            self.f.readinto(memoryview(self.buf)[_CDH : _CDH + nlen])
            name = bytes(self.buf[_CDH : _CDH + nlen]).decode()
            pos += _CDH + nlen + xlen + clen
            if name.endswith("/"):
                continue  # a folder entry: folders follow from the files
            check_wheel_path(name)
            if flags & 1:
                raise InvalidUpdate("encrypted wheel entry: " + name)
            if method not in (0, 8):
                raise InvalidUpdate("unsupported compression in wheel: " + name)
            if 0xFFFFFFFF in (csize, usize, off):
                raise InvalidUpdate("zip64 wheel entry: " + name)
            if made_by >> 8 == 3 and (attrs >> 16) & _S_IFMT == _S_IFLNK:
                raise InvalidUpdate("symlink in wheel: " + name)
            top = name.split("/")[0]
            if top.endswith(".data"):
                raise InvalidUpdate("wheel .data folders are not supported")
            if top.endswith(".dist-info") and name.count("/") == 1:
                if self.dist_info not in (None, top):
                    raise InvalidUpdate("wheel has two .dist-info folders")
                self.dist_info = top
            yield name, method, csize, usize, off

    def open_entry(self, method, csize, off):
        """A reader of one entry's uncompressed bytes (readinto)."""
        hdr = memoryview(self.buf)[:_LFH]
        self.f.seek(off)
        if self.f.readinto(hdr) != _LFH or hdr[:4] != b"PK\x03\x04":
            raise InvalidUpdate("corrupt wheel entry header")
        nlen, xlen = struct.unpack("<HH", hdr[26:30])
        self.f.seek(off + _LFH + nlen + xlen)
        section = _Section(self.f, csize)
        if method == 0:
            return section
        import deflate

        if not window_fits(self.wbits):
            raise InvalidUpdate(self._window_error())
        try:
            return deflate.DeflateIO(section, deflate.RAW, self.wbits)
        except MemoryError:
            raise InvalidUpdate(self._window_error())

    def _window_error(self):
        # Also raised for a MemoryError while inflating: the window is allocated
        # at the first read, next to the filesystem's per-file caches.
        return "wheel needs a %d-byte deflate window (wbits %d): not enough free heap" % (
            1 << self.wbits, self.wbits)

    def copy_entry(self, method, csize, usize, off, out, limit):
        """Stream one entry into file `out`; return (sha256 digest, size)."""
        src = self.open_entry(method, csize, off)
        h = hashlib.sha256()
        mv = memoryview(self.buf)
        total = 0
        while True:
            try:
                n = src.readinto(mv)
            except (OSError, ValueError):
                raise InvalidUpdate("corrupt compressed data in wheel")
            except MemoryError:  # the window is allocated at the first read
                raise InvalidUpdate(self._window_error())
            if not n:
                break
            total += n
            if total > limit:
                raise InvalidUpdate("wheel entry larger than its RECORD size")
            h.update(mv[:n])
            if out is not None:
                out.write(mv[:n])
        return h.digest(), total


def record_hash(digest):
    """RECORD's form of a digest: sha256=<urlsafe base64, no padding>."""
    b = binascii.b2a_base64(digest).strip().rstrip(b"=")
    return "sha256=" + b.decode().replace("+", "-").replace("/", "_")


def read_record(path):
    """{file: (hash, size)} from a staged RECORD (lines path,hash,size)."""
    table = {}
    with open(path) as f:
        while True:
            line = f.readline()
            if not line:
                return table
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(",", 2)
            if len(parts) != 3 or parts[0].startswith('"'):
                raise InvalidUpdate("malformed RECORD line")
            name, digest, size = parts
            if name.endswith("/RECORD") and not digest:
                continue  # RECORD does not list its own hash
            if not digest.startswith("sha256=") or not size.isdigit():
                raise InvalidUpdate("RECORD entry without sha256 and size: " + name)
            if name in table or len(table) >= _MAX_FILES:
                raise InvalidUpdate("malformed RECORD")
            table[name] = (digest, int(size))
